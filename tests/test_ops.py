"""The reference ops (hdrq.ops on CPU tensors): values, gradients, randomness, packing, matmul, errors."""
import math

import pytest
import torch
from torch.library import opcheck

from hdrq import ops
from hdrq import reference as ref

torch.manual_seed(0)

SHAPES_AXES = [((7,), None), ((7,), 0), ((3, 5), 0), ((3, 5), 1), ((2, 3, 4), 1), ((2, 3, 4), -1),
               ((4, 3, 3, 3), 0), ((1,), None), ((17, 1), 1)]


def rand_scale(x, axis, lo=0.05, hi=0.5):
    n = 1 if axis is None else x.shape[axis]
    s = lo + (hi - lo) * torch.rand(n, dtype=torch.float32)
    return s.reshape(()) if axis is None else s


def torch_lsq(x, scale, bits, signed, axis):
    """PyTorch's own learnable fake quant (zero point 0, grad_factor 1) on a per-channel view."""
    qmin, qmax = ref.qrange(bits, signed)
    if axis is None:
        xv, sv, ax = x.reshape(1, -1), scale.reshape(1), 0
    elif x.dim() == 1:  # torch's op returns a wrongly shaped scale gradient for 1-D inputs
        xv, sv, ax = x.reshape(-1, 1), scale, 0
    else:
        xv, sv, ax = x, scale, axis % x.dim()
    zp = torch.zeros(sv.shape, dtype=torch.float32)
    y = torch._fake_quantize_learnable_per_channel_affine(xv, sv, zp, ax, qmin, qmax, 1.0)
    return y.reshape(x.shape)


# ---------------------------------------------------------------------------------------------- fake_quant

def test_fake_quant_hand_computed():
    x = torch.tensor([0.26, -1.0, 3.0, 0.25, 0.75, -2.2])
    s = torch.tensor(0.5)
    # x/s = 0.52, -2, 6, 0.5, 1.5, -4.4 -> round half even: 1, -2, 6, 0, 2, -4 -> clamp to [-4, 3]
    assert torch.equal(ops.fake_quant(x, s, bits=3), torch.tensor([0.5, -1.0, 1.5, 0.0, 1.0, -2.0]))
    # unsigned 3-bit: [0, 7]
    assert torch.equal(ops.fake_quant(x, s, bits=3, signed=False), torch.tensor([0.5, 0.0, 3.0, 0.0, 1.0, 0.0]))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_fake_quant_matches_torch_learnable_op(bits, signed, shape, axis):
    x = torch.randn(shape) * 2
    scale = rand_scale(x, axis)
    x1 = x.clone().requires_grad_()
    s1 = scale.clone().requires_grad_()
    y1 = ops.fake_quant(x1, s1, bits=bits, signed=signed, axis=axis)
    x2 = x.clone().requires_grad_()
    s2 = scale.clone().requires_grad_()
    y2 = torch_lsq(x2, s2, bits, signed, axis)
    assert torch.equal(y1, y2)
    g = torch.randn(shape)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    torch.testing.assert_close(s1.grad, s2.grad.reshape(s1.shape), rtol=1e-5, atol=1e-5)


def test_fake_quant_half_dtypes_round_once():
    x = torch.randn(64, 8)
    s = rand_scale(x, 1)
    for dt in (torch.float16, torch.bfloat16):
        y = ops.fake_quant(x.to(dt), s, bits=4, axis=1)
        assert y.dtype == dt
        expect = ref.fake_quant(x.to(dt).float(), s, 4, True, 1).to(dt)
        assert torch.equal(y, expect)


def test_fake_quant_noncontiguous():
    x = torch.randn(6, 10)[:, ::2].t()  # [5, 6], strided
    s = rand_scale(x, 1)
    assert torch.equal(ops.fake_quant(x, s, bits=4, axis=1), ops.fake_quant(x.contiguous(), s, bits=4, axis=1))


def test_fake_quant_empty_and_scalar():
    assert ops.fake_quant(torch.empty(0, 3), torch.ones(3), bits=4, axis=1).shape == (0, 3)
    y = ops.fake_quant(torch.tensor(0.3), torch.tensor(0.25), bits=4)
    assert y.shape == () and y.item() == 0.25


# ---------------------------------------------------------------------------------------------- randomness

def test_uniform_noise_reproducible_and_seed_dependent():
    a = ops.uniform_noise([1000], seed=7)
    assert torch.equal(a, ops.uniform_noise([1000], seed=7))
    b = ops.uniform_noise([1000], seed=8)
    assert not torch.equal(a, b)
    assert a.dtype == torch.float32 and a.shape == (1000,)


def test_uniform_noise_prefix_stable():
    """The draw of an element depends on its index only, not on the tensor size."""
    big = ops.uniform_noise([1001], seed=3)
    small = ops.uniform_noise([13], seed=3)
    assert torch.equal(big[:13], small)
    assert torch.equal(ops.uniform_noise([7, 11], seed=3).reshape(-1), ops.uniform_noise([77], seed=3))


