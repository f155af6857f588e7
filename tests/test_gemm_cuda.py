"""The GEMM implementations behind hdrq::int_matmul on CUDA (hdrq._C's csrc/gemm_*.cu, the Triton GEMM,
torch._int_mm with the epilogue) against the reference, on a GPU.

Every path is forced in turn (HDRQ_GEMM_PATH) at every tested shape, and each test checks that the path really ran
(hdrq._cuda.PATH_CALLS), so a silent fallback cannot pass for a kernel. The int32 accumulator must equal the
reference exactly; outputs are the reference's fp32 epilogue rounded once, so they must match it bit for bit.
"""
import dataclasses
import os
import sys

import pytest
import torch
from torch.library import opcheck

import hdrq
from hdrq import ops
from hdrq import reference as ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_check import wgmma_canary as run_wgmma_canary  # noqa: E402

pytestmark = pytest.mark.cuda

# wgmma_pp: ping-pong; wgmma256: 128x256 tiles; wgmma_decode: 64x128 tiles with split-K; wgmma_mc: 128x256 tiles
# in 2-CTA clusters with weight multicast, 8-bit (6-bit weights expanded first) (csrc/gemm.h WgmmaConfig)
KERNEL_PATHS = ["decode", "mma", "wgmma", "wgmma_pp", "wgmma256", "wgmma_decode", "wgmma_mc"]
ROUTES = KERNEL_PATHS + ["triton", "int_mm"]  # what HDRQ_GEMM_PATH can force


@pytest.fixture(scope="module")
def cuda_backend():
    """hdrq._cuda, or a failure (not a skip) naming why the extension did not load: on a GPU machine a
    missing or broken build is a bug."""
    import hdrq._cuda as cuda_mod

    assert ops.CUDA_KERNELS_ERROR is None, ops.CUDA_KERNELS_ERROR
    assert cuda_mod.EXTENSION_ERROR is None, cuda_mod.EXTENSION_ERROR
    return cuda_mod


@pytest.fixture(scope="module")
def wgmma_canary(cuda_backend):
    """Each wgmma schedule checked first in a separate process (a kernel that faults or hangs must not take
    this process's CUDA context, and so every other test, down with it): {path: (ok, log)}. None: not an
    sm_90 GPU."""
    if torch.cuda.get_device_capability() != (9, 0):
        return None
    return {path: run_wgmma_canary(path) for path in cuda_backend.WGMMA_PATHS}


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
    """Whether a forced path runs these sizes (wgmma: N % 16 == 0 and K % 32 == 0; else the Triton GEMM runs)."""
    return not path.startswith("wgmma") or (n % 16 == 0 and k % 32 == 0)


def weights(n, k, bits, device="cuda", scale=None):
    """Random integer weights q and their PackedWeight (step sizes ``scale``, default ones)."""
    lo, hi = (-128, 128) if bits == 8 else (-32, 32)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int8, device=device)
    return q, ops.pack_weight(q, bits, torch.ones(n, device=device) if scale is None else scale)


def acts(m, k, lo=-128, hi=128):
    return torch.randint(lo, hi, (m, k), dtype=torch.int8, device="cuda")


# M from the issue; N and K include non-multiples of the panel (16), unit (32) and stage (64/128) sizes.
SHAPES = [
    (1, 4096, 4096), (1, 72, 36), (3, 1000, 1028), (16, 272, 96), (16, 14336, 512), (17, 4104, 300),
    (64, 1040, 4096), (64, 24, 20), (129, 520, 1000), (129, 4096, 164), (2048, 4096, 4096), (2048, 200, 68),
]


