"""The GEMM weight layout (hdrq.ops.pack_weight) and a CPU emulation of the CUDA GEMM kernels that use it.

The emulation (tests/gemm_emulator.py) mirrors csrc/gemm_mma.cu statement by statement and runs the
hardware instructions from their PTX definitions, so these tests prove, without a GPU, that the loaders,
the 6-bit expansion, the fragment loads, the pipeline stages, split-K and the epilogue indexing produce
the exact int32 accumulator (and the reference's fp32 output) on awkward shapes.
"""
import random

import numpy as np
import pytest
import torch

import gemm_emulator as E
from hdrq import ops
from hdrq import reference as ref


def rand_weight(n, k, bits, gen=None):
    lo, hi = (-128, 128) if bits == 8 else (-32, 32)
    return torch.randint(lo, hi, (n, k), dtype=torch.int8, generator=gen)


# ------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("n,k", [(1, 4), (3, 8), (15, 28), (16, 32), (17, 36), (16, 64), (32, 32), (48, 96),
                                 (33, 100), (64, 4096), (5, 128), (40, 300), (130, 132)])
def test_pack_unpack_round_trip(bits, n, k):
    q = rand_weight(n, k, bits)
    packed = ops.pack_weight(q, bits)
    assert (packed.bits, packed.shape, packed.layout) == (bits, (n, k), ops.WEIGHT_LAYOUT)
    w = packed.data
    assert w.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert w.shape == ((n, k) if bits == 8 else (n, 3 * k // 4))
    assert torch.equal(ops.unpack_weight(packed), q)
    # a permutation of the canonical bytes (8-bit) / of the canonical values (6-bit)
    if bits == 8:
        assert torch.equal(w.reshape(-1).sort().values, q.reshape(-1).sort().values)


@pytest.mark.parametrize("bits", [6, 8])
def test_pack_weight_odd_k(bits):
    if bits == 6:
        with pytest.raises(ValueError, match="multiple of 4"):
            ops.pack_weight(torch.zeros(16, 33, dtype=torch.int8), 6)
        return
    q = rand_weight(19, 77, 8)
    assert torch.equal(ops.unpack_weight(ops.pack_weight(q, 8)), q)


def test_pack_weight_errors():
    with pytest.raises(ValueError, match=r"\[-32, 31\]"):
        ops.pack_weight(torch.full((16, 32), 32, dtype=torch.int8), 6)
    with pytest.raises(ValueError, match="bits"):
        ops.pack_weight(torch.zeros(4, 8, dtype=torch.int8), 4)
    with pytest.raises(TypeError, match="int8"):
        ops.pack_weight(torch.zeros(4, 8), 8)


def test_small_matrices_keep_canonical_order():
    q = rand_weight(15, 64, 6)
    assert torch.equal(ops.pack_weight(q, 6).data, ops.pack_int6(q))
    q = rand_weight(40, 31, 8)
    assert torch.equal(ops.pack_weight(q, 8).data, q)


@pytest.mark.parametrize("bits", [6, 8])
def test_unit_bytes_match_the_documented_formula(bits):
    """Every byte of region 1, located with the docstring's formula, element by element."""
    n, k = 34, 68  # 2 full panels, 2 full units, a K tail of 4 and an N tail of 2
    q = rand_weight(n, k, bits)
    w = ops.pack_weight(q, bits).data.reshape(-1).view(torch.uint8)
    geo = ref.gemm_layout_geometry(bits, n, k)
    ub = geo["unit_bytes"]
    code = (q.to(torch.int32) & 0x3F)
    for u in range(2):
        for p in range(2):
            base = (u * 2 + p) * ub
            for g in range(8):
                for t in range(4):
                    for b in range(4):
                        lane_byte = 16 * g + 4 * t + b
                        x = [q[16 * p + 8 * (c // 2) + g, 32 * u + 16 * (c % 2) + 4 * t + b] for c in range(4)]
                        if bits == 8:
                            for c in range(4):
                                assert int(w[base + 128 * c + lane_byte].view(torch.int8)) == int(x[c])
                        else:
                            xc = [code[16 * p + 8 * (c // 2) + g, 32 * u + 16 * (c % 2) + 4 * t + b] for c in range(4)]
                            for qq in range(3):
                                expect = ((int(xc[qq]) << 2) | ((int(xc[3]) >> (4 - 2 * qq)) & 3)) & 0xFF
                                assert int(w[base + 128 * qq + lane_byte]) == expect
    # regions 2 and 3: canonical bytes
    canon = (lambda t: t.contiguous().view(torch.uint8).reshape(-1)) if bits == 8 else (
        lambda t: ops.pack_int6(t).reshape(-1))
    assert torch.equal(w[geo["tail_start"]: geo["rest_start"]], canon(q[:32, 64:]))
    assert torch.equal(w[geo["rest_start"]:], canon(q[32:, :]))


def test_expand6_rebuilds_four_times_the_values():
    """The kernel's mask-and-shift expansion of three 6-bit planes gives 4*w in every byte of four registers."""
    x = torch.randint(-32, 32, (4, 32, 4), dtype=torch.int8)  # plane, lane, byte
    code = x.to(torch.int64) & 0x3F
    planes = [((code[q] << 2) | ((code[3] >> (4 - 2 * q)) & 3)) for q in range(3)]
    words = [np.array([int(sum(int(p[lane, b]) << (8 * b) for b in range(4))) for lane in range(32)], dtype=np.uint32)
             for p in planes]
    regs = E.expand6(*words)
    for c in range(4):
        got = regs[c].astype("<u4").view(np.int8).reshape(32, 4)
        assert np.array_equal(got, (4 * x[c].to(torch.int32)).numpy())


def test_layout_constants_match_the_cuda_sources():
    src = (E.CSRC / "gemm_device.cuh").read_text()
    assert f"kPanelRows = {ref.GEMM_PANEL_ROWS};" in src
    assert f"kUnitK = {ref.GEMM_UNIT_K};" in src
    assert f"kPlaneBytes = {ref.GEMM_PLANE_BYTES};" in src
    for bits, (n, k) in [(8, (37, 101)), (6, (50, 132))]:
        g, e = ref.gemm_layout_geometry(bits, n, k), E.geometry(bits, n, k)
        assert (g["full_panels"], g["full_units"], g["k_tail"], g["tail_start"], g["rest_start"]) == (
            e.full_panels, e.full_units, e.k_tail, e.tail_start, e.rest_start)


# ------------------------------------------------------------------------------------------------ emulated kernel


def emulate(config, bits, m, n, k, splits, *, lda=None, a_base=0, scales=False, bias=False, order=None, seed=0,
            a_vals=(-128, 128)):
    gen = torch.Generator().manual_seed(seed)
    T = E.traits(config, bits)
    lda = lda or k
    q = rand_weight(n, k, bits, gen)
    a = torch.randint(*a_vals, (m, k), dtype=torch.int8, generator=gen)
    w = ref.pack_weight(q, bits)
    buf = np.zeros(a_base + m * lda + 64, dtype=np.int8)  # stands for a 16-byte aligned allocation
    for i in range(m):
        buf[a_base + i * lda: a_base + i * lda + k] = a[i].numpy()
    P = E.Problem(buf, a_base, lda, w.reshape(-1).view(torch.uint8).numpy(), m, n, k, bits)
    if scales:
        a_scale = torch.rand(m if m > 1 else 1, generator=gen) + 0.05
        w_scale = torch.rand(n, generator=gen) + 0.05
        b = torch.randn(n, generator=gen) if bias else None
        P.a_scale, P.w_scale, P.bias = a_scale.numpy(), w_scale.numpy(), None if b is None else b.numpy()
        expect = ref.int_matmul(a, a_scale, w, w_scale, bits, b, torch.float32).numpy()
    else:
        expect = ref.int_matmul_acc(a, q).numpy()
    got = E.run_kernel(T, P, splits, order)
    return got, expect


def _reverse(count):
    return list(range(count - 1, -1, -1))


def _shuffled(count):
    idx = list(range(count))
    random.Random(count).shuffle(idx)
    return idx


# (config, bits, M, N, K, splits, options): every config and width, M below / at / above the tile, N and K
# not multiples of the panel (16), unit (32) or stage (BK), unaligned A (byte path), split-K in any order.
CASES = [
    (0, 8, 1, 64, 256, 1, {}),
    (0, 6, 1, 64, 256, 2, {}),
    (0, 8, 3, 40, 100, 2, {}),
    (0, 6, 3, 40, 100, 2, {"order": _reverse}),
    (0, 6, 16, 17, 36, 1, {}),
    (0, 8, 17, 33, 77, 1, {}),                        # K odd: byte-wise A; two M tiles
    (0, 6, 5, 130, 300, 3, {"order": _shuffled}),
    (0, 8, 2, 16, 32, 1, {}),
    (0, 6, 2, 8, 4, 1, {}),                           # N < 16 and K < 32: all canonical
    (1, 8, 20, 33, 77, 1, {"lda": 80, "a_base": 16}),  # lda > K, aligned
    (1, 6, 32, 48, 160, 2, {"lda": 164, "a_base": 4}),  # unaligned rows: byte path
    (2, 6, 64, 48, 512, 4, {"order": _shuffled}),
    (2, 8, 37, 70, 200, 2, {}),
    (3, 8, 70, 130, 200, 2, {}),
    (3, 6, 65, 20, 96, 1, {}),
    (4, 6, 129, 20, 96, 1, {}),
    (4, 8, 129, 136, 100, 2, {"order": _reverse}),
    (0, 6, 1, 48, 256, 1, {"a_vals": (0, 64)}),     # unsigned 6-bit activations
    (5, 8, 1, 80, 600, 2, {}),                        # K step 256: partial last stage
    (5, 6, 9, 40, 548, 1, {}),
    (6, 8, 3, 70, 1100, 1, {}),                       # 8 stages, more k-tiles than stages
    (6, 6, 16, 33, 300, 2, {"order": _reverse}),
    (7, 8, 20, 150, 200, 2, {}),                      # 32 x 128: two panels per warp, partial panels
    (7, 6, 32, 136, 160, 1, {}),
    (8, 8, 64, 140, 160, 1, {}),
    (8, 6, 50, 130, 300, 2, {"order": _shuffled}),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "cfg{}-w{}-M{}-N{}-K{}-s{}".format(*CASES[i][:6]))
def test_emulated_kernel_accumulator_is_exact(case):
    config, bits, m, n, k, splits, opts = CASES[case]
    got, expect = emulate(config, bits, m, n, k, splits, **opts)
    assert np.array_equal(got, expect)


@pytest.mark.parametrize("config,bits,m,n,k,splits,bias", [
    (0, 6, 1, 40, 100, 2, True), (2, 8, 33, 24, 64, 1, False), (3, 6, 70, 17, 128, 2, True)])
def test_emulated_kernel_epilogue_matches_reference_bitwise(config, bits, m, n, k, splits, bias):
    got, expect = emulate(config, bits, m, n, k, splits, scales=True, bias=bias)
    assert np.array_equal(got, expect)  # same fp32 operations in the same order: identical bits


def test_emulation_detects_a_wrong_layout(monkeypatch):
    """The emulated kernel fails when the weights are not in the layout it expects (the test can fail)."""
    got, expect = emulate(0, 8, 3, 32, 64, 1)
    assert np.array_equal(got, expect)
    monkeypatch.setattr(ref, "pack_weight", lambda q, bits: q.contiguous())  # canonical order instead
    got, expect = emulate(0, 8, 3, 32, 64, 1)
    assert not np.array_equal(got, expect)


def test_emulation_detects_swapped_fragments(monkeypatch):
    """Feeding the mma the B registers of the other n8 block is caught."""
    orig = E.mma_s8_16832
    calls = {"n": 0}

    def swapped(d, a, b0, b1):
        calls["n"] += 1
        return orig(d, a, b1, b0)

    monkeypatch.setattr(E, "mma_s8_16832", swapped)
    got, expect = emulate(0, 6, 3, 32, 64, 1)
    assert calls["n"] > 0 and not np.array_equal(got, expect)


def test_emulator_parses_every_config():
    configs = E.parse_configs()
    assert sorted(configs) == list(range(9))
    for c, (mf, wm, wn, npw, bku, stages) in configs.items():
        t = E.traits(c, 8)
        assert t.BM % 16 == 0 and t.BN % 16 == 0 and t.BK % 32 == 0 and stages >= 2


# ------------------------------------------------------------------------------------------------ CUDA glue on CPU

_GLUE_SCRIPT = r'''
import sys, types, re, pathlib, torch
sys.path.insert(0, {tests!r})
import gemm_emulator as E
from hdrq import ops
# Stand-in for the extension: gemm_info from the CUDA sources' own tile constants (the schemas are hdrq.ops').
sys.modules["hdrq._C"] = types.ModuleType("hdrq._C")
COUNTERS = 1 << int(re.search(r"kSplitKCounters = 1 << (\d+);", (E.CSRC / "gemm.h").read_text()).group(1))
WIDE, NARROW = (int(x) for x in re.search(r"kBN = kWide \? (\d+) : (\d+);",
                                            (E.CSRC / "gemm_wgmma.cu").read_text()).groups())
DECODE_BM = int(re.search(r"kBM = kDecode \? (\d+) : 128;", (E.CSRC / "gemm_wgmma.cu").read_text()).group(1))
def gemm_info(path, config, w_bits):
    if path == 1:
        if config == 3:
            return [DECODE_BM, NARROW, 128, 256, 0, COUNTERS]
        if config == 4 and w_bits == 6:
            return [0, 0, 0, 0, 0, COUNTERS]  # the cluster configuration takes 8-bit weights only
        return [128, WIDE if config in (2, 4) else NARROW, 128, 384, 0, COUNTERS]
    t = E.traits(config, w_bits)
    return [t.BM, t.BN, t.BK, t.threads, t.STAGES * t.stage_bytes, COUNTERS]
lib = torch.library.Library("hdrq", "IMPL")
lib.impl("gemm_info", gemm_info, "CompositeExplicitAutograd")
import hdrq._cuda as c
assert c.EXTENSION_ERROR is None
c._device_info = lambda index: (90, 132)
dev = torch.device("cuda", 0)
out = {{}}
for m, n, k, bits in [(1, 4096, 4096, 6), (1, 14336, 4096, 8), (16, 4096, 4096, 6), (16, 4096, 14336, 8),
                      (33, 4096, 4096, 8), (64, 4096, 4096, 6), (64, 4096, 14336, 8), (1, 8, 4, 6)]:
    p = c.plan(m, n, k, bits, dev, "decode")
    out[(m, n, k, bits)] = (p.path, p.bm, p.bn, p.splits)
for m in (65, 2048):
    p = c.plan(m, 4096, 4096, 8, dev, "mma")
    out[("mma", m)] = (p.path, p.bm, p.bn, p.splits)
for m, n, k in [(2048, 4096, 4096), (2048, 4104, 4096), (2048, 4096, 4100)]:
    for path in ("wgmma", "wgmma_pp", "wgmma256", "wgmma_mc"):
        try:
            p = c.plan(m, n, k, 8, dev, path)
            out[(path, m, n, k)] = (p.path, p.config, p.bn)
        except c.CannotRun as e:
            out[(path, m, n, k)] = "unsupported"
for m, n, k in [(64, 4096, 4096), (1, 4096, 14336), (64, 14336, 4096), (1, 3072, 4096)]:
    p = c.plan(m, n, k, 8, dev, "wgmma_decode")
    out[("wgmma_decode", m, n, k)] = (p.path, p.config, p.bm, p.bn, p.splits)
try:
    c.plan_for_config(64, 4104, 2080, 8, "wgmma_decode", 2, dev)
except c.CannotRun:
    out["wgmma_decode-override-N"] = "unsupported"
p = c.plan_for_config(64, 4096, 2080, 6, "wgmma_decode", 5, dev)
out["wgmma_decode-override"] = (p.path, p.config, p.splits, p.bm)
p = c.plan(2048, 4096, 4096, 6, dev, "wgmma_mc")
out["wgmma_mc-6bit"] = (p.path, p.config, p.bn, p.expand)
out["x8"] = [(p.path, p.expand) for p in (c.plan(2048, 4096, 4096, b, dev, "wgmma_pp", expand=True) for b in (6, 8))]
out["x8-off"] = c.plan(2048, 4096, 4096, 6, dev, "wgmma").expand
c._device_info = lambda index: (80, 108)
try:
    c.plan(4096, 4096, 4096, 8, dev, "wgmma")
except c.CannotRun:
    out["a100-wgmma"] = "unsupported"
# routing: the shipped H100 table by the device's name, the generic rules elsewhere, HDRQ_GEMM_PATH over both
import os
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_name = lambda index=None: "NVIDIA H100 80GB HBM3"
r = {{(m, b): c.route(m, 4096, 4096, b, 0) for m in (1, 64, 65, 1024, 2048) for b in (6, 8)}}
out["h100"] = {{key: (v.path, v.config.bm if v.config else None) for key, v in r.items()}}
out["h100-source"] = c.routing_table(0).meta["measured_on_device"]
c.set_routing_table(None, 0)
torch.cuda.get_device_name = lambda index=None: "Some Other GPU"
out["generic"] = {{m: c.route(m, 4096, 4096, 8, 0).path for m in (1, 64, 65)}}
os.environ["HDRQ_GEMM_PATH"] = "int_mm"
out["forced"] = c.route(1, 4096, 4096, 8, 0).path
os.environ["HDRQ_GEMM_PATH"] = "triton"
out["forced-triton"] = c.route(1, 4096, 4096, 8, 0).config.bm
del os.environ["HDRQ_GEMM_PATH"]
out["registered"] = torch._C._dispatch_has_kernel_for_dispatch_key("hdrq::int_matmul", "CompositeExplicitAutograd")
print(repr(out))
'''


def test_cuda_glue_plans_on_cpu():
    """hdrq/_cuda.py imports, plans (paths, tiles, split-K) and routes with a stand-in for the compiled
    extension."""
    import ast
    import os
    import subprocess
    import sys

    script = _GLUE_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("HDRQ_GEMM_PATH", "HDRQ_GEMM_TABLE", "HDRQ_W6_EXPAND")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    # split-K aims at the fitted 1 block per SM for M <= 16 (GemmDispatch.decode_configs, 132 SMs here)
    assert out[(1, 4096, 4096, 6)] == ("decode", 16, 64, 3)       # 64 tiles -> 3 splits
    assert out[(1, 14336, 4096, 8)] == ("decode", 16, 64, 1)      # 224 tiles already fill the GPU
    assert out[(64, 4096, 14336, 8)] == ("decode", 64, 64, 4)     # 1.5 blocks per SM for M <= 64
    assert out[(16, 4096, 4096, 6)][:3] == ("decode", 16, 64) and 1 < out[(16, 4096, 4096, 6)][3] <= 5
    assert out[(33, 4096, 4096, 8)][:3] == ("decode", 64, 64)
    assert out[(64, 4096, 4096, 6)][:3] == ("decode", 64, 64)
    assert out[(1, 8, 4, 6)] == ("decode", 16, 64, 1)
    assert out[("mma", 65)][:3] == ("mma", 64, 128) and out[("mma", 2048)] == ("mma", 128, 128, 1)
    assert out[("wgmma", 2048, 4096, 4096)] == ("wgmma", 0, 128)          # WgmmaConfig: cooperative
    assert out[("wgmma_pp", 2048, 4096, 4096)] == ("wgmma_pp", 1, 128)    # ping-pong
    assert out[("wgmma256", 2048, 4096, 4096)] == ("wgmma256", 2, 256)    # cooperative, 128 x 256
    assert out[("wgmma_mc", 2048, 4096, 4096)] == ("wgmma_mc", 4, 256)    # clusters with weight multicast
    assert out["wgmma_mc-6bit"] == ("wgmma_mc", 4, 256, True)             # 8-bit only: 6-bit is expanded first
    for path in ("wgmma", "wgmma_pp", "wgmma256", "wgmma_mc"):
        assert out[(path, 2048, 4104, 4096)] == "unsupported"       # N % 16
        assert out[(path, 2048, 4096, 4100)] == "unsupported"       # K % 32
    assert out["a100-wgmma"] == "unsupported"
    # wgmma decode: 64 x 128 tiles, split-K to ~2 items per SM (132 SMs), capped by the partial traffic
    assert out[("wgmma_decode", 64, 4096, 4096)] == ("wgmma_decode", 3, 64, 128, 8)    # 32 tiles x 8 = 256
    assert out[("wgmma_decode", 1, 4096, 14336)] == ("wgmma_decode", 3, 64, 128, 8)    # 9 > partial buffer
    assert out[("wgmma_decode", 64, 14336, 4096)] == ("wgmma_decode", 3, 64, 128, 2)   # 112 x 3 > partial buffer
    assert out["wgmma_decode-override"] == ("wgmma_decode", 3, 5, 64)
    assert out["wgmma_decode-override-N"] == "unsupported"                               # N % 16
    # 32 k-tiles: the target 10 splits would be 4 k-tiles each with two splits all padding -> 8 splits of 4
    assert out[("wgmma_decode", 1, 3072, 4096)] == ("wgmma_decode", 3, 64, 128, 8)
    # 6-bit expansion on a wgmma path: as asked (8-bit weights never expand)
    assert out["x8"] == [("wgmma_pp", True), ("wgmma_pp", False)] and out["x8-off"] is False
    # the shipped H100 table: decode up to M = 64; then Triton (8-bit), mma then Triton (6-bit); marked unmeasured
    h = out["h100"]
    assert h[(1, 8)][0] == h[(64, 8)][0] == h[(1, 6)][0] == h[(64, 6)][0] == "decode"
    assert h[(65, 8)] == h[(2048, 8)] == ("triton", 128) and h[(2048, 6)] == ("triton", 128)
    assert h[(65, 6)][0] == h[(1024, 6)][0] == "mma"
    assert out["h100-source"] is False
    assert out["generic"] == {1: "decode", 64: "decode", 65: "triton"}
    assert out["forced"] == "int_mm" and out["forced-triton"] == 16
    assert out["registered"]


# ------------------------------------------------------------------------------------------------ 6 -> 8 expansion

def _sar2x4_from_source():
    """csrc/gemm_expand.cu's sar2x4, evaluated on numpy uint32 words (its two statements, C -> Python)."""
    import re

    src = (E.CSRC / "gemm_expand.cu").read_text()
    body = re.search(r"uint32_t sar2x4\(uint32_t r\) \{\n\s*const uint32_t s = (.+?);\n\s*return (.+?);\n", src)
    assert body, "sar2x4 not found in csrc/gemm_expand.cu"
    py = [re.sub(r"(0x[0-9A-Fa-f]+)u", r"np.uint32(\1)", e) for e in body.groups()]

    def sar2x4(r):
        s = eval(py[0], {"np": np, "r": r})
        return eval(py[1], {"np": np, "r": r, "s": s})
    return sar2x4


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (272, 544)])
def test_expand_w6_emulated_equals_8bit_layout(n, k):
    """The expansion kernel's per-quad work (three 16-byte loads of a 6-bit unit, expand6, sar2x4, four
    16-byte stores into the 8-bit unit), emulated on the CPU: pack_weight(q, 6) becomes pack_weight(q, 8)."""
    src = (E.CSRC / "gemm_expand.cu").read_text()
    # the kernel's addressing, pinned (unit = i / 8, quad = i % 8; planes 128 bytes apart)
    assert "const uint8_t* src = w6 + unit * layout::unit_bytes(6) + quad * 16;" in src
    assert "uint8_t* dst = w8 + unit * layout::unit_bytes(8) + quad * 16;" in src
    sar2x4 = _sar2x4_from_source()
    gen = torch.Generator().manual_seed(n + k)
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8, generator=gen)
    w6 = ops.pack_weight(q, 6).data.reshape(-1).view(torch.uint8).numpy()
    want = ops.pack_weight(q, 8).data.reshape(-1).view(torch.uint8).numpy()
    w8 = np.full(n * k, 0x5A, dtype=np.uint8)
    units = (n // 16) * (k // 32)
    for i in range(units * 8):
        unit, quad = i // 8, i % 8
        s0 = unit * 384 + quad * 16
        planes = [w6[s0 + p * 128: s0 + p * 128 + 16].view("<u4").astype(np.uint32) for p in range(3)]
        regs = E.expand6(*planes)
        d0 = unit * 512 + quad * 16
        for c in range(4):
            w8[d0 + c * 128: d0 + c * 128 + 16] = sar2x4(np.asarray(regs[c], dtype=np.uint32)).astype("<u4").view(np.uint8)
    assert np.array_equal(w8, want)


def test_sar2x4_is_a_per_byte_arithmetic_shift():
    sar2x4 = _sar2x4_from_source()
    vals = np.arange(-32, 32, dtype=np.int64)  # w; the input bytes are 4 * w
    words = ((4 * vals) & 0xFF).astype(np.uint32)
    words = words | (words[::-1] << 8) | (words << 16) | (words[::-1] << 24)
    out = sar2x4(words)
    for b, expect in enumerate([vals, vals[::-1], vals, vals[::-1]]):
        got = ((out >> (8 * b)) & 0xFF).astype(np.uint8).view(np.int8)
        assert np.array_equal(got, expect)