def test_uniform_noise_statistics():
    u = ops.uniform_noise([1 << 18], seed=11).double()
    assert u.min() >= -0.5 and u.max() < 0.5
    n = u.numel()
    assert abs(u.mean()) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 0.003
    # no correlation with the neighbour or with another seed
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01
    v = ops.uniform_noise([1 << 18], seed=12).double()
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1]) < 0.01
    # uniform: chi-square over 64 equal bins (p > 1e-4 at 63 dof means chi2 < ~120)
    counts = torch.histc(u, bins=64, min=-0.5, max=0.5)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 120


def test_uniform_noise_levels_exact():
    u = ops.uniform_noise([4096], seed=5)
    k = (u + 0.5) * 2**24
    assert torch.equal(k, k.round())  # every value is k * 2**-24 - 0.5


def test_mix_seed_distinct():
    seeds = {ref.mix_seed(1, i) for i in range(1000)} | {ref.mix_seed(2, i) for i in range(1000)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------------------------- noise_fake_quant

@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_noise_fake_quant_formula_and_grads(shape, axis, signed, bits):
    x = torch.randn(shape) * 1.5
    scale = rand_scale(x, axis)
    seed = 1234
    u = ops.uniform_noise(shape, seed)
    qmin, qmax = ref.qrange(bits, signed)
    s = ref.broadcast_scale(scale, x, axis)
    lo, hi = s * qmin, s * qmax
    inside = (x > lo) & (x < hi)
    expect = torch.where(x <= lo, lo, torch.where(x >= hi, hi, x + s * u))
    xr = x.clone().requires_grad_()
    sr = scale.clone().requires_grad_()
    y = ops.noise_fake_quant(xr, sr, bits=bits, signed=signed, axis=axis, seed=seed)
    assert torch.equal(y, expect)
    g = torch.randn(shape)
    y.backward(g)
    assert torch.equal(xr.grad, g * inside)
    ds_elem = torch.where(inside, u, torch.where(x <= lo, float(qmin), float(qmax))) * g
    torch.testing.assert_close(sr.grad, ref.reduce_to_scale(ds_elem, scale, axis), rtol=1e-5, atol=1e-5)


def _grid_edge_input(scale, bits, signed, axis, shape=(6, 40)):
    """Random values with exact grid bounds planted: ``s*qmin`` and ``s*qmax`` (fp32 products, as the ops form
    them), exact zeros, and values beyond both bounds."""
    qmin, qmax = ref.qrange(bits, signed)
    s = ref.broadcast_scale(scale, torch.empty(shape), axis).expand(shape)
    g = torch.Generator().manual_seed(bits * 2 + signed)
    x = (torch.rand(shape, generator=g) * (qmax - qmin) + qmin) * s  # inside the range (almost surely)
    pick = torch.randint(0, 6, shape, generator=g)
    x = torch.where(pick == 0, s * qmin, x)
    x = torch.where(pick == 1, s * qmax, x)
    x = torch.where(pick == 2, torch.zeros_like(x), x)
    x = torch.where(pick == 3, s * (qmax + 3), x)
    x = torch.where(pick == 4, s * (qmin - 3), x)
    return x, pick


@pytest.mark.parametrize("mode", ["uniform", "histogram"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
def test_noise_fake_quant_grid_edge(mode, signed, axis):
    """The authors' rule at the grid's bounds: an element exactly at ``s*qmin`` / ``s*qmax`` (or beyond) is
    that bound, gets no noise, has d/dx = 0 and d/ds = qmin / qmax, and is left out of the histogram; exact
    zeros on an unsigned grid stay exactly zero."""
    bits = 4
    qmin, qmax = ref.qrange(bits, signed)
    scale = torch.tensor(0.37) if axis is None else torch.linspace(0.11, 0.53, 6)
    x, pick = _grid_edge_input(scale, bits, signed, axis)
    s = ref.broadcast_scale(scale, x, axis).expand(x.shape)
    lo, hi = s * qmin, s * qmax
    at_lo, at_hi = x <= lo, x >= hi
    assert bool(at_lo.any()) and bool(at_hi.any()) and bool((~(at_lo | at_hi)).any())
    xr, sr = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y = ops.noise_fake_quant(xr, sr, bits=bits, signed=signed, axis=axis, seed=11, mode=mode)
    assert torch.equal(y[at_lo], lo[at_lo]) and torch.equal(y[at_hi], hi[at_hi])
    if not signed:  # exact zeros are the lower bound: they stay exactly zero
        assert bool((x == 0).any()) and torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))
    inside = ~(at_lo | at_hi)
    assert bool((y[inside] != x[inside]).all())  # noise everywhere strictly inside
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    y.backward(g)
    assert torch.equal(xr.grad, torch.where(inside, g, torch.zeros_like(g)))
    u = ref.quant_noise(x, scale, bits, signed, axis, 11, mode)
    ds = ref.reduce_to_scale(torch.where(inside, u, torch.where(at_lo, float(qmin), float(qmax))) * g, scale, axis)
    torch.testing.assert_close(sr.grad, ds, rtol=1e-5, atol=1e-5)
    counts = ref.rounding_error_histogram(x, scale, bits, signed, axis)
    assert counts.sum() == int(inside.sum())


def test_noise_on_post_relu_activations():
    """Post-ReLU inputs on an unsigned grid: about half are exact zeros. None of them gets noise, and the
    histogram (built from the others) gives noise of the spread of real rounding errors,
    std ~ 1/sqrt(12) = 0.289."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(64, 1024, generator=g))
    zeros = x == 0
    assert 0.45 < float(zeros.float().mean()) < 0.55
    scale = torch.tensor(3.0 / 15)
    for mode in ("uniform", "histogram"):
        y = ops.noise_fake_quant(x, scale, bits=4, signed=False, seed=5, mode=mode)
        assert torch.equal(y[zeros], x[zeros])
        inside = (x > 0) & (x < scale * 15)
        u = (y[inside] - x[inside]) / scale
        assert abs(float(u.std()) - 12 ** -0.5) < 0.01, (mode, float(u.std()))


def test_noise_fake_quant_reproducible_and_seeded():
    x = torch.randn(33, 9)
    s = torch.tensor(0.1)
    a = ops.noise_fake_quant(x, s, bits=4, seed=1)
    assert torch.equal(a, ops.noise_fake_quant(x, s, bits=4, seed=1))
    assert not torch.equal(a, ops.noise_fake_quant(x, s, bits=4, seed=2))


@pytest.mark.parametrize("mode", ["uniform", "histogram"])
@pytest.mark.parametrize("axis", [None, 1])
def test_noise_fake_quant_gradcheck_float64(mode, axis):
    # Away from the clamp boundaries the op is smooth in x and s for a fixed noise draw.
    x = (torch.rand(5, 4, dtype=torch.float64) - 0.5) * 0.8
    scale = torch.full((4,) if axis == 1 else (), 0.2, dtype=torch.float64) + (
        torch.rand(4, dtype=torch.float64) * 0.05 if axis == 1 else 0.0)
    x.requires_grad_()
    scale = scale.clone().requires_grad_()
    fn = lambda x_, s_: ops.noise_fake_quant(x_, s_, bits=4, axis=axis, seed=9, mode=mode)
    if mode == "histogram":  # the histogram depends on x and s (piecewise constant): check x only
        fn = lambda x_: ops.noise_fake_quant(x_, scale.detach(), bits=4, axis=axis, seed=9, mode=mode)
        assert torch.autograd.gradcheck(fn, (x,))
    else:
        assert torch.autograd.gradcheck(fn, (x, scale))
    # outside the range: d/dx = 0, d/ds = qmin/qmax
    xo = torch.tensor([5.0, -5.0], dtype=torch.float64, requires_grad=True)
    so = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.noise_fake_quant(a, b, bits=4, seed=1), (xo, so))


def test_histogram_counts_hand_computed():
    s = torch.tensor(1.0)
    # errors round(v) - v: 0.1 -> -0.1, 0.3 -> -0.3, 2.4 -> -0.4, 9.0 out of range (4-bit signed: [-8, 7])
    x = torch.tensor([0.1, 0.3, 2.4, 9.0, -0.25])
    counts = ref.rounding_error_histogram(x, s, 4, True, None)
    assert counts.shape == (1, 256) and int(counts.sum()) == 4
    for e in (-0.1, -0.3, -0.4, 0.25):
        b = min(max(math.floor((e + 0.5) * 256), 0), 255)
        assert counts[0, b] >= 1


def test_histogram_mode_follows_histogram():
    """Noise drawn in histogram mode follows the rounding-error histogram of the tensor (chi-square)."""
    # A tensor whose rounding errors are concentrated: values near (integer + 0.3) * s -> errors ~ -0.3.
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-5, 5, (1 << 16,), generator=g).float()
    x = (base + 0.3 + 0.05 * torch.rand(1 << 16, generator=g)) * 0.1
    s = torch.tensor(0.1)
    u = ref.histogram_noise(x, s, 4, True, None, seed=3)
    assert u.min() >= -0.5 and u.max() < 0.5
    counts = ref.rounding_error_histogram(x, s, 4, True, None)[0].double()
    p = counts / counts.sum()
    drawn = torch.clamp(torch.floor((u.double() + 0.5) * 256), 0, 255).long()
    obs = torch.bincount(drawn, minlength=256).double()
    mask = p > 0
    assert obs[~mask].sum() == 0  # never outside the histogram's support
    expect = p[mask] * u.numel()
    chi2 = ((obs[mask] - expect) ** 2 / expect).sum()
    dof = int(mask.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)
    # and it is really different from uniform
    assert (u + 0.3).abs().mean() < 0.05


def test_histogram_flat_is_close_to_uniform_and_per_channel():
    x = torch.randn(8, 4096) * 3
    s = torch.rand(8) * 0.2 + 0.05
    u = ref.histogram_noise(x, s, 8, True, 0, seed=1)
    assert u.shape == x.shape
    assert abs(u.mean()) < 0.01 and abs(u.var() - 1 / 12) < 0.01
    # a channel with no in-range element falls back to the uniform draw
    x2 = x.clone()
    x2[2] = 1e6
    u2 = ref.histogram_noise(x2, s, 8, True, 0, seed=1)
    assert torch.equal(u2[2], ops.uniform_noise(x.shape, 1)[2])


def test_histogram_mode_backward_regenerates_noise():
    x = torch.randn(50, 6, requires_grad=True)
    s = (torch.rand(6) * 0.2 + 0.1).requires_grad_()
    y = ops.noise_fake_quant(x, s, bits=3, axis=1, seed=77, mode="histogram")
    u = ref.histogram_noise(x.detach(), s.detach(), 3, True, 1, 77)
    y.backward(torch.ones_like(y))
    qmin, qmax = ref.qrange(3, True)
    lo, hi = s.detach() * qmin, s.detach() * qmax
    inside = (x.detach() > lo) & (x.detach() < hi)
    expect_ds = torch.where(inside, u, torch.where(x.detach() <= lo, float(qmin), float(qmax))).sum(0)
    torch.testing.assert_close(s.grad, expect_ds, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- qdrop

@pytest.mark.parametrize("noise", [False, True])
def test_qdrop_fake_quant(noise):
    x = torch.randn(64, 32, requires_grad=True)
    s = torch.tensor(0.05, requires_grad=True)
    y = ops.qdrop_fake_quant(x, s, bits=4, seed=5, p=0.5, noise=noise)
    keep = ref.drop_mask(x.shape, 5, 0.5, "cpu")
    q = (ops.noise_fake_quant(x.detach(), s.detach(), bits=4, seed=5) if noise
         else ops.fake_quant(x.detach(), s.detach(), bits=4))
    assert torch.equal(y, torch.where(keep, x.detach(), q))
    assert 0.45 < keep.float().mean() < 0.55
    y.sum().backward()
    dx_q = torch.zeros_like(x)
    xd, sd = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    qq = (ops.noise_fake_quant(xd, sd, bits=4, seed=5) if noise else ops.fake_quant(xd, sd, bits=4))
    (qq * (~keep)).sum().backward()
    dx_q = xd.grad
    assert torch.equal(x.grad, torch.where(keep, torch.ones_like(dx_q), dx_q))
    torch.testing.assert_close(s.grad, sd.grad)


def test_qdrop_extremes():
    x = torch.randn(100)
    s = torch.tensor(0.1)
    assert torch.equal(ops.qdrop_fake_quant(x, s, bits=4, seed=1, p=1.0), x)
    assert torch.equal(ops.qdrop_fake_quant(x, s, bits=4, seed=1, p=0.0), ops.fake_quant(x, s, bits=4))


# ---------------------------------------------------------------------------------------------- deploy ops

@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token(bits, dtype):
    x = (torch.randn(17, 33) * torch.rand(17, 1) * 4).to(dtype)
    x[3] = 0  # a zero row
    q, scale = ops.quantize_per_token(x, bits=bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (17,)
    assert int(q.abs().max()) <= qmax
    assert torch.equal(q.abs().amax(1)[scale > 0], torch.full((16,), qmax, dtype=torch.int8))
    assert scale[3] == 0 and (q[3] == 0).all()
    err = (q.float() * scale[:, None] - x.float()).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("shape", [(4,), (1, 4), (3, 8), (5, 2, 12), (17, 64)])
def test_pack_int6_roundtrip(shape):
    q = torch.randint(-32, 32, shape, dtype=torch.int8)
    p = ops.pack_int6(q)
    assert p.dtype == torch.uint8 and p.shape == (*shape[:-1], shape[-1] * 3 // 4)
    assert torch.equal(ops.unpack_int6(p, shape), q)


def test_pack_int6_bit_layout():
    q = torch.tensor([[1, -1, 31, -32]], dtype=torch.int8)
    word = 1 | (63 << 6) | (31 << 12) | (32 << 18)
    assert ops.pack_int6(q).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]


def test_int_matmul_exact_and_epilogue():
    m, n, k = 5, 7, 300
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    acc = ref.int_matmul_acc(a, w)
    exact = (a.long().unsqueeze(1) * w.long().unsqueeze(0)).sum(-1)
    assert torch.equal(acc.long(), exact)
    a_s, w_s, bias = torch.rand(m) + 0.1, torch.rand(n) + 0.1, torch.randn(n)
    out = ops.int_matmul(a, a_s, ops.pack_weight(w, 8, w_s), bias=bias, out_dtype=torch.float32)
    assert torch.equal(out, exact.float() * a_s[:, None] * w_s[None, :] + bias)
    # 6-bit weights through the packed layout give the same result as the int8 layout
    w6 = torch.randint(-32, 32, (n, 8), dtype=torch.int8)
    a6 = torch.randint(0, 64, (m, 8), dtype=torch.int8)  # unsigned 6-bit activations
    o6 = ops.int_matmul(a6, a_s[:1], ops.pack_weight(w6, 6, w_s), out_dtype=torch.bfloat16)
    o8 = ops.int_matmul(a6, a_s[:1], ops.pack_weight(w6, 8, w_s), out_dtype=torch.bfloat16)
    assert o6.dtype == torch.bfloat16 and torch.equal(o6, o8)
    assert torch.equal(ops.int_matmul_int32(a6, ops.pack_weight(w6, 6)), ref.int_matmul_acc(a6, w6))


def test_int_matmul_refuses_weights_not_packed_for_it():
    """A raw int8 matrix (its bytes in the canonical order: wrong numbers from 3x17x32 up if it were read as the
    packed layout), bytes of the other width, a weight without step sizes: clear errors, never a result."""
    m, n, k = 3, 17, 32
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    a, a_s, w_s = torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.rand(m) + 0.1, torch.rand(n) + 0.1
    assert not torch.equal(ref.pack_weight(q, 8), q)  # at this size the layout is a real permutation
    with pytest.raises(TypeError, match="PackedWeight.*raw"):
        ops.int_matmul(a, a_s, q)
    with pytest.raises(ValueError, match="8-bit weights of shape .* got a torch.uint8"):
        ops.PackedWeight(ref.pack_weight(q.clamp(-32, 31), 6), 8, (n, k), w_s)  # 6-bit bytes claimed as 8-bit
    with pytest.raises(ValueError, match="layout"):
        ops.PackedWeight(q, 8, (n, k), w_s, layout="row-major")
    with pytest.raises(ValueError, match="no step sizes"):
        ops.int_matmul(a, a_s, ops.pack_weight(q, 8))
    with pytest.raises(ValueError, match=r"\[M, K\] = \(3, 32\).*\(17, 64\)"):
        ops.int_matmul(a, a_s, ops.pack_weight(torch.zeros(n, 64, dtype=torch.int8), 8, w_s))


@pytest.mark.parametrize("bad", [float("nan"), -0.5, 0.0, float("inf")])
def test_weight_scales_are_checked_once_when_packed(bad):
    w_s = torch.rand(5) + 0.1
    w_s[2] = bad
    with pytest.raises(ValueError, match="finite and > 0"):
        ops.pack_weight(torch.zeros(5, 8, dtype=torch.int8), 8, w_s)


def test_quantize_per_token_non_finite_rows_are_defined():
    """A row holding inf or NaN gets scale NaN and integers 0 (int_matmul then gives NaN for that row, as a float
    layer would); the other rows are untouched."""
    x = torch.randn(4, 16)
    x[1, 3], x[2, 5] = float("inf"), float("nan")
    q, s = ops.quantize_per_token(x, bits=8)
    assert torch.isnan(s[1]) and torch.isnan(s[2]) and (q[1:3] == 0).all()
    q0, s0 = ops.quantize_per_token(x[[0, 3]], bits=8)
    assert torch.equal(q[[0, 3]], q0) and torch.equal(s[[0, 3]], s0)
    out = ops.int_matmul(q, s, ops.pack_weight(torch.ones(3, 16, dtype=torch.int8), 8, torch.ones(3)),
                         out_dtype=torch.float32)
    assert torch.isnan(out[1:3]).all() and torch.isfinite(out[[0, 3]]).all()


@pytest.mark.parametrize("bits,signed,zero_point", [(8, True, 0), (8, False, -128), (6, False, 0), (4, True, 0),
                                                    (6, True, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_quantize_per_tensor_is_the_fake_quant_grid(bits, signed, zero_point, dtype):
    """The integers of quantize_per_tensor are those of fake_quant with the same step size (its arithmetic),
    moved by zero_point; NaN becomes zero_point and +-inf the grid's bounds."""
    x = (torch.randn(9, 37) * 3).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], dtype=dtype)
    s = torch.tensor([0.037])
    q = ops.quantize_per_tensor(x, s, bits=bits, signed=signed, zero_point=zero_point)
    qmin, qmax = ref.qrange(bits, signed)
    xf = x[:, 4:].to(torch.float64 if dtype == torch.float64 else torch.float32)  # exact: x is representable
    fq = ops.fake_quant(xf, s, bits=bits, signed=signed)
    assert q.dtype == torch.int8
    assert torch.equal(q[:, 4:].to(torch.int32) - zero_point, torch.round(fq.double() / s.double()).to(torch.int32))
    assert q[0, :4].tolist() == [zero_point, qmax + zero_point, qmin + zero_point, zero_point]