@pytest.mark.parametrize("path", KERNEL_PATHS + ["triton"])
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_accumulator_exact(force_path, path, bits, m, n, k):
    before = force_path(path)
    q, w = weights(n, k, bits)
    a = acts(m, k)
    got = ops.int_matmul_int32(a, w)
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
    assert torch.equal(ops.int_matmul_int32(a, w), ref.int_matmul_acc(a, q))
    big = acts(19, 400)
    view = big[:, 16:16 + 333]  # lda = 400, offset 16: aligned rows of a wider tensor
    assert torch.equal(ops.int_matmul_int32(view, w), ref.int_matmul_acc(view, q))
    view = big[:, 3:3 + 333]  # base not 16-byte aligned
    assert torch.equal(ops.int_matmul_int32(view, w), ref.int_matmul_acc(view, q))
    assert force_path(path) == before + 3


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_unsigned_activations_and_extremes(force_path, path):
    force_path(path)
    k = 4096
    q, w = weights(64, k, 6)
    a = acts(5, k, 0, 64)  # post-ReLU 6-bit
    assert torch.equal(ops.int_matmul_int32(a, w), ref.int_matmul_acc(a, q))
    # extremes: -128 * -128 summed over K stays exact (and within int32)
    q8 = torch.full((32, k), -128, dtype=torch.int8, device="cuda")
    a8 = torch.full((3, k), -128, dtype=torch.int8, device="cuda")
    assert torch.equal(ops.int_matmul_int32(a8, ops.pack_weight(q8, 8)),
                       torch.full((3, 32), 128 * 128 * k, dtype=torch.int32, device="cuda"))
    q6 = torch.full((32, k), -32, dtype=torch.int8, device="cuda")
    assert torch.equal(ops.int_matmul_int32(a8, ops.pack_weight(q6, 6)),
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
    m, n = a.shape[0], w.shape[0]
    a_scale = (torch.rand(m, device="cuda") + 0.05) / 2000
    w_scale = (torch.rand(n, device="cuda") + 0.05) / 50
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    ran = cuda_backend.int_gemm_out(out, a, a_scale, w.data, w_scale, bias, bits, **run)
    want = ref.int_matmul(a, a_scale, w.data, w_scale, bits, bias, torch.float32).to(torch.bfloat16)
    assert torch.equal(out, want)
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
    cuda_backend.int_gemm_out(out, a, a_scale, w.data, w_scale, bias, bits, path=path)
    assert not out.isnan().any(), "an output element was never written"
    want = ref.int_matmul(a, a_scale, w.data, w_scale, bits, bias, torch.float32)
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
    cuda_backend.int_gemm_out(out, a, ones[:1], w.data, ones, None, 6, path=path)
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
    cuda_backend.int_gemm_out(acc, a, ones[:1], w.data, ones, None, bits, path=path)
    assert torch.equal(acc, ref.int_matmul_acc(a, q))
    check_bf16_epilogue(cuda_backend, a, w, bits, path=path)
    assert force_path(path) == before + 2


@pytest.mark.parametrize("n,k", [(16, 32), (272, 544), (4096, 4096), (48, 14336)])
def test_expand_w6_kernel(cuda_backend, n, k):
    """The 6-bit -> 8-bit expansion pass gives exactly pack_weight(q, 8), every byte written (poisoned)."""
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8, device="cuda")
    w6 = ops.pack_weight(q, 6).data
    w8 = torch.full((n, k), 0x5A, dtype=torch.int8, device="cuda")
    torch.ops.hdrq.expand_w6(w8, w6, n, k)
    assert torch.equal(w8, ops.pack_weight(q, 8).data)
    assert torch.equal(cuda_backend.expand_w6(w6, n, k), ops.pack_weight(q, 8).data)


def test_expand_w6_rejects_bad_inputs(cuda_backend):
    q = torch.randint(-32, 32, (24, 64), dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="N % 16 == 0"):
        torch.ops.hdrq.expand_w6(torch.empty(24, 64, dtype=torch.int8, device="cuda"), ops.pack_weight(q, 6).data, 24,
                                 64)
    q = torch.randint(-32, 32, (32, 64), dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="at least 2048 bytes"):
        torch.ops.hdrq.expand_w6(torch.empty(32, 63, dtype=torch.int8, device="cuda"), ops.pack_weight(q, 6).data, 32,
                                 64)


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
    assert cuda_backend.route(m, n, k, 6, torch.cuda.current_device()).expand
    assert torch.equal(ops.int_matmul_int32(a, w), ref.int_matmul_acc(a, q))
    ran = check_bf16_epilogue(cuda_backend, a, w, 6, path=path, expand=True)
    assert ran.expand
    assert force_path(path) == before + 2 and cuda_backend.PATH_CALLS["expand_w6"] == expansions + 2
    monkeypatch.setenv("HDRQ_W6_EXPAND", "0")
    assert not cuda_backend.route(m, n, k, 6, torch.cuda.current_device()).expand


