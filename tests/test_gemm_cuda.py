"""The CUDA GEMM kernels (hdrq._C, csrc/gemm_*.cu) against the reference, on a GPU.

Every kernel path is forced in turn (HDRQ_GEMM_PATH) at every tested shape, and each test checks that the
path really ran (hdrq._cuda.PATH_CALLS), so a silent fallback to the reference cannot pass for a kernel.
The int32 accumulator must equal the reference exactly; outputs are the reference's fp32 epilogue rounded
once, so they must match it within one rounding of the output dtype (in fact they are bit-identical).
"""
import dataclasses
import warnings

import pytest
import torch
from torch.library import opcheck

import hdrq
from hdrq import ops
from hdrq import reference as ref

pytestmark = pytest.mark.cuda

# wgmma_pp: ping-pong; wgmma256: 128x256 tiles; wgmma_decode: 64x128 tiles with split-K; wgmma_mc: 128x256 tiles
# in 2-CTA clusters with weight multicast, 8-bit (6-bit weights expanded first) (csrc/gemm.h WgmmaConfig)
KERNEL_PATHS = ["decode", "mma", "wgmma", "wgmma_pp", "wgmma256", "wgmma_decode", "wgmma_mc"]


@pytest.fixture(scope="module")
def cuda_backend():
    """hdrq._cuda, or a failure (not a skip) naming why the extension did not load: on a GPU machine a
    missing or broken build is a bug."""
    import hdrq._cuda as cuda_mod  # noqa: F401  (raises the ImportError if hdrq._C was not built)
    assert "cuda" in ops.available_backends("cuda"), ops._LOAD_ERRORS
    return cuda_mod


@pytest.fixture(scope="module")
def wgmma_canary(cuda_backend):
    """Each wgmma schedule checked first in a separate process (a kernel that faults or hangs must not take
    this process's CUDA context, and so every other test, down with it): {path: (ok, log)}. None: not an
    sm_90 GPU."""
    if torch.cuda.get_device_capability() != (9, 0):
        return None
    results = {}
    for path in cuda_backend.WGMMA_PATHS:
        ok, log = results[path] = cuda_backend.wgmma_canary(path)
        if not ok:
            cuda_backend._WGMMA_VERIFIED[torch.cuda.current_device(), path] = False  # keep auto dispatch off it
    return results


@pytest.fixture
def force_path(monkeypatch, cuda_backend, wgmma_canary):
    def force(path):
        if path in cuda_backend.WGMMA_PATHS:
            if wgmma_canary is None:
                pytest.skip("the wgmma paths need an sm_90 (Hopper) GPU")
            ok, log = wgmma_canary[path]
            if not ok:
                pytest.fail(f"the {path} kernel failed its out-of-process check:\n{log}")
        monkeypatch.setenv("HDRQ_GEMM_PATH", path)
        return cuda_backend.PATH_CALLS[path]
    return force


def takes(path, n, k):
    """Whether a forced path runs these sizes (wgmma: N % 16 == 0 and K % 32 == 0; else it falls back)."""
    return not path.startswith("wgmma") or (n % 16 == 0 and k % 32 == 0)


def weights(n, k, bits, device="cuda"):
    lo, hi = (-128, 128) if bits == 8 else (-32, 32)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int8, device=device)
    return q, ops.pack_weight(q, bits)


def acts(m, k, lo=-128, hi=128):
    return torch.randint(lo, hi, (m, k), dtype=torch.int8, device="cuda")


