"""hdrq.nn: integer deploy layers against the fake-quant layers they come from."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdrq import ops
from hdrq.nn import QConv2d, QLinear, storage_bits
from hdrq.quant import QuantConv2d, QuantLinear, minmax_scale, mse_scale
from hdrq.reference import qrange

torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------ helpers


def hard_quantized(layer, x, *, act_clip=0.8):
    """Put a fresh QuantLinear / QuantConv2d in the contract state: per-channel MSE weight step sizes,
    ``weight == step * integers`` exactly, a per-tensor input step size from ``x`` (clipped a little, so that
    some inputs saturate; a power of two, so that :func:`with_ties` can place inputs exactly on ties)."""
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    with torch.no_grad():
        wq.set_scale(mse_scale(layer.weight, wq.bits, True, axis=wq.axis))
        layer.weight.copy_(wq(layer.weight))
        aq.set_scale(2.0 ** torch.round(torch.log2(minmax_scale(x, aq.bits, aq.signed) * act_clip)))
    assert torch.equal(layer.weight, layer.weight_integers().float() * wq.step_size().reshape(-1, *[1] * (
        layer.weight.dim() - 1)))
    return layer.eval()


def make_input(shape, signed):
    x = torch.randn(shape)
    # unsigned layers see mostly non-negative inputs (post-ReLU) plus a few negatives that must clamp to 0
    return x if signed else torch.where(torch.rand(shape) < 0.9, x.abs(), x)


@torch.no_grad()
def with_ties(x, layer):
    """``x`` with every third element moved exactly onto a rounding tie ``(j + 0.5) * s`` of the layer's
    input grid, where round-half-to-even and round-half-up differ for even j."""
    aq = layer.act_quantizer
    s = float(aq.step_size())
    j = torch.randint(aq.qmin, aq.qmax, x.shape).float()
    return torch.where(torch.arange(x.numel()).reshape(x.shape) % 3 == 0, (j + 0.5) * s, x)


@torch.no_grad()
def tol(xq, wq, b):
    """fp32 summation order is the only difference: allow 1e-5 of the largest |term| sum."""
    mag = (xq.abs().reshape(-1, xq.shape[-1]) @ wq.abs().reshape(wq.shape[0], -1).t()).max()
    return dict(rtol=1e-5, atol=1e-5 * float(mag) + (0 if b is None else 1e-6 * float(b.detach().abs().max())))


def per_token_reference(rows, bits):
    q, s = ops.quantize_per_token(rows, bits=bits)
    return q.float() * s[:, None]


# ------------------------------------------------------------------------------------------------ QLinear

LINEAR_CASES = [  # (in, out, M, w_bits, a_bits, a_signed, bias)
    (17, 3, 5, 8, 8, True, True), (17, 3, 5, 8, 8, False, False), (17, 3, 5, 6, 6, True, False),
    (17, 3, 5, 6, 6, False, True), (1, 1, 1, 6, 6, True, True), (64, 33, 2, 4, 4, False, True),
    (30, 7, 1, 3, 3, True, True), (24, 9, 3, 8, 6, False, True), (13, 16, 4, 7, 8, False, True),
]


@pytest.mark.parametrize("k,n,m,w_bits,a_bits,a_signed,bias", LINEAR_CASES)
def test_qlinear_static_equals_fake_quant(k, n, m, w_bits, a_bits, a_signed, bias):
    x = make_input((m, k), a_signed)
    fq = hard_quantized(QuantLinear(nn.Linear(k, n, bias=bias), w_bits, a_bits, a_signed=a_signed), x)
    q = QLinear.from_quant(fq)
    x = with_ties(x, fq)
    assert q.act == "static" and q.storage_bits == storage_bits(w_bits) and q.w_bits == w_bits
    assert torch.equal(q.integer_weight(), fq.weight_integers().to(torch.int8))
    assert torch.equal(q.dequantized_weight(), fq.quantized_weight())
    # the integers of the input are the fake-quant layer's, exactly
    s = fq.act_quantizer.step_size()
    a_q = ops.quantize_per_tensor(x, q.act_scale, bits=a_bits, signed=a_signed, zero_point=-q.act_shift)
    assert torch.equal((a_q.float() + q.act_shift) * s, fq.act_quantizer(x))
    y = q(x)
    assert y.dtype == x.dtype and y.shape == (m, n)
    torch.testing.assert_close(y, fq(x), **tol(fq.act_quantizer(x), fq.quantized_weight(), fq.bias))


@pytest.mark.parametrize("k,n,m,w_bits,a_bits,a_signed,bias", LINEAR_CASES[:6])
def test_qlinear_dynamic_equals_per_token_fake_quant(k, n, m, w_bits, a_bits, a_signed, bias):
    x = make_input((2, m, k), a_signed)  # leading dims are kept
    fq = hard_quantized(QuantLinear(nn.Linear(k, n, bias=bias), w_bits, a_bits, a_signed=a_signed), x)
    q = QLinear.from_quant(fq, act="dynamic")
    assert q.act == "dynamic" and q.act_scale is None
    xq = per_token_reference(x.reshape(-1, k), a_bits).reshape(x.shape)
    ref = F.linear(xq, fq.quantized_weight(), fq.bias)
    torch.testing.assert_close(q(x), ref, **tol(xq, fq.quantized_weight(), fq.bias))


@pytest.mark.parametrize("bias", [True, False])
def test_qlinear_off_act_is_float_and_bit_identical(bias):
    x = torch.randn(4, 19)
    fq = hard_quantized(QuantLinear(nn.Linear(19, 6, bias=bias), 6, 6, a_enabled=False), x)
    q = QLinear.from_quant(fq)
    assert q.act == "float"
    assert torch.equal(q(x), fq(x))
    # opt-in: 8-bit per-token inputs on the integer kernel
    q8 = QLinear.from_quant(fq, off_act="dynamic8")
    assert (q8.act, q8.a_bits) == ("dynamic", 8)
    xq = per_token_reference(x, 8)
    torch.testing.assert_close(q8(x), F.linear(xq, fq.quantized_weight(), fq.bias),
                               **tol(xq, fq.quantized_weight(), fq.bias))


def test_qlinear_per_tensor_weight_scale():
    x = torch.randn(3, 12)
    fq = hard_quantized(QuantLinear(nn.Linear(12, 5), 6, 6, per_channel=False), x)
    q = QLinear.from_quant(fq)
    assert q.weight_scale.shape == (5,) and torch.all(q.weight_scale == fq.weight_quantizer.step_size())
    torch.testing.assert_close(q(x), fq(x), **tol(fq.act_quantizer(x), fq.quantized_weight(), fq.bias))


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("w_bits", [4, 6, 8])
def test_from_float_is_hand_computed_rtn(observer, w_bits):
    lin = nn.Linear(21, 7)
    with torch.no_grad():
        lin.weight[2] = 0.0  # an all-zero row still gets a positive step size
    q = QLinear.from_float(lin, w_bits, 8, observer=observer)
    w = lin.weight.detach()
    qmin, qmax = qrange(w_bits, True)
    if observer == "minmax":
        s = torch.maximum(w.amax(1).clamp_min(0) / qmax, w.amin(1).clamp_max(0) / qmin)
        s = s.clamp_min(torch.finfo(torch.float32).eps)
    else:
        s = mse_scale(w, w_bits, True, axis=0)
    ints = torch.clamp(torch.round(w * (1.0 / s[:, None])), qmin, qmax).to(torch.int8)
    assert torch.equal(q.weight_scale, s)
    assert torch.equal(q.integer_weight(), ints)
    assert q.act == "dynamic" and q.a_bits == 8
    x = torch.randn(6, 21)
    xq, wq = per_token_reference(x, 8), ints.float() * s[:, None]
    torch.testing.assert_close(q(x), F.linear(xq, wq, lin.bias.detach()), **tol(xq, wq, lin.bias))
    # a static input step size may be given instead
    qs = QLinear.from_float(lin, w_bits, 6, observer=observer, act_scale=0.05, a_signed=False)
    xs = ops.fake_quant(x, torch.tensor(0.05), bits=6, signed=False)
    torch.testing.assert_close(qs(x), F.linear(xs, wq, lin.bias.detach()), **tol(xs, wq, lin.bias))


def test_qlinear_dtypes_and_device_moves():
    x = torch.randn(5, 16)
    fq = hard_quantized(QuantLinear(nn.Linear(16, 8), 8, 8), x)
    q = QLinear.from_quant(fq)
    ref = q(x)
    q.to(torch.bfloat16)  # scales and bias stay fp32: only device moves apply
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float32
    assert q.qweight.dtype == torch.int8
    assert torch.equal(q(x), ref)
    xb = x.to(torch.bfloat16)
    yb = q(xb)
    assert yb.dtype == torch.bfloat16  # the fp32 result for the bf16 input, rounded once
    torch.testing.assert_close(yb.float(), q(xb.float()), rtol=2**-8, atol=1e-6 * float(ref.abs().max()))
    y64 = q(x.double())
    assert y64.dtype == torch.float64
    assert q(torch.empty(0, 16)).shape == (0, 8)


def test_state_dict_round_trip_rebuilds_unsigned8_shift():
    x = make_input((4, 10), False)
    fq = hard_quantized(QuantLinear(nn.Linear(10, 6), 8, 8, a_signed=False), x)
    q = QLinear.from_quant(fq)
    assert q.act_shift == 128 and q._epilogue_bias is not None
    fresh = QLinear(10, 6, w_bits=8, a_bits=8, a_signed=False)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


def test_layer_errors():
    fq = hard_quantized(QuantLinear(nn.Linear(8, 4), 4, 4), torch.randn(2, 8))
    q = QLinear.from_quant(fq)
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 8\], got shape \(2, 9\)"):
        q(torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"4-bit weights must lie in \[-8, 7\], got values in \[-9, -9\]"):
        q.set_integers(torch.full((4, 8), -9), torch.ones(4), torch.zeros(4), torch.ones(1))
    with pytest.raises(ValueError, match=r"weight_scale must be finite and > 0"):
        q.set_integers(torch.zeros(4, 8, dtype=torch.int8), torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.zeros(4),
                       torch.ones(1))
    with pytest.raises(ValueError, match=r"q must have shape \(4, 8\)"):
        q.set_integers(torch.zeros(4, 7, dtype=torch.int8), torch.ones(4), torch.zeros(4), torch.ones(1))
    with pytest.raises(ValueError, match="act must be one of"):
        QLinear(8, 4, w_bits=4, a_bits=4, act="per-channel")
    fq.weight_quantizer.set_mode("noise")
    with pytest.raises(ValueError, match="hard-quantized state"):
        QLinear.from_quant(fq)
    with pytest.raises(TypeError, match="takes a hdrq.quant.QuantLinear"):
        QLinear.from_quant(nn.Linear(3, 3))


# ------------------------------------------------------------------------------------------------ QConv2d

@torch.no_grad()
def dynamic_conv_reference(fq, x):
    """What a dynamic QConv2d computes, the float way: per (group, output position) scales (quantize each
    im2col row), then float products of the dequantized rows and weights. Returns (output, rows)."""
    groups, cout, a_bits = fq.groups, fq.out_channels, fq.act_quantizer.bits
    mode = "constant" if fq.padding_mode == "zeros" else fq.padding_mode
    xp = F.pad(x, fq._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(xp, fq.kernel_size, dilation=fq.dilation, stride=fq.stride)  # [N, G*k, L]
    n, _, length = cols.shape
    cols = cols.reshape(n, groups, -1, length).permute(1, 0, 3, 2).reshape(groups, n * length, -1)
    xq = torch.stack([per_token_reference(c.contiguous(), a_bits) for c in cols])
    wg = fq.quantized_weight().reshape(groups, cout // groups, -1)
    ref = torch.cat([xq[g] @ wg[g].t() for g in range(groups)], 1)
    if fq.bias is not None:
        ref = ref + fq.bias
    ho = (xp.shape[2] - fq.dilation[0] * (fq.kernel_size[0] - 1) - 1) // fq.stride[0] + 1
    return ref.reshape(n, ho, length // ho, cout).permute(0, 3, 1, 2), xq


CONV_GEOMETRIES = [  # (in, out, kernel, stride, padding, dilation, groups, padding_mode, input HxW)
    (3, 5, 3, 1, 1, 1, 1, "zeros", (7, 5)),
    (4, 6, (3, 1), 2, (0, 1), 1, 2, "zeros", (9, 6)),
    (6, 6, 3, 1, 2, 2, 6, "zeros", (5, 7)),       # depthwise, dilated
    (3, 4, 2, 1, "same", 1, 1, "zeros", (5, 5)),  # "same" with an even kernel pads unevenly
    (2, 3, 3, 2, 1, 1, 1, "reflect", (6, 7)),
    (5, 2, 1, 1, 0, 1, 1, "zeros", (1, 1)),
]
CONV_QUANT = [(8, 8, True, True), (6, 6, False, True), (6, 6, True, False), (8, 8, False, False),
              (4, 4, False, True), (6, 6, False, False)]


@pytest.mark.parametrize("i", range(len(CONV_GEOMETRIES)))
@pytest.mark.parametrize("act", ["static", "dynamic"])
def test_qconv2d_equals_fake_quant(i, act):
    cin, cout, k, stride, pad, dil, groups, mode, hw = CONV_GEOMETRIES[i]
    w_bits, a_bits, a_signed, bias = CONV_QUANT[i]
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, groups, bias=bias, padding_mode=mode)
    x = make_input((2, cin, *hw), a_signed)
    fq = hard_quantized(QuantConv2d(conv, w_bits, a_bits, a_signed=a_signed), x)
    q = QConv2d.from_quant(fq, act=act)
    x = with_ties(x, fq)
    assert torch.equal(q.integer_weight(), fq.weight_integers().to(torch.int8))
    wq = fq.quantized_weight()
    ref, xq = fq(x), fq.act_quantizer(x)
    if act == "dynamic":
        ref, xq = dynamic_conv_reference(fq, x)
    y = q(x)
    assert y.shape == ref.shape and y.is_contiguous()
    # the largest |term| sum of one output: at most (max |x_q|) * (sum |w| of a filter)
    mag = float(xq.detach().abs().max() * wq.detach().abs().reshape(cout, -1).sum(1).max())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * mag)
    # unbatched input, as nn.Conv2d allows
    torch.testing.assert_close(q(x[1]), y[1], rtol=0, atol=0)


def test_qconv2d_off_act_is_float_and_bit_identical():
    conv = nn.Conv2d(3, 4, 3, 2, 1, bias=True)
    x = torch.randn(1, 3, 9, 8)
    fq = hard_quantized(QuantConv2d(conv, 8, 8, a_enabled=False), x)
    q = QConv2d.from_quant(fq)
    assert q.act == "float" and torch.equal(q(x), fq(x))


def test_qconv2d_from_float_is_rtn():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    q = QConv2d.from_float(conv, 6, 6, observer="minmax")
    w = conv.weight.detach()
    s = minmax_scale(w, 6, True, axis=0)
    ints = torch.clamp(torch.round(w * (1.0 / s[:, None, None, None])), -32, 31).to(torch.int8)
    assert torch.equal(q.integer_weight(), ints) and torch.equal(q.weight_scale, s)
    assert q.spec()["groups"] == 2 and q.spec()["kernel_size"] == [3, 3]
    with pytest.raises(ValueError, match=r"expected input \[N, 4, H, W\], got shape \(1, 3, 5, 5\)"):
        q(torch.randn(1, 3, 5, 5))


# ------------------------------------------------------------------------------------------------ on the GPU


def cuda_gemm_calls():
    from hdrq import _cuda  # the CUDA backend must be built on a GPU machine

    return sum(_cuda.PATH_CALLS.values())


@pytest.mark.cuda
@pytest.mark.parametrize("w_bits,a_bits,a_signed", [(8, 8, True), (8, 8, False), (6, 6, True), (6, 6, False)])
@pytest.mark.parametrize("act", ["static", "dynamic"])
def test_cuda_layers_equal_fake_quant(w_bits, a_bits, a_signed, act):
    dev = "cuda"
    x = make_input((37, 200), a_signed).to(dev)
    fq = hard_quantized(QuantLinear(nn.Linear(200, 129), w_bits, a_bits, a_signed=a_signed).to(dev), x)
    q = QLinear.from_quant(fq, act=act)
    assert q.qweight.is_cuda
    assert torch.equal(q.integer_weight(), fq.weight_integers().to(torch.int8))
    xq = fq.act_quantizer(x) if act == "static" else per_token_reference(x, a_bits)
    ref = F.linear(xq, fq.quantized_weight(), fq.bias).detach()
    calls = cuda_gemm_calls()
    torch.testing.assert_close(q(x), ref, **tol(xq, fq.quantized_weight(), fq.bias))
    assert cuda_gemm_calls() == calls + 1, "the CUDA GEMM did not run (a fallback to the reference?)"
    # bf16 in, bf16 out: the fp32 result for the bf16-rounded input, rounded once to bf16
    xb = x.bfloat16()
    yb = q(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), q(xb.float()), rtol=2**-8, atol=1e-5 * float(ref.abs().max()))
    if act == "static":  # the CPU layer (reference int_matmul) gives the GPU layer's result
        torch.testing.assert_close(q.cpu()(x.cpu()), q.to(dev)(x).cpu(),
                                   **tol(xq.cpu(), fq.quantized_weight().cpu(), fq.bias.cpu()))
    conv = nn.Conv2d(16, 24, 3, 1, 1, groups=2).to(dev)
    xc = make_input((2, 16, 11, 9), a_signed).to(dev)
    fqc = hard_quantized(QuantConv2d(conv, w_bits, a_bits, a_signed=a_signed).to(dev), xc)
    qc = QConv2d.from_quant(fqc, act=act)
    wq = fqc.quantized_weight().detach()
    ref, xq = (fqc(xc), fqc.act_quantizer(xc)) if act == "static" else dynamic_conv_reference(fqc, xc)
    mag = float(xq.detach().abs().max() * wq.abs().reshape(24, -1).sum(1).max())
    calls = cuda_gemm_calls()
    torch.testing.assert_close(qc(xc), ref, rtol=1e-5, atol=1e-5 * mag)
    assert cuda_gemm_calls() == calls + 2  # one GEMM per group, each group's weights 16-byte aligned


def test_grouped_weights_are_16_byte_aligned():
    # 3 groups of [2, 36] 6-bit weights: 54 bytes each, so the slots are rounded up to 64 bytes
    q = QConv2d.from_float(nn.Conv2d(12, 6, 3, groups=3), 6, 6)
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == 3 * 64
    for g, packed in enumerate(q.packed_weights):
        w = packed.data
        assert w.is_contiguous() and (w.data_ptr() - q.qweight.data_ptr()) % 16 == 0
        assert (packed.bits, packed.shape) == (6, (2, 36)) and w.shape == (2, 27)
        assert torch.equal(packed.scale, q.weight_scale[2 * g: 2 * g + 2])


@pytest.mark.parametrize("act_scale", [None, 0.05])
@pytest.mark.parametrize("bits", [6, 8])
def test_qlinear_compiles_without_graph_breaks(bits, act_scale):
    """The deploy layer under torch.compile(fullgraph=True): its ops trace through their fakes, the PackedWeight is
    read off the module, and the result is the eager one."""
    torch.manual_seed(0)
    q = QLinear.from_float(nn.Linear(36, 40), bits, bits, act_scale=act_scale)
    x = torch.randn(3, 5, 36)
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), q(x))
