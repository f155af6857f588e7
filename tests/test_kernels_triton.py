"""The Triton kernels (hdrq.kernels) against the references, through the hdrq.ops seam.

On a CPU machine these run under TRITON_INTERPRET=1 on tiny, awkward shapes (the interpreter is slow); with
a GPU they run the same cases on CUDA tensors, and the tests marked ``cuda`` add large shapes. Every output
and workspace the kernels allocate is poisoned first (NaN / out-of-range sentinels through
``hdrq.kernels.runtime.alloc``), so an element a kernel forgets to write shows up as a mismatch.

Bar: outputs bit-identical to hdrq.reference in every dtype (fp32 math and one rounding in both); the scale
gradient ``ds`` is a sum, so it is compared with a tolerance and checked bitwise only run against run.
"""
import math
import os
import warnings

import pytest
import torch

import hdrq
from hdrq import ops
from hdrq import reference as ref

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"

pytestmark = [
    pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="the Triton kernels need a GPU or TRITON_INTERPRET=1"),
    # numpy's warnings from the interpreter on values the kernels compute and then discard (0/0 in the
    # histogram sampler of an empty group, 1/0 for an all-zero row)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),  # numpy 2.3, triton 3.6
]

if INTERPRET or HAS_CUDA:
    from hdrq.kernels import per_token as kpt
    from hdrq.kernels import quantizer as kq
    from hdrq.kernels import runtime as krt

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SENTINEL = {torch.int8: -128, torch.int32: -(2**31), torch.int64: -(2**63)}  # values no kernel writes