# M from the issue; N and K include non-multiples of the panel (16), unit (32) and stage (64/128) sizes.
SHAPES = [
    (1, 4096, 4096), (1, 72, 36), (3, 1000, 1028), (16, 272, 96), (16, 14336, 512), (17, 4104, 300),
    (64, 1040, 4096), (64, 24, 20), (129, 520, 1000), (129, 4096, 164), (2048, 4096, 4096), (2048, 200, 68),
]


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_accumulator_exact(force_path, path, bits, m, n, k):
    before = force_path(path)
    q, w = weights(n, k, bits)
    a = acts(m, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning, for sizes a forced path does not take
        got = ops.int_matmul_int32(a, w, w_bits=bits)
    assert got.dtype == torch.int32
    assert torch.equal(got, ref.int_matmul_acc(a, q))
    if takes(path, n, k):
        assert force_path(path) == before + 1, f"the {path} kernel did not run"
    else:
        assert force_path(path) == before, f"the {path} kernel ran on sizes it does not support"


@pytest.mark.parametrize("path", ["decode", "mma"])
def test_odd_k_and_unaligned_rows(force_path, path):
    """8-bit weights with odd K (A rows not 16-byte aligned: the byte-wise loader), and A as a strided view."""
    before = force_path(path)
    q, w = weights(70, 333, 8)
    a = acts(19, 333)
    assert torch.equal(ops.int_matmul_int32(a, w, w_bits=8), ref.int_matmul_acc(a, q))
    big = acts(19, 400)
    view = big[:, 16:16 + 333]  # lda = 400, offset 16: aligned rows of a wider tensor
    assert torch.equal(ops.int_matmul_int32(view, w, w_bits=8), ref.int_matmul_acc(view, q))
    view = big[:, 3:3 + 333]  # base not 16-byte aligned
    assert torch.equal(ops.int_matmul_int32(view, w, w_bits=8), ref.int_matmul_acc(view, q))
    assert force_path(path) == before + 3


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_unsigned_activations_and_extremes(force_path, path):
    force_path(path)
    k = 4096
    q, w = weights(64, k, 6)
    a = acts(5, k, 0, 64)  # post-ReLU 6-bit
    assert torch.equal(ops.int_matmul_int32(a, w, w_bits=6), ref.int_matmul_acc(a, q))
    # extremes: -128 * -128 summed over K stays exact (and within int32)
    q8 = torch.full((32, k), -128, dtype=torch.int8, device="cuda")
    a8 = torch.full((3, k), -128, dtype=torch.int8, device="cuda")
    assert torch.equal(ops.int_matmul_int32(a8, ops.pack_weight(q8, 8), w_bits=8),
                       torch.full((3, 32), 128 * 128 * k, dtype=torch.int32, device="cuda"))
    q6 = torch.full((32, k), -32, dtype=torch.int8, device="cuda")
    assert torch.equal(ops.int_matmul_int32(a8, ops.pack_weight(q6, 6), w_bits=6),
                       torch.full((3, 32), 128 * 32 * k, dtype=torch.int32, device="cuda"))


def _ulps_ok(got, want_fp32, dtype):
    """got equals want_fp32 rounded once to dtype (nearest), up to one unit of that rounding."""
    want = want_fp32.to(dtype)
    if torch.equal(got, want):
        return True
    eps = torch.finfo(dtype).eps
    return torch.allclose(got.float(), want_fp32, rtol=eps, atol=1e-6)


def check_bf16_epilogue(cuda_backend, a, w, bits, **run):
    """The deployed epilogue (per-token scales, bf16 bias, bf16 out) into a NaN-poisoned output equals the
    reference's fp32 epilogue rounded once. ``run``: ``path=`` or ``plan_override=`` of int_gemm_out."""
    m, n = a.shape[0], (w.shape[0])
    a_scale = (torch.rand(m, device="cuda") + 0.05) / 2000
    w_scale = (torch.rand(n, device="cuda") + 0.05) / 50
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    ran = cuda_backend.int_gemm_out(out, a, a_scale, w, w_scale, bias, bits, **run)
    assert torch.equal(out, ref.int_matmul(a, a_scale, w, w_scale, bits, bias, torch.float32).to(torch.bfloat16))
    return ran


OUT_SHAPES = [(3, 272, 1028), (129, 200, 640), (300, 272, 640)]


@pytest.mark.parametrize("path,m,n,k", [(p, *s) for p in KERNEL_PATHS for s in OUT_SHAPES if takes(p, *s[1:])])
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_token,bias_dtype", [(True, None), (False, torch.bfloat16), (True, torch.float32),
                                                  (True, torch.float16)])
def test_outputs_poisoned(cuda_backend, force_path, path, bits, out_dtype, per_token, bias_dtype, m, n, k):
    force_path(path)
    q, w = weights(n, k, bits)
    a = acts(m, k)
    a_scale = (torch.rand(m if per_token else 1, device="cuda") + 0.05) / 2000
    w_scale = (torch.rand(n, device="cuda") + 0.05) / 50
    bias = None if bias_dtype is None else torch.randn(n, device="cuda").to(bias_dtype)
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
    cuda_backend.int_gemm_out(out, a, a_scale, w, w_scale, bias, bits, path=path)
    assert not out.isnan().any(), "an output element was never written"
    want = ref.int_matmul(a, a_scale, w, w_scale, bits, bias, torch.float32)
    assert _ulps_ok(out, want, out_dtype)
    # in fact: the same fp32 operations in the same order, rounded once
    assert torch.equal(out, want.to(out_dtype))


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_int32_output_poisoned(cuda_backend, force_path, path):
    force_path(path)
    q, w = weights(304, 544, 6)
    a = acts(70, 544)
    out = torch.full((70, 304), -0x5A5A5A5B, dtype=torch.int32, device="cuda")
    ones = torch.ones(304, device="cuda")
    cuda_backend.int_gemm_out(out, a, ones[:1], w, ones, None, 6, path=path)
    assert torch.equal(out, ref.int_matmul_acc(a, q))