def test_w6_expansion_in_a_cuda_graph(cuda_backend, force_path, monkeypatch):
    """The expansion pass and the 8-bit kernel captured together; replays follow new activations."""
    force_path("wgmma")
    monkeypatch.setenv("HDRQ_W6_EXPAND", "1")
    q, w = weights(1024, 512, 6)
    a = acts(512, 512)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.int_matmul_int32(a, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.int_matmul_int32(a, w)
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
        ran = cuda_backend.int_gemm_out(acc, a, ones[:1], w.data, ones, None, bits, plan_override=pl)
        assert (ran.path, ran.splits) == (path, splits)
        assert torch.equal(acc, ref.int_matmul_acc(a, q))
    check_bf16_epilogue(cuda_backend, a, w, bits, plan_override=pl)


@pytest.fixture
def routing(cuda_backend):
    """Install a routing table of the given rules ((bits, max_m, path, expand), ...) for one test."""
    def install(*rules):
        c = cuda_backend
        c.set_routing_table(c.RoutingTable([c.Rule(b, m, c.Route(p, x)) for b, m, p, x in rules], {}))
    yield install
    cuda_backend.set_routing_table(None)


def test_routing_table_sends_calls_to_its_paths(cuda_backend, force_path, monkeypatch, routing):
    """A table's rules decide the path (here wgmma_decode up to M = 32, then the decode kernels, then int_mm, then
    the Triton GEMM), checked by the path counters; no table entry is needed for correctness."""
    force_path("wgmma_decode")
    monkeypatch.delenv("HDRQ_GEMM_PATH")
    routing((6, 32, "wgmma_decode", False), (6, 64, "decode", False), (6, 256, "int_mm", False),
            (6, None, "triton", False))
    for m, expect in [(16, "wgmma_decode"), (33, "decode"), (200, "int_mm"), (300, "triton")]:
        before = cuda_backend.PATH_CALLS[expect]
        q, w = weights(1024, 2048, 6, scale=torch.rand(1024, device="cuda") + 0.1)
        a = acts(m, 2048)
        a_s = torch.rand(m, device="cuda") + 0.1
        want = ref.int_matmul(a, a_s, w.data, w.scale, 6, None, torch.bfloat16)
        assert torch.equal(ops.int_matmul(a, a_s, w), want)
        assert cuda_backend.PATH_CALLS[expect] == before + 1, expect


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
        ran = cuda_backend.int_gemm_out(acc, a, ones[:1], w.data, ones, None, bits, plan_override=pl)
        assert (ran.config, ran.splits) == (pl.config, splits)
        assert torch.equal(acc, ref.int_matmul_acc(a, q))
    check_bf16_epilogue(cuda_backend, a, w, bits, plan_override=pl)


def test_strided_output_rows(cuda_backend):
    """out with a row stride larger than N (a view), odd N: scalar stores, nothing outside the view."""
    q, w = weights(37, 256, 8)
    a = acts(5, 256)
    big = torch.full((5, 40), float("nan"), dtype=torch.bfloat16, device="cuda")
    ones = torch.ones(37, device="cuda")
    cuda_backend.int_gemm_out(big[:, 1:38], a, ones[:1], w.data, ones, None, 8, path="decode")
    want = ref.int_matmul(a, ones[:1], w.data, ones, 8, None, torch.bfloat16)
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
            plan = cuda_backend.int_gemm_out(out, a, ones[:1], w.data, ones, None, bits, path=path)
            assert plan.splits == splits_wanted
            assert torch.equal(out, ref.int_matmul_acc(a, q))


def test_concurrent_streams(cuda_backend):
    """Split-K on two streams at once: each stream has its own counters and partials."""
    q, w = weights(4096, 4096, 6)
    xs = [acts(1, 4096) for _ in range(2)]
    want = [ref.int_matmul_acc(x, q) for x in xs]
    ws = torch.ones(1, device="cuda")
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [None, None]
    torch.cuda.synchronize()
    for _ in range(20):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i] = ops.int_matmul(xs[i], ws, w, out_dtype=torch.float32)
    torch.cuda.synchronize()
    for o, wnt in zip(outs, want):
        assert torch.equal(o, wnt.float())