def _poisoned_alloc(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan") if dtype.is_floating_point else SENTINEL[dtype])


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setattr(krt, "alloc", _poisoned_alloc)
    hdrq.set_backend("triton")
    yield
    hdrq.set_backend("auto")


def rand_x(shape, dtype=torch.float32, seed=0, scale=2.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def rand_scale(shape, axis, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    n = 1 if axis is None else shape[axis]
    s = 0.05 + 0.45 * torch.rand(n, generator=g)
    return (s.reshape(()) if axis is None else s).to(device)


def assert_same(a, b, zeros_equal=False):
    """Bit-for-bit equality (so -0.0 != 0.0); any NaN matches any NaN (payloads differ across devices).

    ``zeros_equal``: +0.0 matches -0.0, for comparisons with the reference run on CUDA tensors, whose
    torch.clamp returns +0.0 for clamp(-0.0, min=0) where the CPU's (the definition) returns -0.0."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.is_floating_point() and zeros_equal:
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    elif a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        nan = torch.isnan(a)
        same = (a.contiguous().view(bits) == b.contiguous().view(bits)) | (nan & torch.isnan(b))
    else:
        same = a == b
    if not bool(same.all()):
        bad = (~same).nonzero()[:4].tolist()
        raise AssertionError(f"{int((~same).sum())} of {a.numel()} elements differ, e.g. at {bad}: "
                             f"{[a[tuple(i)].item() for i in bad]} vs {[b[tuple(i)].item() for i in bad]}")


def assert_ds_close(ds, expect, terms):
    """``ds`` against the reference sum: the error bound of an fp32 sum of the |terms|."""
    assert ds.dtype == expect.dtype and ds.shape == expect.shape
    tol = 1e-5 * (terms.abs().sum() if terms.numel() else 0.0) + 1e-6
    err = (ds.double() - expect.double()).abs().max() if ds.numel() else 0.0
    assert err <= tol, f"ds differs by {float(err)} > {float(tol)}: {ds} vs {expect}"


# (shape, axis, bits, signed, max_block): every LAYOUT of hdrq/kernels/quantizer.py, odd sizes, and (max_block=16)
# channels split over several programs, so both the unmasked full-chunk path and the masked tail run and
# ds goes through the second reduction kernel.
CASES = [
    ((), None, 4, True, None),
    ((1,), None, 8, False, None),
    ((17,), None, 3, True, None),
    ((1, 1), 0, 2, True, None),
    ((3, 17, 5), None, 4, False, None),
    ((3, 17, 5), None, 4, True, 16),  # layout 0, 16 programs, the last one masked
    ((17, 5), 0, 4, True, None),  # layout 1, inner 5: unaligned Philox lanes
    ((6, 24), 0, 5, True, 16),  # layout 1 aligned, 2 chunks per channel
    ((7, 12), -2, 8, False, None),  # layout 1, inner 12: VEC 4 for 16-bit types
    ((2, 3, 8), 1, 6, True, None),  # layout 2: one division per sub-row
    ((4, 3, 16), 1, 3, False, 16),  # layout 2, several chunks
    ((3, 17, 5), 1, 4, True, None),  # layout 3: one division per element
    ((5, 7), 1, 2, False, 16),  # layout 3, inner 1 (per-channel on the last dim)
    ((3, 1, 5), 1, 7, True, None),  # C == 1 on an axis: layout 0
]
CASE_IDS = [f"{s}-ax{a}-b{b}{'s' if sg else 'u'}-blk{mb}" for s, a, b, sg, mb in CASES]
QUANTIZERS = ["hard", "uniform", "histogram", "qdrop_hard", "qdrop_uniform", "qdrop_histogram"]


def run_quantizer(kind, x, s, bits, signed, axis, seed=1234):
    if kind == "hard":
        return ops.fake_quant(x, s, bits=bits, signed=signed, axis=axis)
    if kind in ("uniform", "histogram"):
        return ops.noise_fake_quant(x, s, bits=bits, signed=signed, axis=axis, seed=seed, mode=kind)
    noise, mode = kind != "qdrop_hard", "histogram" if kind == "qdrop_histogram" else "uniform"
    return ops.qdrop_fake_quant(x, s, bits=bits, signed=signed, axis=axis, seed=seed, p=0.4, noise=noise,
                                mode=mode)


def reference_backward(kind, g, x, s, bits, signed, axis, seed=1234):
    if kind == "hard":
        return ref.fake_quant_backward(g, x, s, bits, signed, axis)
    if kind in ("uniform", "histogram"):
        return ref.noise_fake_quant_backward(g, x, s, bits, signed, axis, seed, kind)
    noise, mode = kind != "qdrop_hard", "histogram" if kind == "qdrop_histogram" else "uniform"
    return ref.qdrop_fake_quant_backward(g, x, s, bits, signed, axis, seed, 0.4, noise, mode)


def kernel_backward(kind, g, x, s, bits, signed, axis, seed=1234):
    """The Triton backward called directly (with any grad dtype, unlike autograd)."""
    if kind == "hard":
        return kq.fake_quant_backward(g, x, s, bits, signed, axis)
    if kind in ("uniform", "histogram"):
        return kq.noise_fake_quant_backward(g, x, s, bits, signed, axis, seed, kind)
    noise, mode = kind != "qdrop_hard", "histogram" if kind == "qdrop_histogram" else "uniform"
    return kq.qdrop_fake_quant_backward(g, x, s, bits, signed, axis, seed, 0.4, noise, mode)


def ds_terms(kind, g, x, s, bits, signed, axis):
    """Per-element ds terms, for the tolerance of the ds comparison (their magnitude is at most qmax*|g|)."""
    qmin, qmax = ref.qrange(bits, signed)
    return g.double() * max(abs(qmin), abs(qmax), 1)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", QUANTIZERS)
def test_quantizer_fp32_forward_backward(kind, case, monkeypatch):
    shape, axis, bits, signed, max_block = case
    if max_block:
        monkeypatch.setattr(kq, "MAX_BLOCK", max_block)
    x = rand_x(shape)
    s = rand_scale(shape, axis)
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    y = run_quantizer(kind, xr, sr, bits, signed, axis)
    hdrq.set_backend("reference")
    expect = run_quantizer(kind, x, s, bits, signed, axis)
    assert_same(y, expect)
    g = rand_x(shape, seed=7)
    hdrq.set_backend("triton")
    y.backward(g)  # autograd of the hdrq custom op -> the Triton backward kernel
    dx, ds = reference_backward(kind, g, x, s, bits, signed, axis)
    assert_same(xr.grad, dx)
    assert_ds_close(sr.grad, ds, ds_terms(kind, g, x, s, bits, signed, axis))


HALF_CASES = [CASES[i] for i in (2, 5, 6, 7, 8, 9, 11)]


@pytest.mark.parametrize("case", HALF_CASES, ids=[CASE_IDS[CASES.index(c)] for c in HALF_CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["hard", "uniform", "qdrop_histogram"])
def test_quantizer_half_dtypes(kind, dtype, case, monkeypatch):
    shape, axis, bits, signed, max_block = case
    if max_block:
        monkeypatch.setattr(kq, "MAX_BLOCK", max_block)
    x = rand_x(shape, dtype)
    s = rand_scale(shape, axis)
    y = run_quantizer(kind, x, s, bits, signed, axis)
    assert y.dtype == dtype
    hdrq.set_backend("reference")
    assert_same(y, run_quantizer(kind, x, s, bits, signed, axis))
    g = rand_x(shape, dtype, seed=7)
    dx, ds = kernel_backward(kind, g, x, s, bits, signed, axis)
    rdx, rds = reference_backward(kind, g, x, s, bits, signed, axis)
    assert_same(dx, rdx)
    assert_ds_close(ds, rds, ds_terms(kind, g, x, s, bits, signed, axis))


@pytest.mark.parametrize("kind", ["hard", "uniform", "histogram", "qdrop_uniform"])
def test_strided_inputs_and_scales(kind):
    """Non-contiguous x, grad and scale (the kernels copy x and grad to contiguous once)."""
    base = rand_x((6, 20))
    x = base[:, ::2].t()  # [10, 6], strides (2, 20)
    s = rand_scale((12,), 0)[::2]  # 6 scales, stride 2
    g = rand_x((6, 10), seed=3).t()
    assert not x.is_contiguous() and not s.is_contiguous() and not g.is_contiguous()
    y = run_quantizer(kind, x, s, 4, True, 1)
    dx, ds = kernel_backward(kind, g, x, s, 4, True, 1)
    hdrq.set_backend("reference")
    assert_same(y, run_quantizer(kind, x, s, 4, True, 1).contiguous())
    rdx, rds = reference_backward(kind, g, x, s, 4, True, 1)
    assert_same(dx, rdx.contiguous())
    assert_ds_close(ds, rds, g.double() * 8)


def test_scale_dtypes():
    """Scales in any float dtype (fp64 too) are rounded to fp32 like the reference; ds comes back in it."""
    x = rand_x((4, 9))
    for sdt in (torch.float64, torch.bfloat16, torch.float16):
        s = rand_scale((4, 9), 0).to(sdt)
        assert_same(kq.noise_fake_quant(x, s, 4, True, 0, 5, "uniform"),
                    ref.noise_fake_quant(x, s, 4, True, 0, 5, "uniform"))
        dx, ds = kq.fake_quant_backward(x, x, s, 4, True, 0)
        rdx, rds = ref.fake_quant_backward(x, x, s, 4, True, 0)
        assert_same(dx, rdx)
        assert ds.dtype == sdt
        torch.testing.assert_close(ds.double(), rds.double(), rtol=1e-2 if sdt != torch.float64 else 1e-5,
                                   atol=1e-3)


def test_non_finite_inputs_follow_the_reference():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-42, -1e-42, 3.0e38, 0.75],
                     device=DEVICE)
    s = torch.tensor(0.5, device=DEVICE)
    g = torch.ones_like(x)
    for signed in (True, False):
        assert_same(kq.fake_quant(x, s, 4, signed, None), ref.fake_quant(x, s, 4, signed, None))
        for mode in ("uniform", "histogram"):
            assert_same(kq.noise_fake_quant(x, s, 4, signed, None, 9, mode),
                        ref.noise_fake_quant(x, s, 4, signed, None, 9, mode))
        assert_same(kq.fake_quant_backward(g, x, s, 4, signed, None)[0],
                    ref.fake_quant_backward(g, x, s, 4, signed, None)[0])
        assert_same(kq.noise_fake_quant_backward(g, x, s, 4, signed, None, 9, "uniform")[0],
                    ref.noise_fake_quant_backward(g, x, s, 4, signed, None, 9, "uniform")[0])
    # round half to even at the ties, and bf16 rounding to nearest even on the way out
    x = torch.tensor([0.25, 0.75, -0.25, -0.75, 1.25, 3.75, -3.75, -0.1, -0.0], device=DEVICE)
    assert_same(kq.fake_quant(x, s, 4, True, None), ref.fake_quant(x, s, 4, True, None))
    xb = (torch.arange(-300, 300, device=DEVICE) * 0.0137).bfloat16()
    assert_same(kq.fake_quant(xb, torch.tensor(0.0031, device=DEVICE), 8, True, None),
                ref.fake_quant(xb, torch.tensor(0.0031, device=DEVICE), 8, True, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
def test_grid_edge_values_follow_the_reference(axis, signed, dtype):
    """Exact ``s*qmin`` / ``s*qmax`` values and exact zeros (the clamped, noise-free bounds of the noise
    quantizer, left out of the histogram) in every kernel, forward, backward and histogram. Power-of-two
    scales, so the bounds are exact in every dtype."""
    bits, shape = 4, (5, 24)
    qmin, qmax = ref.qrange(bits, signed)
    g = torch.Generator().manual_seed(int(signed) + 2 * (axis is None))
    scale = (2.0 ** -torch.randint(1, 5, (shape[0],), generator=g).float())
    scale = scale[0] if axis is None else scale
    s = (scale if axis is None else scale[:, None]).expand(shape)
    x = (torch.rand(shape, generator=g) * (qmax - qmin) + qmin) * s
    pick = torch.randint(0, 5, shape, generator=g)
    x = torch.where(pick == 0, s * qmin, torch.where(pick == 1, s * qmax, torch.where(pick == 2, 0.0, x)))
    x = torch.where(pick == 3, s * (qmax + 2), x).to(dtype).to(DEVICE)
    scale = scale.to(DEVICE)
    grad = rand_x(shape, dtype, seed=4)
    for kind in QUANTIZERS:
        y = run_quantizer(kind, x, scale, bits, signed, axis)
        dx, ds = kernel_backward(kind, grad, x, scale, bits, signed, axis)
        hdrq.set_backend("reference")
        assert_same(y, run_quantizer(kind, x, scale, bits, signed, axis))
        rdx, rds = reference_backward(kind, grad, x, scale, bits, signed, axis)
        hdrq.set_backend("triton")
        assert_same(dx, rdx)
        assert_ds_close(ds, rds, ds_terms(kind, grad, x, scale, bits, signed, axis))
    assert torch.equal(kq.rounding_error_histogram(x, scale, bits, signed, axis),
                       ref.rounding_error_histogram(x, scale, bits, signed, axis))


@pytest.mark.parametrize("shape,axis", [((0,), None), ((3, 0), 0), ((0, 4), 1), ((2, 0, 3), 2)])
def test_empty(shape, axis):
    x = torch.empty(shape, device=DEVICE)
    s = rand_scale(shape, axis)
    for kind in ("hard", "uniform", "histogram", "qdrop_uniform"):
        assert run_quantizer(kind, x, s, 4, True, axis).shape == shape
    dx, ds = kq.noise_fake_quant_backward(x, x, s, 4, True, axis, 3, "histogram")
    assert dx.shape == shape and torch.equal(ds, torch.zeros_like(s))
    assert ops.uniform_noise([0, 3], 5, DEVICE).shape == (0, 3)


@pytest.mark.parametrize("case", [CASES[i] for i in (4, 7, 11, 12)])
def test_rounding_error_histogram_counts(case, monkeypatch):
    shape, axis, bits, signed, max_block = case
    if max_block:
        monkeypatch.setattr(kq, "MAX_BLOCK", max_block)
    x, s = rand_x(shape, seed=5), rand_scale(shape, axis)
    assert torch.equal(kq.rounding_error_histogram(x, s, bits, signed, axis),
                       ref.rounding_error_histogram(x, s, bits, signed, axis))


# ---------------------------------------------------------------------------------------------- noise

SEEDS = [0, 1, 2**31 - 1, 2**31 + 5, 2**32 + 3, 2**62 + 12345, 2**63 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_noise_matches_reference(seed):
    """In-kernel Philox equals hdrq.reference's for seeds typed int32, uint32 and int64 by Triton."""
    for shape in ([1], [3], [17], [2, 5, 7]):
        assert_same(ops.uniform_noise(shape, seed, DEVICE), ref.uniform_noise(shape, seed, DEVICE))


def test_uniform_noise_large_and_prefix_stable():
    u = ops.uniform_noise([5001], 77, DEVICE)
    assert_same(u, ref.uniform_noise([5001], 77, DEVICE))
    assert_same(ops.uniform_noise([13], 77, DEVICE), u[:13])  # element i depends on (seed, i) only


def test_noise_statistics():
    """The in-kernel noise: range [-0.5, 0.5), mean 0, variance 1/12, uniform (KS), no correlation between
    neighbours (lags 1..5: lanes of one Philox call and the next call), rows or seeds."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 1 << 18
    u = ops.uniform_noise([n], 2024, DEVICE).double().cpu()
    assert u.min() >= -0.5 and u.max() < 0.5
    sd = math.sqrt(1 / 12 / n)
    assert abs(u.mean()) < 5 * sd
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # var of U^2: 1/80 - 1/144 = 1/180
    assert scipy_stats.kstest(u.numpy() + 0.5, "uniform").pvalue > 1e-4

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    bound = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 4, 5):
        assert abs(corr(u[:-lag], u[lag:])) < bound, lag
    rows = u.reshape(512, 512)
    assert abs(corr(rows[:-1].reshape(-1), rows[1:].reshape(-1))) < 5 / math.sqrt(rows[1:].numel())
    v = ops.uniform_noise([n], 2025, DEVICE).double().cpu()
    assert abs(corr(u, v)) < bound
    w = ops.uniform_noise([n], ref.mix_seed(2024, 1), DEVICE).double().cpu()  # the QDrop mask stream
    assert abs(corr(u, w)) < bound


def test_noise_fake_quant_noise_is_the_uniform_stream():
    """x = 0 with a power-of-two scale: y = s*u exactly, so the kernel's noise is visible element by element."""
    x = torch.zeros(3, 333, device=DEVICE)
    s = torch.tensor(0.25, device=DEVICE)
    y = ops.noise_fake_quant(x, s, bits=8, seed=99)
    assert_same(y / 0.25, ops.uniform_noise([3, 333], 99, DEVICE))


def test_histogram_mode_follows_its_histogram():
    """Histogram-mode noise from the kernel follows the group's rounding-error histogram (chi-square), never
    leaves its support, and differs from uniform noise."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 14
    base = torch.randint(-5, 5, (2, n), generator=g).float()
    frac = torch.stack([0.3 + 0.05 * torch.rand(n, generator=g), -0.2 + 0.1 * torch.rand(n, generator=g)])
    s = torch.tensor([2.0**-6, 2.0**-5])
    x = ((base + frac) * s[:, None]).to(DEVICE)
    s = s.to(DEVICE)
    y = ops.noise_fake_quant(x, s, bits=4, axis=0, seed=11, mode="histogram")
    u = ((y.double() - x.double()) / s.double()[:, None]).cpu()  # |error| < 2**-20 from rounding of y
    counts = ref.rounding_error_histogram(x, s, 4, True, 0).double().cpu()
    for c in range(2):
        p = counts[c] / counts[c].sum()
        drawn = torch.clamp(torch.floor((u[c] + 0.5) * 256), 0, 255).long()
        obs = torch.bincount(drawn, minlength=256).double()
        support = p > 0
        # edges of the support can move by one bin from the 2**-20 error of recovering u from y
        near = support | torch.roll(support, 1) | torch.roll(support, -1)
        assert obs[~near].sum() == 0
        expect = p[support] * n
        chi2 = ((obs[support] - expect) ** 2 / expect).sum()
        dof = int(support.sum()) - 1
        assert chi2 < dof + 8 * math.sqrt(2 * dof) + 20
    assert (u[0] + 0.325).abs().mean() < 0.05 and (u[1] - 0.15).abs().mean() < 0.05  # not uniform noise


def test_qdrop_mask_rate_and_stream():
    x = rand_x((64, 64))
    s = torch.tensor(1e-3, device=DEVICE)  # everything quantizes to the bounds: kept elements are visible
    for p in (0.0, 0.3, 1.0):
        y = ops.qdrop_fake_quant(x, s, bits=4, seed=5, p=p)
        keep = y == x
        assert_same(keep, ref.drop_mask(x.shape, 5, p, DEVICE))
        assert abs(float(keep.float().mean()) - p) < 0.03


def test_deterministic_run_to_run(monkeypatch):
    monkeypatch.setattr(kq, "MAX_BLOCK", 16)
    x, g = rand_x((3, 40)), rand_x((3, 40), seed=9)
    s = rand_scale((3, 40), 0)
    for mode in ("uniform", "histogram"):
        a = kq.noise_fake_quant_backward(g, x, s, 4, True, 0, 8, mode)
        b = kq.noise_fake_quant_backward(g, x, s, 4, True, 0, 8, mode)
        assert_same(a[0], b[0])
        assert_same(a[1], b[1])  # ds too: fixed reduction order, no float atomics
        assert_same(kq.noise_fake_quant(x, s, 4, True, 0, 8, mode), kq.noise_fake_quant(x, s, 4, True, 0, 8, mode))
    assert not torch.equal(kq.noise_fake_quant(x, s, 4, True, 0, 8, "uniform"),
                           kq.noise_fake_quant(x, s, 4, True, 0, 9, "uniform"))


# ---------------------------------------------------------------------------------------------- per token

@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (17, 5), (2, 300), (3, 1027)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_quantize_per_token(shape, dtype):
    x = rand_x(shape, dtype)
    x[0] = 0  # a row of zeros: scale 0, q 0
    for bits in (8, 6) if shape != (1, 1) else range(2, 9):
        q, sc = ops.quantize_per_token(x, bits=bits)
        rq, rsc = ref.quantize_per_token(x, bits)
        assert_same(q, rq)
        assert_same(sc, rsc)


def test_quantize_per_token_two_pass_and_strided(monkeypatch):
    """Rows longer than MAX_ONE_PASS (absmax pass, then quantize pass), strided rows, NaN rows."""
    monkeypatch.setattr(kpt, "MAX_ONE_PASS", 64)
    base = rand_x((6, 400), torch.bfloat16)
    x = base[:, 3:300]  # row stride 400, K = 297: two-pass path with a masked tail
    assert not x.is_contiguous()
    for bits in (8, 6):
        q, sc = ops.quantize_per_token(x, bits=bits)
        rq, rsc = ref.quantize_per_token(x, bits)
        assert_same(q, rq)
        assert_same(sc, rsc)
    monkeypatch.setattr(kpt, "MAX_ONE_PASS", 8192)
    xn = rand_x((3, 20))
    xn[1, 7] = float("nan")
    _, sc = ops.quantize_per_token(xn, bits=8)
    assert torch.isnan(sc[1]) and not torch.isnan(sc[0]) and not torch.isnan(sc[2])


# ---------------------------------------------------------------------------------------------- per tensor

@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (17, 5), (2, 300), (5, 4097)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_quantize_per_tensor(shape, dtype):
    """Bit for bit the reference, on grids whose int8 range leaves the poison (-128) unwritten by a correct
    kernel, and with the unsigned 8-bit grid moved into int8; NaN, +-inf and values beyond the grid."""
    x = rand_x(shape, dtype, scale=3.0)
    flat = x.view(-1)
    flat[: min(4, flat.numel())] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30],
                                                dtype=dtype)[: min(4, flat.numel())]
    s = torch.tensor([0.043], device=x.device)
    for bits, signed, zp in ((7, True, 1), (6, False, -32), (4, True, 0), (7, False, -100), (2, True, 0)):
        assert_same(ops.quantize_per_tensor(x, s, bits=bits, signed=signed, zero_point=zp),
                    ref.quantize_per_tensor(x, s, bits, signed, zp))


def test_quantize_per_tensor_strided_rows():
    base = rand_x((6, 400), torch.bfloat16)
    x = base[:, 3:300]
    s = torch.tensor([0.02], device=x.device)
    assert_same(ops.quantize_per_tensor(x, s, bits=8, signed=False, zero_point=-128),
                ref.quantize_per_tensor(x, s, 8, False, -128))


# ---------------------------------------------------------------------------------------------- GEMM
# (M, N, K, bits): full units and both tails (N % 16, K % 32), a single unit, N < 16 and K < 32 (canonical only),
# M = 1 and rows of several tiles.
GEMM_SHAPES = [(1, 16, 32, 8), (3, 17, 32, 8), (5, 48, 96, 8), (7, 40, 100, 8), (33, 64, 256, 8), (2, 8, 20, 8),
               (4, 48, 96, 6), (9, 35, 68, 6), (20, 33, 200, 6), (2, 8, 4, 6)]
GEMM_CONFIGS = [dict(bm=16, bn=32, bk=32, group_m=2, num_warps=1), dict(bm=16, bn=16, bk=64, split_k=3, num_warps=1)]


def gemm_case(m, n, k, bits, seed=0, a_lo=-128):
    g = torch.Generator().manual_seed(seed + m * 1000 + n + k)
    lo, hi = (-128, 128) if bits == 8 else (-32, 32)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int8, generator=g)
    a = torch.randint(a_lo, 128, (m, k), dtype=torch.int8, generator=g)
    a_s, w_s = torch.rand(m, generator=g) + 0.05, torch.rand(n, generator=g) + 0.05
    bias = torch.randn(n, generator=g)
    return [t.to(DEVICE) for t in (q, a, a_s, w_s, bias)]


@pytest.mark.parametrize("m,n,k,bits", GEMM_SHAPES)
@pytest.mark.parametrize("cfg", range(len(GEMM_CONFIGS)), ids=["tiles", "split_k"])
def test_gemm_exact(m, n, k, bits, cfg):
    """int32 accumulator equal; every output dtype bit-identical to the reference epilogue (fp32, same order,
    one rounding); per-token and per-tensor activation scales; bias of every dtype or none."""
    from hdrq.kernels import gemm as kg

    config = kg.GemmConfig(**GEMM_CONFIGS[cfg])
    q, a, a_s, w_s, bias = gemm_case(m, n, k, bits)
    w = ref.pack_weight(q, bits)
    assert_same(kg.int_matmul_int32(a, w, bits, n, config), ref.int_matmul_acc(a, q))
    for out_dtype, b in ((torch.float32, bias), (torch.bfloat16, bias.bfloat16()), (torch.float16, None)):
        for a_scale in (a_s, a_s[:1]):
            got = kg.int_matmul(a, a_scale, w, w_s, bits, b, out_dtype, config)
            assert_same(got, ref.int_matmul(a, a_scale, w, w_s, bits, b, out_dtype))


def test_gemm_through_the_seam_and_strided_rows():
    """hdrq.ops.int_matmul on the Triton backend (its default configuration for the sizes), rows of A strided."""
    q, a, a_s, w_s, bias = gemm_case(5, 40, 100, 8)
    base = torch.randint(-128, 128, (5, 160), dtype=torch.int8).to(DEVICE)
    a = base[:, 7:107]
    w = ops.pack_weight(q, 8, w_s)
    assert_same(ops.int_matmul(a, a_s, w, bias=bias), ref.int_matmul(a, a_s, w.data, w_s, 8, bias, torch.bfloat16))
    assert_same(ops.int_matmul_int32(a, w), ref.int_matmul_acc(a, q))


@pytest.mark.parametrize("n,k", [(16, 32), (35, 68), (48, 200), (8, 4)])
@pytest.mark.parametrize("bits", [6, 8])
def test_weight_layout_passes(n, k, bits):
    """The 6 -> 8 bit expansion (the 8-bit layout of the same integers) and the row-major weights of torch._int_mm,
    every byte written."""
    from hdrq.kernels import gemm as kg

    if bits == 6 and k % 4:
        return
    q = gemm_case(1, n, k, bits)[0]
    w = ref.pack_weight(q, bits)
    assert_same(kg.to_rowmajor(w, bits, n, k), q)
    if bits == 6:
        assert_same(kg.expand_to_int8(w, n, k), ref.pack_weight(q, 8))


@pytest.mark.parametrize("bits", [6, 8])
def test_int_mm_route_epilogue(bits):
    """torch._int_mm on the row-major weights, then the epilogue kernel: the reference's output bit for bit."""
    from hdrq.kernels import gemm as kg

    m, n, k = 24, 40, 64
    q, a, a_s, w_s, bias = gemm_case(m, n, k, bits)
    w = ref.pack_weight(q, bits)
    for out_dtype in (torch.bfloat16, torch.float32):
        assert_same(kg.int_mm_matmul(a, a_s, w, w_s, bits, bias, out_dtype),
                    ref.int_matmul(a, a_s, w, w_s, bits, bias, out_dtype))


def test_every_op_runs_its_triton_kernel(monkeypatch):
    """On the Triton backend each op with a Triton implementation runs it (counted at the launch wrappers)."""
    from hdrq.kernels import gemm as kg
    from hdrq.kernels import per_tensor as kpt2

    launched = []

    def counting(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: launched.append(name) or real(*a, **k))
    counting(kq, "_forward")
    counting(kq, "_backward")
    counting(kpt2, "quantize_per_tensor")
    counting(kpt, "quantize_per_token")
    counting(kg, "_launch")
    hdrq.set_backend("triton")  # registered again: the ops look the wrappers up at call time through their modules
    x, s = rand_x((4, 8)).requires_grad_(), rand_scale((4, 8), 1).requires_grad_()
    ops.noise_fake_quant(x, s, bits=4, axis=1, seed=1).sum().backward()
    q, sc = ops.quantize_per_token(x.detach(), bits=8)
    ops.quantize_per_tensor(x.detach(), s.detach()[:1], bits=8)
    ops.int_matmul(q, sc, ops.pack_weight(q[:3], 8, torch.ones(3, device=DEVICE)))
    assert set(launched) == {"_forward", "_backward", "quantize_per_tensor", "quantize_per_token", "_launch"}


def test_float64_runs_the_reference():
    x = torch.randn(5, dtype=torch.float64, device=DEVICE)
    s = torch.tensor(0.2, device=DEVICE)
    assert_same(ops.noise_fake_quant(x, s, bits=4, seed=3), ref.noise_fake_quant(x, s, 4, True, None, 3, "uniform"))


def test_grad_shape_checked():
    x = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"grad must have x's shape \(4, 3\), got \(3, 4\)"):
        kq.fake_quant_backward(torch.randn(3, 4, device=DEVICE), x, torch.tensor(0.1, device=DEVICE), 4, True,
                               None)


def test_opcheck_on_triton_backend():
    from torch.library import opcheck
    x = rand_x((6, 5))
    s = rand_scale((6, 5), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opcheck(torch.ops.hdrq.noise_fake_quant.default,
                (x.clone().requires_grad_(), s.clone().requires_grad_(), 4, False, 1, 3, "uniform"),
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        opcheck(torch.ops.hdrq.quantize_per_token.default, (x, 8),
                test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------- GPU
# The GPU check runs only the tests marked cuda, so these repeat the interpreter's cases on the GPU and add
# large shapes. Each (dtype, layout, BLOCK, mode) is a separate Triton compilation (about a second), so the
# matrix is chosen to cover every layout and mode with few variants.


@pytest.mark.cuda
def test_cuda_small_cases():
    """The interpreter's CASES on the GPU (one chunk per channel), bit for bit against the reference on the
    CPU: QDrop with histogram noise (both Philox streams, the histogram pass) and hard fake_quant (the
    rounding and clamps), every layout."""
    for shape, axis, bits, signed, max_block in CASES:
        if max_block:
            continue
        x, s, g = rand_x(shape, device="cpu"), rand_scale(shape, axis, device="cpu"), rand_x(shape, seed=7,
                                                                                               device="cpu")
        for kind in ("qdrop_histogram", "hard"):
            y = run_quantizer(kind, x.cuda(), s.cuda(), bits, signed, axis)
            dx, ds = kernel_backward(kind, g.cuda(), x.cuda(), s.cuda(), bits, signed, axis)
            hdrq.set_backend("reference")
            assert_same(y.cpu(), run_quantizer(kind, x, s, bits, signed, axis))
            hdrq.set_backend("triton")
            rdx, rds = reference_backward(kind, g, x, s, bits, signed, axis)
            assert_same(dx.cpu(), rdx)
            assert_ds_close(ds.cpu(), rds, ds_terms(kind, g, x, s, bits, signed, axis))


# (shape, axis, dtype, kinds): a weight per channel in every mode; a per-tensor activation; odd shapes
LARGE = [
    ((4096, 4096), 0, torch.float32, ("hard", "uniform", "histogram", "qdrop_uniform")),
    ((4096, 4096), 0, torch.bfloat16, ("hard", "uniform", "histogram", "qdrop_uniform")),
    ((8192, 1024), None, torch.float32, ("uniform",)),
    ((8192, 1024), None, torch.bfloat16, ("hard", "uniform")),
    ((1000, 4097), 0, torch.bfloat16, ("uniform",)),  # unaligned Philox lanes, many masked tails
    ((64, 256, 3, 3), 0, torch.float16, ("qdrop_histogram",)),
    ((33, 65, 129), 1, torch.float32, ("hard", "uniform")),  # one division per element
]


@pytest.mark.cuda
@pytest.mark.parametrize("shape,axis,dtype,kinds", LARGE, ids=[f"{s}-{a}-{str(d)[6:]}" for s, a, d, _ in LARGE])
def test_cuda_large_shapes(shape, axis, dtype, kinds):
    x = rand_x(shape, dtype, device="cuda")
    s = rand_scale(shape, axis, device="cuda")
    g = rand_x(shape, dtype, seed=7, device="cuda")
    for kind in kinds:
        y = run_quantizer(kind, x, s, 4, True, axis)
        hdrq.set_backend("reference")
        assert_same(y, run_quantizer(kind, x, s, 4, True, axis), zeros_equal=True)
        hdrq.set_backend("triton")
        if kind == "qdrop_uniform":
            continue  # its backward is the uniform one plus the mask, covered by the small cases
        dx, ds = kernel_backward(kind, g, x, s, 4, True, axis)
        rdx, rds = reference_backward(kind, g, x, s, 4, True, axis)
        assert_same(dx, rdx, zeros_equal=True)
        assert_ds_close(ds, rds, ds_terms(kind, g, x, s, 4, True, axis))
        ds2 = kernel_backward(kind, g, x, s, 4, True, axis)[1]
        assert_same(ds, ds2)  # reproducible run to run


@pytest.mark.cuda
def test_cuda_per_token_and_noise_large():
    x = rand_x((8192, 4096), torch.bfloat16, device="cuda")
    q, sc = ops.quantize_per_token(x, bits=8)
    rq, rsc = ref.quantize_per_token(x, 8)
    assert_same(q, rq)
    assert_same(sc, rsc)
    x = rand_x((77, 20000), torch.float32, device="cuda")  # two-pass rows
    for bits in (6, 8):
        q, sc = ops.quantize_per_token(x, bits=bits)
        rq, rsc = ref.quantize_per_token(x, bits)
        assert_same(q, rq)
        assert_same(sc, rsc)
    u = ops.uniform_noise([4099, 4097], 2**40 + 7, "cuda")
    assert_same(u, ref.uniform_noise([4099, 4097], 2**40 + 7, "cuda"))
    # the statistics of the in-kernel noise on a large sample
    u = ops.uniform_noise([1 << 24], 5, "cuda").double()
    n = u.numel()
    assert u.min() >= -0.5 and u.max() < 0.5
    assert abs(float(u.mean())) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    for lag in (1, 2, 3, 4):
        c = float(torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1])
        assert abs(c) < 5 / math.sqrt(n), (lag, c)


@pytest.mark.cuda
def test_cuda_no_host_sync_and_side_stream():
    """The wrappers never sync the host and launch on the current stream."""
    x = rand_x((2048, 2048), device="cuda")
    s = rand_scale((2048, 2048), 0, device="cuda")
    expect = ref.noise_fake_quant(x, s, 4, True, 0, 1, "histogram")
    w = ops.PackedWeight(torch.randint(-128, 128, (64, 2048), dtype=torch.int8, device="cuda"), 8, (64, 2048),
                         s[:64].contiguous())  # built (its step sizes checked: a sync) before the watched region
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")  # a host sync inside the wrappers raises
        try:
            y = ops.noise_fake_quant(x, s, bits=4, axis=0, seed=1, mode="histogram")
            dx, ds = kq.noise_fake_quant_backward(x, x, s, 4, True, 0, 1, "uniform")
            q, sc = ops.quantize_per_token(x, bits=8)
            qs = ops.quantize_per_tensor(x, s[:1], bits=8, signed=False, zero_point=-128)
            out = ops.int_matmul(q, sc, w)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    assert_same(y, expect, zeros_equal=True)
    assert_same(qs, ref.quantize_per_tensor(x, s[:1], 8, False, -128))
    assert_same(out, ref.int_matmul(q, sc, w.data, w.scale, 8, None, torch.bfloat16))