@pytest.mark.parametrize("path", ["wgmma", "wgmma_pp", "wgmma256", "wgmma_mc"])
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("m,n,k", [(4000, 4000, 96), (3000, 1040, 1000), (2176, 4096, 256)])
def test_wgmma_many_tiles_per_cta(cuda_backend, force_path, path, bits, m, n, k):
    """More output tiles than SMs (the persistent CTAs walk 2-8 tiles each, so both ping-pong consumers and
    their order barrier take turns), ragged last tiles: exact accumulator, and the bf16 epilogue with
    per-token scales and bias into a poisoned output."""
    before = force_path(path)
    q, w = weights(n, k, bits)
    a = acts(m, k)
    acc = torch.full((m, n), -0x5A5A5A5B, dtype=torch.int32, device="cuda")
    ones = torch.ones(n, device="cuda")
    cuda_backend.int_gemm_out(acc, a, ones[:1], w, ones, None, bits, path=path)
    assert torch.equal(acc, ref.int_matmul_acc(a, q))
    check_bf16_epilogue(cuda_backend, a, w, bits, path=path)
    assert force_path(path) == before + 2


@pytest.mark.parametrize("n,k", [(16, 32), (272, 544), (4096, 4096), (48, 14336)])
def test_expand_w6_kernel(cuda_backend, n, k):
    """The 6-bit -> 8-bit expansion pass gives exactly pack_weight(q, 8), every byte written (poisoned)."""
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8, device="cuda")
    w6 = ops.pack_weight(q, 6)
    w8 = torch.full((n, k), 0x5A, dtype=torch.int8, device="cuda")
    torch.ops.hdrq_C.expand_w6(w8, w6, n, k)
    assert torch.equal(w8, ops.pack_weight(q, 8))
    assert torch.equal(cuda_backend.expand_w6(w6, n, k), ops.pack_weight(q, 8))


def test_expand_w6_rejects_bad_inputs(cuda_backend):
    q = torch.randint(-32, 32, (24, 64), dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="N % 16 == 0"):
        torch.ops.hdrq_C.expand_w6(torch.empty(24, 64, dtype=torch.int8, device="cuda"), ops.pack_weight(q, 6), 24, 64)
    q = torch.randint(-32, 32, (32, 64), dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="at least 2048 bytes"):
        torch.ops.hdrq_C.expand_w6(torch.empty(32, 63, dtype=torch.int8, device="cuda"), ops.pack_weight(q, 6), 32, 64)


@pytest.mark.parametrize("path", ["wgmma", "wgmma_pp", "wgmma256"])
@pytest.mark.parametrize("m,n,k", [(300, 272, 640), (2048, 4096, 1024)])
def test_w6_through_expansion(cuda_backend, force_path, monkeypatch, path, m, n, k):
    """W6A6 on a wgmma path with the weights expanded first (HDRQ_W6_EXPAND=1): exact accumulator, bf16
    epilogue into a poisoned output, and the expansion and the 8-bit kernel really ran."""
    before = force_path(path)
    monkeypatch.setenv("HDRQ_W6_EXPAND", "1")
    expansions = cuda_backend.PATH_CALLS["expand_w6"]
    q, w = weights(n, k, 6)
    a = acts(m, k)
    assert cuda_backend.plan(m, n, k, 6, torch.device("cuda"), path).expand
    assert torch.equal(ops.int_matmul_int32(a, w, w_bits=6), ref.int_matmul_acc(a, q))
    ran = check_bf16_epilogue(cuda_backend, a, w, 6, path=path)
    assert ran.expand
    assert force_path(path) == before + 2 and cuda_backend.PATH_CALLS["expand_w6"] == expansions + 2
    monkeypatch.setenv("HDRQ_W6_EXPAND", "0")
    assert not cuda_backend.plan(m, n, k, 6, torch.device("cuda"), path).expand