@pytest.mark.parametrize("m,path", [(1, "auto"), (16, "auto"), (300, "auto"), (300, "wgmma"), (300, "wgmma_pp"),
                                    (300, "wgmma256"), (1, "wgmma_decode"), (64, "wgmma_decode"), (300, "wgmma_mc"),
                                    (1, "triton"), (300, "triton"), (300, "int_mm")])
@pytest.mark.parametrize("bits", [6, 8])
def test_cuda_graph_capture(cuda_backend, force_path, m, path, bits):
    """Captured once, replayed on new activations: no host sync, no allocation a graph cannot hold, every route."""
    force_path(path)
    q, w = weights(4096, 4096, bits, scale=torch.rand(4096, device="cuda") + 0.1)
    a = acts(m, 4096)
    a_scale = torch.rand(m, device="cuda") + 0.1
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (sets up the split-K workspace, compiles Triton)
        ops.int_matmul(a, a_scale, w, bias=bias)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(g):
            out = ops.int_matmul(a, a_scale, w, bias=bias)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(3):
        a.copy_(acts(m, 4096))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref.int_matmul(a, a_scale, w.data, w.scale, bits, bias, torch.bfloat16))


def test_torch_compile(cuda_backend):
    q, w = weights(520, 640, 8, scale=torch.rand(520, device="cuda") + 0.1)

    def f(x):
        a_q, a_s = ops.quantize_per_token(x, bits=8)
        return ops.int_matmul(a_q, a_s, w, out_dtype=torch.float32).relu()

    x = torch.randn(33, 640, device="cuda")
    # aot_eager traces through the ops' fake implementations exactly as inductor does, without its codegen
    # time (the custom ops are opaque to inductor anyway)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


def test_opcheck_cuda(cuda_backend):
    q, w = weights(40, 96, 6)
    a = acts(5, 96)
    opcheck(torch.ops.hdrq.int_matmul.default,
            (a, torch.rand(5, device="cuda"), w.data, torch.rand(40, device="cuda"), 6, torch.randn(40, device="cuda"),
             torch.bfloat16))
    opcheck(torch.ops.hdrq.int_matmul_int32.default, (a, w.data, 6, 40))
    counters = torch.zeros(16, dtype=torch.int32, device="cuda")
    partials = torch.empty(0, dtype=torch.int32, device="cuda")
    out = torch.empty(5, 40, dtype=torch.float16, device="cuda")
    opcheck(torch.ops.hdrq.int_gemm.default,
            (out, a, torch.rand(1, device="cuda"), w.data, torch.rand(40, device="cuda"), None, counters, partials, 6,
             0, 0, 1))
    q6, w6 = weights(48, 96, 6)
    opcheck(torch.ops.hdrq.expand_w6.default, (torch.empty(48, 96, dtype=torch.int8, device="cuda"), w6.data, 48, 96))
    assert torch.ops.hdrq.gemm_info(0, 0, 8)[0] == 16  # no tensor arguments: the CompositeExplicitAutograd kernel


def test_device_table_routes(cuda_backend, monkeypatch):
    """Under the device's table (no HDRQ_GEMM_PATH) each call runs the path its route names, exactly."""
    monkeypatch.delenv("HDRQ_GEMM_PATH", raising=False)
    dev = torch.cuda.current_device()
    for m in (1, 64, 65, 300, 2048):
        for bits in (6, 8):
            path = cuda_backend.route(m, 256, 256, bits, dev).path
            before = cuda_backend.PATH_CALLS[path]
            q, w = weights(256, 256, bits)
            a = acts(m, 256)
            a_s = torch.rand(m, device="cuda") + 0.1
            assert torch.equal(ops.int_matmul(a, a_s, w), ref.int_matmul(a, a_s, w.data, w.scale, bits, None,
                                                                         torch.bfloat16))
            assert cuda_backend.PATH_CALLS[path] == before + 1, (m, bits, path)