def test_int_matmul_large_k_exact():
    a = torch.full((1, 70000), -128, dtype=torch.int8)
    w = torch.full((2, 70000), -128, dtype=torch.int8)
    assert ref.int_matmul_acc(a, w).tolist() == [[128 * 128 * 70000] * 2]


# ---------------------------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    x = torch.randn(6, 5)
    s = torch.rand(5) + 0.1
    g = torch.randn(6, 5)
    a = torch.randint(-128, 128, (3, 8), dtype=torch.int8)
    w = torch.randint(-32, 32, (4, 8), dtype=torch.int8)
    return [
        (torch.ops.hdrq.fake_quant.default, (x.clone().requires_grad_(), s.clone().requires_grad_(), 4, True, 1)),
        (torch.ops.hdrq.fake_quant_backward.default, (g, x, s, 4, True, 1)),
        (torch.ops.hdrq.noise_fake_quant.default,
         (x.clone().requires_grad_(), s.clone().requires_grad_(), 4, False, 1, 3, "uniform")),
        (torch.ops.hdrq.noise_fake_quant.default, (x, s[0].clone(), 4, True, None, 3, "histogram")),
        (torch.ops.hdrq.noise_fake_quant_backward.default, (g, x, s, 4, True, 1, 3, "histogram")),
        (torch.ops.hdrq.qdrop_fake_quant.default,
         (x.clone().requires_grad_(), s[0].clone().requires_grad_(), 4, True, None, 3, 0.5, True, "uniform")),
        (torch.ops.hdrq.qdrop_fake_quant_backward.default, (g, x, s, 4, True, 1, 3, 0.5, False, "uniform")),
        (torch.ops.hdrq.uniform_noise.default, ([3, 4], 5, torch.device("cpu"))),
        (torch.ops.hdrq.quantize_per_token.default, (x, 8)),
        (torch.ops.hdrq.quantize_per_tensor.default, (x, torch.tensor([0.05]), 8, False, -128)),
        (torch.ops.hdrq.pack_int6.default, (w,)),
        (torch.ops.hdrq.unpack_int6.default, (ref.pack_int6(w), [4, 8])),
        (torch.ops.hdrq.int_matmul.default, (a, torch.rand(3), w, torch.rand(4), 8, torch.randn(4), torch.float32)),
        (torch.ops.hdrq.int_matmul.default, (a, torch.rand(1), ref.pack_int6(w), torch.rand(4), 6, None,
                                             torch.bfloat16)),
        (torch.ops.hdrq.int_matmul_int32.default, (a, ref.pack_weight(w, 6), 6, 4)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    opcheck(op, args)


def test_torch_compile_traces_ops():
    x = torch.randn(8, 4, requires_grad=True)
    s = (torch.rand(4) + 0.1).requires_grad_()

    def f(x, s):
        return ops.noise_fake_quant(x, s, bits=4, axis=1, seed=3).sum() + ops.fake_quant(x, s, bits=4, axis=1).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, s), f(x, s))