def test_w6_expansion_in_a_cuda_graph(cuda_backend, force_path, monkeypatch):
    """The expansion pass and the 8-bit kernel captured together; replays follow new activations."""
    force_path("wgmma")
    monkeypatch.setenv("HDRQ_W6_EXPAND", "1")
    q, w = weights(1024, 512, 6)
    a = acts(512, 512)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.int_matmul_int32(a, w, w_bits=6)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.int_matmul_int32(a, w, w_bits=6)
    for _ in range(2):
        a.copy_(acts(512, 512))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref.int_matmul_acc(a, q))


@pytest.mark.parametrize("path", ["wgmma_decode"])
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("m,n,k,splits", [(1, 4096, 4096, 8), (17, 272, 2080, 3), (64, 1040, 4096, 5),
                                          (300, 272, 1056, 16), (3, 48, 672, 6)])
def test_wgmma_split_k(cuda_backend, force_path, path, bits, m, n, k, splits):
    """Split-K on the wgmma path that has it: ragged tiles, K not a multiple of the splits (the last
    split's steps past K are padding; 16 splits of 9 k-tiles: seven splits all padding), twice in a row
    (the counters are back at zero), the exact accumulator and the bf16 epilogue into a poisoned output."""
    force_path(path)
    q, w = weights(n, k, bits)
    a = acts(m, k)
    pl = cuda_backend.plan_for_config(m, n, k, bits, path, splits)
    acc = torch.full((m, n), -0x5A5A5A5B, dtype=torch.int32, device="cuda")
    ones = torch.ones(n, device="cuda")
    for _ in range(2):
        ran = cuda_backend.int_gemm_out(acc, a, ones[:1], w, ones, None, bits, plan_override=pl)
        assert (ran.path, ran.splits) == (path, splits)
        assert torch.equal(acc, ref.int_matmul_acc(a, q))
    check_bf16_epilogue(cuda_backend, a, w, bits, plan_override=pl)


def test_auto_dispatch_to_wgmma_decode(cuda_backend, force_path, monkeypatch):
    """With GemmDispatch.wgmma_decode_max_m set, auto sends small M to wgmma_decode (after its check)."""
    force_path("wgmma_decode")
    monkeypatch.setenv("HDRQ_GEMM_PATH", "auto")
    monkeypatch.setattr(cuda_backend, "DISPATCH", dataclasses.replace(cuda_backend.DISPATCH, wgmma_decode_max_m=32))
    monkeypatch.setattr(cuda_backend, "_WGMMA_VERIFIED", {})
    for m, expect in [(16, "wgmma_decode"), (33, "decode")]:
        before = cuda_backend.PATH_CALLS[expect]
        q, w = weights(1024, 2048, 6)
        a = acts(m, 2048)
        assert torch.equal(ops.int_matmul_int32(a, w, w_bits=6), ref.int_matmul_acc(a, q))
        assert cuda_backend.PATH_CALLS[expect] >= before + 1


DECODE_NAMES = ["Decode16", "Decode32", "Decode64", "Decode16K256", "Decode16Deep", "Decode32N128", "Decode64N128"]


@pytest.mark.parametrize("config", DECODE_NAMES)
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("m,n,k,splits", [(1, 4104, 1028, 1), (17, 272, 2080, 3), (64, 1000, 4096, 5),
                                          (3, 24, 20, 1)])
def test_every_decode_config(cuda_backend, config, bits, m, n, k, splits):
    """Every decode tile configuration (whichever GemmDispatch picks), split or not, with ragged N, K and M
    tiles: the exact accumulator and the bf16 epilogue into poisoned outputs."""
    q, w = weights(n, k, bits)
    a = acts(m, k)
    pl = cuda_backend.plan_for_config(m, n, k, bits, config, splits)
    acc = torch.full((m, n), -0x5A5A5A5B, dtype=torch.int32, device="cuda")
    ones = torch.ones(n, device="cuda")
    for _ in range(2):  # twice: split-K counters must be back at zero
        ran = cuda_backend.int_gemm_out(acc, a, ones[:1], w, ones, None, bits, plan_override=pl)
        assert (ran.config, ran.splits) == (pl.config, splits)
        assert torch.equal(acc, ref.int_matmul_acc(a, q))
    check_bf16_epilogue(cuda_backend, a, w, bits, plan_override=pl)