@pytest.mark.parametrize("path", ["decode", "wgmma", "int_mm"])
def test_inputs_a_path_cannot_take_run_the_triton_gemm(cuda_backend, force_path, path):
    """A stride-2 A (the C++ kernels need unit stride), K % 32 != 0 on wgmma, M <= 16 on int_mm: the Triton GEMM
    runs instead, exactly."""
    force_path(path)
    cases = {"decode": (4, 64, 256, True), "wgmma": (4, 64, 100, False), "int_mm": (8, 64, 256, False)}[path]
    m, n, k, strided = cases
    q, w = weights(n, k, 8, scale=torch.rand(n, device="cuda") + 0.1)
    a = acts(m, 2 * k)[:, ::2] if strided else acts(m, k)
    a_s = torch.rand(m, device="cuda") + 0.1
    before = dict(cuda_backend.PATH_CALLS)
    got = ops.int_matmul(a, a_s, w, out_dtype=torch.float32)
    assert torch.equal(got, ref.int_matmul(a, a_s, w.data, w.scale, 8, None, torch.float32))
    assert cuda_backend.PATH_CALLS["triton"] == before.get("triton", 0) + 1
    assert cuda_backend.PATH_CALLS[path] == before.get(path, 0)


@pytest.mark.parametrize("path", ["triton", "int_mm"])
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("m,n,k", [(17, 4104, 300), (300, 272, 640), (64, 14336, 4096)])
def test_triton_and_int_mm_routes_poisoned(cuda_backend, force_path, monkeypatch, path, bits, m, n, k):
    """Every output and workspace the Triton side allocates poisoned (NaN / sentinel): bf16 / fp16 / fp32 outputs
    bit-identical to the reference, per-token and per-tensor scales, with and without bias."""
    from hdrq.kernels import runtime

    def poisoned(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device).fill_(
            float("nan") if dtype.is_floating_point else -0x5A)
    monkeypatch.setattr(runtime, "alloc", poisoned)
    force_path(path)
    q, w = weights(n, k, bits, scale=(torch.rand(n, device="cuda") + 0.05) / 50)
    a = acts(m, k)
    for out_dtype, bias, a_s in ((torch.bfloat16, torch.randn(n, device="cuda").bfloat16(), torch.rand(m)),
                                 (torch.float16, None, torch.rand(1)), (torch.float32, torch.randn(n), torch.rand(m))):
        a_s = (a_s.cuda() + 0.05) / 2000
        bias = None if bias is None else bias.cuda()
        got = ops.int_matmul(a, a_s, w, bias=bias, out_dtype=out_dtype)
        assert torch.equal(got, ref.int_matmul(a, a_s, w.data, w.scale, bits, bias, out_dtype))


@pytest.mark.parametrize("config", range(10))
def test_every_triton_candidate_config(cuda_backend, config):
    """Every tile configuration the tuner may put in a table, at ragged sizes: the exact accumulator and the
    bf16 epilogue."""
    from hdrq.kernels import gemm as kg

    if config >= len(kg.CANDIDATES):
        pytest.skip("fewer candidates")
    cfg = kg.CANDIDATES[config]
    m, n, k, bits = (cfg.bm + 3, 4104, 1000, 8) if config % 2 else (5, 272, 4128, 6)  # one compile per config
    q, w = weights(n, k, bits, scale=torch.rand(n, device="cuda") + 0.1)
    a = acts(m, k)
    a_s = torch.rand(m, device="cuda") + 0.1
    assert torch.equal(kg.int_matmul(a, a_s, w.data, w.scale, bits, None, torch.bfloat16, cfg),
                       ref.int_matmul(a, a_s, w.data, w.scale, bits, None, torch.bfloat16))


def test_public_op_matches_reference_backend(cuda_backend):
    q, w = weights(300, 1000, 6, scale=torch.rand(300, device="cuda"))
    a = acts(7, 1000)
    a_s = torch.rand(7, device="cuda")
    got = ops.int_matmul(a, a_s, w, out_dtype=torch.float16)
    hdrq.set_backend("reference")
    want = ops.int_matmul(a, a_s, w, out_dtype=torch.float16)
    hdrq.set_backend("auto")
    assert torch.equal(got, want)