# ---------------------------------------------------------------------------------------------- the seam

_OPS = ("fake_quant", "noise_fake_quant", "qdrop_fake_quant", "fake_quant_backward", "noise_fake_quant_backward",
        "qdrop_fake_quant_backward", "uniform_noise", "quantize_per_token", "quantize_per_tensor", "pack_int6",
        "unpack_int6", "int_matmul", "int_matmul_int32")


@pytest.mark.parametrize("name", _OPS)
def test_every_op_is_registered_with_the_dispatcher(name):
    """One operator per op in the hdrq namespace: the reference for every device, a fake, an autograd entry."""
    qualname = f"hdrq::{name}"
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(qualname, "CompositeExplicitAutograd") and has(qualname, "Meta")
    assert has(qualname, "Autograd") or name == "uniform_noise"  # (no tensor inputs: dispatched on its device)
    assert getattr(torch.ops.hdrq, name).default._schema.name == qualname


def test_one_namespace_one_schema_file():
    names = torch._C._dispatch_get_all_op_names()
    assert not [n for n in names if n.startswith("hdrq_C::")]
    assert {n for n in names if n.startswith("hdrq::")} == {f"hdrq::{n}" for n in ops._SCHEMAS}


def test_public_call_reaches_the_registered_kernel(monkeypatch):
    """hdrq.ops.fake_quant -> torch.ops.hdrq.fake_quant -> the kernel registered for the device: a CPU kernel
    registered over the reference is what a CPU call runs, forward and backward."""
    seen = []
    lib = torch.library.Library("hdrq", "IMPL")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lib.impl("fake_quant", lambda *a: seen.append("fwd") or ref.fake_quant(*a), "CPU")
        lib.impl("fake_quant_backward", lambda *a: seen.append("bwd") or ref.fake_quant_backward(*a), "CPU")
    try:
        x, s = torch.randn(4, 3, requires_grad=True), (torch.rand(3) + 0.1).requires_grad_()
        ops.fake_quant(x, s, bits=4, axis=1).sum().backward()
        ops.fake_quant(x.detach(), s.detach(), bits=4, axis=1)
    finally:
        lib._destroy()
    assert seen == ["fwd", "bwd", "fwd"] and x.grad is not None and s.grad is not None
    ops.fake_quant(x.detach(), s.detach(), bits=4, axis=1)
    assert seen == ["fwd", "bwd", "fwd"]  # the reference again once the registration is gone