def test_strided_output_rows(cuda_backend):
    """out with a row stride larger than N (a view), odd N: scalar stores, nothing outside the view."""
    q, w = weights(37, 256, 8)
    a = acts(5, 256)
    big = torch.full((5, 40), float("nan"), dtype=torch.bfloat16, device="cuda")
    ones = torch.ones(37, device="cuda")
    cuda_backend.int_gemm_out(big[:, 1:38], a, ones[:1], w, ones, None, 8, path="decode")
    want = ref.int_matmul(a, ones[:1], w, ones, 8, None, torch.bfloat16)
    assert torch.equal(big[:, 1:38], want)
    assert big[:, 0].isnan().all() and big[:, 38:].isnan().all()


@pytest.mark.parametrize("path", ["decode", "mma"])
@pytest.mark.parametrize("splits_wanted", [2, 3, 7, 16])
def test_split_k(cuda_backend, monkeypatch, path, splits_wanted):
    """Force many K splits (the last split to arrive sums the partials, then leaves the counters zero)."""
    many = tuple((top, name, 64.0) for top, name, _ in cuda_backend.DISPATCH.decode_configs)
    d = dataclasses.replace(cuda_backend.DISPATCH, decode_configs=many, mma_blocks_per_sm=64.0,
                            max_partial_fraction=1e9, max_splits=splits_wanted, min_k_tiles_per_split=1)
    monkeypatch.setattr(cuda_backend, "DISPATCH", d)
    for bits in (6, 8):
        q, w = weights(200, 2080, bits)
        a = acts(70 if path == "mma" else 9, 2080)
        out = torch.empty((a.shape[0], 200), dtype=torch.int32, device="cuda")
        ones = torch.ones(200, device="cuda")
        for _ in range(3):  # repeated: counters must be back at zero each time
            plan = cuda_backend.int_gemm_out(out, a, ones[:1], w, ones, None, bits, path=path)
            assert plan.splits == splits_wanted
            assert torch.equal(out, ref.int_matmul_acc(a, q))


def test_concurrent_streams(cuda_backend):
    """Split-K on two streams at once: each stream has its own counters and partials."""
    q, w = weights(4096, 4096, 6)
    xs = [acts(1, 4096) for _ in range(2)]
    want = [ref.int_matmul_acc(x, q) for x in xs]
    ws = torch.ones(4096, device="cuda")
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [None, None]
    torch.cuda.synchronize()
    for _ in range(20):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i] = ops.int_matmul(xs[i], ws[:1], w, ws, w_bits=6, out_dtype=torch.float32)
    torch.cuda.synchronize()
    for o, wnt in zip(outs, want):
        assert torch.equal(o, wnt.float())


@pytest.mark.parametrize("m,path", [(1, "auto"), (16, "auto"), (300, "auto"), (300, "wgmma"), (300, "wgmma_pp"),
                                    (300, "wgmma256"), (1, "wgmma_decode"), (64, "wgmma_decode"), (300, "wgmma_mc")])
def test_cuda_graph_capture(cuda_backend, force_path, m, path):
    force_path(path)
    q, w = weights(4096, 4096, 6)
    a = acts(m, 4096)
    a_scale = torch.rand(m, device="cuda") + 0.1
    w_scale = torch.rand(4096, device="cuda") + 0.1
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (sets up the split-K workspace)
        ops.int_matmul(a, a_scale, w, w_scale, w_bits=6, bias=bias)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.int_matmul(a, a_scale, w, w_scale, w_bits=6, bias=bias)
    for _ in range(3):
        a.copy_(acts(m, 4096))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref.int_matmul(a, a_scale, w, w_scale, 6, bias, torch.bfloat16))


def test_torch_compile(cuda_backend):
    q, w = weights(520, 640, 8)
    w_scale = torch.rand(520, device="cuda") + 0.1

    def f(x):
        a_q, a_s = ops.quantize_per_token(x, bits=8)
        return ops.int_matmul(a_q, a_s, w, w_scale, w_bits=8, out_dtype=torch.float32).relu()

    x = torch.randn(33, 640, device="cuda")
    # aot_eager traces through the ops' fake implementations exactly as inductor does, without its codegen
    # time (the custom ops are opaque to inductor anyway)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


