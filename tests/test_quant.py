"""Quantizer module, observers, fake-quantized layers, BatchNorm folding."""
import pytest
import torch
from torch import nn

from hdrq import ops
from hdrq.quant import (MinMaxObserver, MSEObserver, QuantConv2d, QuantLinear, Quantizer, fold_batchnorm,
                        fold_bn, minmax_scale, mse_scale, quant_layers)

torch.manual_seed(0)


def test_quantizer_modes():
    q = Quantizer(4, axis=1, channels=3)
    q.set_scale(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.randn(5, 3)
    assert torch.equal(q(x), ops.fake_quant(x, q.scale.detach(), bits=4, axis=1))
    q.set_mode("off")
    assert q(x) is x
    q.set_mode("noise")
    a, b = q(x), q(x)
    assert not torch.equal(a, b)  # a fresh seed per call
    q2 = Quantizer(4, axis=1, channels=3, mode="noise")
    q2.set_scale(torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(q2(x), a)  # same base seed, same sequence
    with pytest.raises(ValueError, match="mode must be"):
        q.set_mode("soft")


def test_quantizer_bad_args():
    with pytest.raises(ValueError, match="2 to 8"):
        Quantizer(9)
    with pytest.raises(ValueError, match="channels"):
        Quantizer(4, axis=0)
    with pytest.raises(ValueError, match="expected 3 step sizes"):
        Quantizer(4, axis=0, channels=3).set_scale(torch.ones(4))


def test_quantizer_learns_scale_and_negative_scale_is_safe():
    q = Quantizer(4)
    q.set_scale(torch.tensor(-0.1))  # an optimiser may push it negative: |s| is used
    x = torch.randn(100)
    torch.testing.assert_close(q(x), ops.fake_quant(x, torch.tensor(0.1), bits=4))
    q(x).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.shape == ()


def test_quantizer_drop_only_in_training():
    q = Quantizer(3, drop_prob=0.5)
    q.set_scale(torch.tensor(0.5))
    x = torch.randn(1000)
    y = q(x)
    kept = (y == x).float().mean()
    assert 0.4 < kept < 0.7  # dropped half plus those that quantize exactly
    q.eval()
    assert torch.equal(q(x), ops.fake_quant(x, torch.tensor(0.5), bits=3))


def test_quantizer_integers():
    q = Quantizer(4, axis=0, channels=2)
    q.set_scale(torch.tensor([0.1, 0.5]))
    w = torch.randn(2, 6)
    ints = q.integers(w)
    assert ints.dtype == torch.int32 and ints.min() >= -8 and ints.max() <= 7
    torch.testing.assert_close(ints.float() * torch.tensor([[0.1], [0.5]]), q(w), rtol=0, atol=1e-6)


def test_rounding_hook():
    q = Quantizer(4)
    q.set_scale(torch.tensor(0.5))
    q.rounding = lambda x, s: torch.floor(x / s).clamp(q.qmin, q.qmax) * s
    x = torch.tensor([0.9, -0.1])
    assert torch.equal(q(x), torch.tensor([0.5, -0.5]))


def test_minmax_scale():
    x = torch.tensor([[-3.0, 1.0], [2.0, 0.5]])
    assert torch.isclose(minmax_scale(x, 8, True), torch.tensor(3.0 / 128))
    torch.testing.assert_close(minmax_scale(x, 8, True, axis=0), torch.tensor([3.0 / 128, 2.0 / 127]))
    torch.testing.assert_close(minmax_scale(x, 4, False), torch.tensor(2.0 / 15))
    assert minmax_scale(torch.zeros(4), 4, True) > 0


def test_mse_scale_beats_minmax_with_outliers():
    x = torch.randn(4096)
    x[0] = 40.0
    s_mm, s_mse = minmax_scale(x, 4, True), mse_scale(x, 4, True)
    assert s_mse < s_mm

    def err(s):
        return (ops.fake_quant(x, s, bits=4) - x).abs().pow(2.4).sum()

    assert err(s_mse) < err(s_mm)


def test_mse_scale_per_channel_equals_per_tensor_loop():
    w = torch.randn(6, 3, 3, 3) * torch.rand(6, 1, 1, 1)
    per_channel = mse_scale(w, 4, True, axis=0, max_chunk_elements=500)  # several chunks
    loop = torch.stack([mse_scale(w[c], 4, True) for c in range(6)])
    assert torch.equal(per_channel, loop)
    w2 = w.transpose(0, 1)
    torch.testing.assert_close(mse_scale(w2, 4, True, axis=1), per_channel)


def test_observers_accumulate():
    mm = MinMaxObserver(8, False)
    mm.update(torch.tensor([0.0, 1.0]))
    mm.update(torch.tensor([3.0]))
    assert torch.isclose(mm.scale(), torch.tensor(3.0 / 255))
    mse = MSEObserver(4, True, axis=None)
    data = torch.randn(3, 100)
    for row in data:
        mse.update(row)
    assert torch.equal(mse.scale(), mse_scale(data, 4, True))
    with pytest.raises(RuntimeError, match="before any update"):
        MinMaxObserver(8, True).scale()


@pytest.mark.parametrize("per_channel", [True, False])
def test_quant_linear_and_conv(per_channel):
    lin = nn.Linear(7, 5)
    ql = QuantLinear(lin, 4, 8, per_channel=per_channel)
    ql.weight_quantizer.set_scale(minmax_scale(lin.weight, 4, True, axis=0 if per_channel else None))
    ql.act_quantizer.set_scale(torch.tensor(0.05))
    x = torch.randn(3, 7)
    w_axis = 0 if per_channel else None
    expect = nn.functional.linear(ops.fake_quant(x, torch.tensor(0.05), bits=8),
                                  ops.fake_quant(lin.weight, ql.weight_quantizer.scale.detach(), bits=4, axis=w_axis),
                                  lin.bias)
    torch.testing.assert_close(ql(x), expect)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
    qc = QuantConv2d(conv, 8, 8, per_channel=per_channel, a_enabled=False)
    qc.weight_quantizer.set_scale(minmax_scale(conv.weight, 8, True, axis=w_axis))
    xi = torch.randn(2, 3, 9, 9)
    wq = ops.fake_quant(conv.weight, qc.weight_quantizer.scale.detach(), bits=8, axis=w_axis)
    expect = nn.functional.conv2d(nn.functional.pad(xi, (1, 1, 1, 1), mode="reflect"), wq, conv.bias, stride=2)
    torch.testing.assert_close(qc(xi), expect)
    torch.testing.assert_close(qc(xi), conv(xi), atol=0.05, rtol=0)
    assert not any(isinstance(m, nn.Conv2d) for m in qc.modules())
    f = qc.float_module()
    torch.testing.assert_close(f(xi), conv(xi))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + x
        return self.fc(y.mean((2, 3)))


class Untraceable(Block):
    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow
            return super().forward(x)
        return x


def _randomize_bn(m):
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.uniform_(-1, 1)
            b.running_var.uniform_(0.5, 2)
            b.weight.data.uniform_(0.5, 1.5)
            b.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("cls", [Block, Untraceable])
def test_fold_batchnorm(cls):
    m = cls().eval()
    _randomize_bn(m)
    x = torch.randn(2, 3, 6, 6)
    if cls is Untraceable:
        with pytest.warns(RuntimeWarning, match="FX tracing failed"):
            f = fold_batchnorm(m)
    else:
        f = fold_batchnorm(m)
    assert isinstance(f.bn1, nn.Identity) and isinstance(f.bn2, nn.Identity)
    assert isinstance(m.bn1, nn.BatchNorm2d)  # input untouched
    torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-5)


def test_fold_bn_mismatch():
    with pytest.raises(ValueError, match="4 features"):
        fold_bn(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(4))


def test_quant_layers_iterates():
    m = nn.Sequential(QuantLinear(nn.Linear(2, 2), 4, 4), nn.ReLU(), QuantConv2d(nn.Conv2d(1, 1, 1), 4, 4))
    assert [n for n, _ in quant_layers(m)] == ["0", "2"]