def _all_public_calls(x, s, g):
    """Every public op on the inputs: outputs, and gradients where the op has them."""
    out = {}
    for name, f in [("fake_quant", lambda a, b: ops.fake_quant(a, b, bits=4, axis=1)),
                    ("noise_fake_quant", lambda a, b: ops.noise_fake_quant(a, b, bits=4, axis=1, seed=7)),
                    ("noise_hist", lambda a, b: ops.noise_fake_quant(a, b, bits=3, axis=1, seed=7, mode="histogram")),
                    ("qdrop", lambda a, b: ops.qdrop_fake_quant(a, b[:1], bits=4, seed=7, noise=True))]:
        xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
        y = f(xr, sr)
        out[name] = (y.detach(),) + torch.autograd.grad(y, (xr, sr), g)
        out[name + " no grad"] = f(x, s)
    q = torch.randint(-32, 32, (5, 8), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    a_q, a_s = ops.quantize_per_token(x, bits=6)
    out["per_token"] = (a_q, a_s)
    out["per_tensor"] = ops.quantize_per_tensor(x, s[:1], bits=8, signed=False, zero_point=-128)
    out["noise"] = ops.uniform_noise([3, 5], 11)
    out["int6"] = ops.unpack_int6(ops.pack_int6(q), [5, 8])
    w_s, bias = torch.linspace(0.1, 0.5, 5), torch.linspace(-1, 1, 5)
    out["int_matmul"] = ops.int_matmul(a_q, a_s, ops.pack_weight(q, 6, w_s), bias=bias, out_dtype=torch.float32)
    out["int32"] = ops.int_matmul_int32(a_q, ops.pack_weight(q, 8))
    return out


def test_triton_backend_on_cpu_equals_the_reference():
    """set_backend("triton") registers the Triton kernels for CPU tensors (under the interpreter): every public
    call gives the reference's results and gradients (bit for bit but for the summed scale gradients)."""
    if "triton" not in ops.available_backends("cpu"):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    x, s, g = torch.randn(6, 8), torch.rand(8) * 0.2 + 0.05, torch.randn(6, 8)
    want = _all_public_calls(x, s, g)
    ops.set_backend("triton")
    got = _all_public_calls(x, s, g)
    assert got.keys() == want.keys()
    for k in want:
        a, b = want[k], got[k]
        a, b = (a,) if isinstance(a, torch.Tensor) else a, (b,) if isinstance(b, torch.Tensor) else b
        for i, (u, v) in enumerate(zip(a, b)):
            if i == 2 and u.dtype.is_floating_point:  # d/ds: a sum, in another order
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(u, v), k


def test_backend_switch_is_a_registration(monkeypatch):
    """"reference" and "triton" register kernels over the defaults; "auto" removes them again."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    ops.set_backend("reference")
    assert has("hdrq::int_matmul", "CUDA") and ops.get_backend() == "reference"
    ops.set_backend("auto")
    assert has("hdrq::int_matmul", "CUDA") == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ops.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.fake_quant(torch.randn(3), torch.tensor(0.5), bits=4)
    ops.set_backend("auto")
    assert torch.equal(ops.fake_quant(torch.tensor([0.26]), torch.tensor(0.5), bits=4), torch.tensor([0.5]))


def test_fake_tensors_jit_trace_and_vmap_see_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fs = mode.from_tensor(torch.ones(4, 2)), mode.from_tensor(torch.ones(2))
        assert ops.fake_quant(fx, fs, bits=4, axis=1).shape == (4, 2)
        w = ops.PackedWeight(mode.from_tensor(torch.zeros(3, 8, dtype=torch.int8)), 8, (3, 8),
                             mode.from_tensor(torch.ones(3)))
        a = mode.from_tensor(torch.zeros(2, 8, dtype=torch.int8))
        assert ops.int_matmul(a, mode.from_tensor(torch.ones(2)), w).shape == (2, 3)
    x, s = torch.randn(4, 3), torch.rand(3) + 0.1
    vmapped = torch.func.vmap(lambda r: ops.quantize_per_token(r[None], bits=8)[1])(x)
    assert vmapped.shape == (4, 1)
    traced = torch.jit.trace(lambda a: ops.fake_quant(a, s, bits=4, axis=1), (x,), check_trace=False)
    assert "hdrq::fake_quant" in str(traced.graph)


def test_autograd_edges():
    """A gradient through an op without a backward is refused, as is a second derivative of a quantizer; batched
    gradients work."""
    x = torch.randn(4, 8, requires_grad=True)
    s = (torch.rand(8) + 0.1).requires_grad_()
    q, sc = ops.quantize_per_token(x, bits=8)  # computed; a gradient through it is refused
    with pytest.raises(RuntimeError, match="not differentiable"):
        (sc.sum() + x.sum()).backward()
    w = ops.pack_weight(torch.ones(3, 8, dtype=torch.int8), 8, torch.ones(3))
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.int_matmul(q, sc.detach(), w, bias=torch.zeros(3, requires_grad=True)).sum().backward()
    y = ops.fake_quant(x, s, bits=4, axis=1)
    dx, = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dx.sum(), x)  # no second derivative: loud, not zero
    eye = torch.eye(4 * 8).reshape(32, 4, 8)
    y = ops.noise_fake_quant(x, s, bits=4, axis=1, seed=3)
    jac, = torch.autograd.grad(y, x, eye, is_grads_batched=True)
    assert jac.shape == (32, 4, 8)
    torch.testing.assert_close(jac.sum(0), torch.autograd.grad(ops.noise_fake_quant(x, s, bits=4, axis=1, seed=3),
                                                               x, torch.ones(4, 8))[0])


# ---------------------------------------------------------------------------------------------- bad input

_W = ops.pack_weight(torch.zeros(3, 8, dtype=torch.int8), 8, torch.ones(3))


@pytest.mark.parametrize("call,err,match", [
    (lambda: ops.fake_quant(torch.ones(3, dtype=torch.int32), torch.tensor(1.0), bits=4), TypeError, "int32"),
    (lambda: ops.fake_quant(torch.ones(3), torch.tensor(0.0), bits=4), ValueError, "> 0"),
    (lambda: ops.fake_quant(torch.ones(3), torch.tensor(-1.0), bits=4), ValueError, "> 0"),
    (lambda: ops.fake_quant(torch.ones(3), torch.tensor(float("nan")), bits=4), ValueError, "finite"),
    (lambda: ops.fake_quant(torch.ones(3, 4), torch.ones(3), bits=4, axis=1), ValueError, "length 4"),
    (lambda: ops.fake_quant(torch.ones(3, 4), torch.ones(4), bits=4), ValueError, "one scale"),
    (lambda: ops.fake_quant(torch.ones(3, 4), torch.ones(4), bits=4, axis=2), ValueError, "out of range"),
    (lambda: ops.fake_quant(torch.tensor(1.0), torch.ones(1), bits=4, axis=0), ValueError, "out of range"),
    (lambda: ops.fake_quant(torch.ones(3), torch.tensor(1.0), bits=9), ValueError, "2 to 8"),
    (lambda: ops.fake_quant(torch.ones(3), torch.tensor(1.0), bits=1), ValueError, "2 to 8"),
    (lambda: ops.noise_fake_quant(torch.ones(3), torch.tensor(1.0), bits=4, seed=1, mode="gauss"), ValueError,
     "mode"),
    (lambda: ops.noise_fake_quant(torch.ones(3), torch.tensor(1.0), bits=4, seed=1.5), TypeError, "seed"),
    (lambda: ops.qdrop_fake_quant(torch.ones(3), torch.tensor(1.0), bits=4, seed=1, p=1.5), ValueError, "p must"),
    (lambda: ops.quantize_per_token(torch.ones(3, 4, 5), bits=8), ValueError, r"\(3, 4, 5\)"),
    (lambda: ops.quantize_per_token(torch.ones(3, 4, dtype=torch.int8), bits=8), TypeError, "int8"),
    (lambda: ops.pack_int6(torch.full((2, 4), 40, dtype=torch.int8)), ValueError, r"\[-32, 31\]"),
    (lambda: ops.pack_int6(torch.zeros(2, 6, dtype=torch.int8)), ValueError, "multiple of 4"),
    (lambda: ops.pack_int6(torch.zeros(2, 4)), TypeError, "int8"),
    (lambda: ops.unpack_int6(torch.zeros(2, 4, dtype=torch.uint8), [2, 8]), ValueError, r"\(2, 6\)"),
    (lambda: ops.int_matmul(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), torch.zeros(3, 8, dtype=torch.int8)),
     TypeError, "PackedWeight"),
    (lambda: ops.int_matmul(torch.zeros(2, 8), torch.ones(2), _W), TypeError, "int8"),
    (lambda: ops.int_matmul(torch.zeros(2, 8, dtype=torch.int8), torch.ones(5), _W), TypeError, r"\[M\] = \[2\]"),
    (lambda: ops.int_matmul(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), _W, bias=torch.ones(2)), TypeError,
     "bias"),
    (lambda: ops.int_matmul(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), _W, out_dtype=torch.int32),
     TypeError, "out_dtype"),
    (lambda: ops.pack_weight(torch.zeros(3, 8, dtype=torch.int8), 8, torch.tensor([1.0, float("nan"), 1.0])),
     ValueError, "finite"),
    (lambda: ops.pack_weight(torch.zeros(3, 8, dtype=torch.int8), 8, torch.ones(2)), ValueError, "3 \\(or 1\\)"),
    (lambda: ops.PackedWeight(torch.zeros(3, 8, dtype=torch.int8), 6, (3, 8)), ValueError, "6-bit"),
    (lambda: ops.qdrop_fake_quant(torch.ones(3), torch.tensor(1.0), bits=4, seed=-1), ValueError, "seed"),
    (lambda: ops.noise_fake_quant(torch.ones(3), torch.tensor(1.0), bits=4, seed=2**63), ValueError, "seed"),
    (lambda: ops.uniform_noise([3], seed=-5), ValueError, "seed"),
    (lambda: ops.quantize_per_tensor(torch.ones(2, 3), torch.tensor([0.0]), bits=8), ValueError, "> 0"),
    (lambda: ops.quantize_per_tensor(torch.ones(2, 3), torch.tensor([0.1]), bits=8, signed=False), ValueError,
     "zero_point"),
    (lambda: ops.quantize_per_tensor(torch.ones(2, 3), torch.tensor([0.1, 0.2]), bits=8), TypeError, "one float32"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