def test_opcheck_cuda(cuda_backend):
    q, w = weights(40, 96, 6)
    a = acts(5, 96)
    opcheck(torch.ops.hdrq.int_matmul.default,
            (a, torch.rand(5, device="cuda"), w, torch.rand(40, device="cuda"), 6, torch.randn(40, device="cuda"),
             torch.bfloat16))
    opcheck(torch.ops.hdrq.int_matmul_int32.default, (a, w, 6))
    counters = torch.zeros(16, dtype=torch.int32, device="cuda")
    partials = torch.empty(0, dtype=torch.int32, device="cuda")
    out = torch.empty(5, 40, dtype=torch.float16, device="cuda")
    opcheck(torch.ops.hdrq_C.int_gemm.default,
            (out, a, torch.rand(1, device="cuda"), w, torch.rand(40, device="cuda"), None, counters, partials, 6, 0,
             0, 1))


def test_auto_dispatch_uses_kernels(cuda_backend, wgmma_canary, monkeypatch):
    monkeypatch.delenv("HDRQ_GEMM_PATH", raising=False)
    for m, expect in [(1, "decode"), (64, "decode"), (65, "mma"), (2048, None)]:
        path = cuda_backend.plan(m, 256, 256, 8, torch.device("cuda")).path
        assert expect is None or path == expect
        before = cuda_backend.PATH_CALLS[path]
        q, w = weights(256, 256, 8)
        a = acts(m, 256)
        assert torch.equal(ops.int_matmul_int32(a, w, w_bits=8), ref.int_matmul_acc(a, q))
        assert cuda_backend.PATH_CALLS[path] == before + 1


@pytest.mark.parametrize("wgmma_path", ["wgmma", "wgmma_pp", "wgmma256", "wgmma_mc"])
def test_auto_dispatch_to_wgmma(cuda_backend, force_path, monkeypatch, wgmma_path):
    """With a crossover set, auto sends large M to the chosen wgmma schedule (after its first-use check) on
    Hopper only."""
    force_path(wgmma_path)
    monkeypatch.setenv("HDRQ_GEMM_PATH", "auto")
    monkeypatch.setattr(cuda_backend, "DISPATCH", dataclasses.replace(cuda_backend.DISPATCH, wgmma_min_m=128,
                                                                              wgmma_bits=(6, 8), wgmma_path=wgmma_path))
    monkeypatch.setattr(cuda_backend, "_WGMMA_VERIFIED", {})
    before = cuda_backend.PATH_CALLS[wgmma_path]
    q, w = weights(2048, 1024, 6)
    a = acts(2048, 1024)
    assert torch.equal(ops.int_matmul_int32(a, w, w_bits=6), ref.int_matmul_acc(a, q))
    assert cuda_backend._WGMMA_VERIFIED[torch.cuda.current_device(), wgmma_path] is True
    assert cuda_backend.PATH_CALLS[wgmma_path] >= before + 1 + 2  # the first-use check ran it too


def test_unsupported_inputs_fall_back_to_reference(cuda_backend, monkeypatch):
    monkeypatch.setattr(ops, "_WARNED", set())
    q, w = weights(64, 128, 8)
    a = acts(4, 256)[:, ::2]  # stride 2 along K: the kernels need unit stride
    with pytest.warns(RuntimeWarning, match="unit stride"):
        got = ops.int_matmul_int32(a, w, w_bits=8)
    assert torch.equal(got, ref.int_matmul_acc(a, q))
    # a forced path that cannot take the sizes falls back too (wgmma: K % 32 != 0, or not an sm_90 GPU)
    monkeypatch.setenv("HDRQ_GEMM_PATH", "wgmma")
    before = cuda_backend.PATH_CALLS["wgmma"]
    q2, w2 = weights(64, 100, 8)
    a2 = acts(4, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ops.int_matmul_int32(a2, w2, w_bits=8)
    assert torch.equal(got, ref.int_matmul_acc(a2, q2)) and cuda_backend.PATH_CALLS["wgmma"] == before


def test_public_op_matches_reference_backend(cuda_backend):
    q, w = weights(300, 1000, 6)
    a = acts(7, 1000)
    a_s, w_s = torch.rand(7, device="cuda"), torch.rand(300, device="cuda")
    hdrq.set_backend("cuda")
    got = ops.int_matmul(a, a_s, w, w_s, w_bits=6, out_dtype=torch.float16)
    hdrq.set_backend("reference")
    want = ops.int_matmul(a, a_s, w, w_s, w_bits=6, out_dtype=torch.float16)
    assert torch.equal(got, want)
