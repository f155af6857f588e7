"""Error barrier, Hessian trace and the barrier plot."""
import copy
import math

import pytest
import torch
from torch import nn

import hdrq
from hdrq.analysis import error_barrier, hessian_trace, interpolate, plot_barriers
from hdrq.quant import QuantLinear, quant_layers

from conftest import make_generator


class Vector(nn.Module):
    """A model that is just a parameter vector (for losses written directly in the parameters)."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())


def quadratic(Q: torch.Tensor):
    return lambda model, batch: model.theta @ Q @ model.theta


def quant_mlp(seed: int) -> nn.Module:
    """Two quantized linear layers in the hard-quantized state (per-channel 4-bit weights, 8-bit inputs)."""
    g = make_generator(seed)
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(nn.Linear(6, 8), 4, 8), nn.ReLU(), QuantLinear(nn.Linear(8, 3), 4, 8,
                                                                                      a_signed=False))
    for _, layer in quant_layers(model):
        s = torch.rand(layer.weight.shape[0], generator=g) * 0.1 + 0.05
        q = torch.randint(-8, 8, layer.weight.shape, generator=g)
        layer.weight_quantizer.set_scale(s)
        layer.weight.data = s[:, None] * q.float()
        layer.bias.data = torch.randn(layer.bias.shape, generator=g) * 0.1
        layer.act_quantizer.set_scale(torch.tensor(0.05))
    return model


def batches(seed: int = 0, n: int = 3):
    g = make_generator(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


# --------------------------------------------------------------------------------------------------
# Error barrier
# --------------------------------------------------------------------------------------------------


def test_barrier_with_itself_is_zero():
    data = batches()
    m = quant_mlp(1)
    for quant_noise in (False, True):
        r = error_barrier(m, copy.deepcopy(m), ce, data, steps=5, quant_noise=quant_noise, verbose=False)
        assert r["barrier"] == 0.0  # exact: the same model and (common) noise at every point
        assert len(set(r["losses"])) == 1
        assert r["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    f = nn.Linear(6, 3)
    assert error_barrier(f, copy.deepcopy(f), ce, data, steps=3, verbose=False)["barrier"] == 0.0


def test_barrier_of_a_quadratic_matches_the_analytic_value():
    # L(theta) = theta^T Q theta with an indefinite Q: along the line L is a quadratic in l
    Q = torch.tensor([[1.0, 0.5, 0.0], [0.5, -2.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
    a, b = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-1.0, 1.5, 0.5])
    r = error_barrier(Vector(a), Vector(b), quadratic(Q), [None], steps=11, verbose=False)
    expect = []
    for lam in torch.linspace(0, 1, 11, dtype=torch.float64):
        t = (1 - lam) * a.double() + lam * b.double()
        expect.append(float(t @ Q @ t))
    assert r["losses"] == pytest.approx(expect, rel=1e-12, abs=1e-12)
    assert r["barrier"] == pytest.approx(max(expect) - (expect[0] + expect[-1]) / 2, rel=1e-12)
    # symmetric points of a -theta / theta pair under L = -|theta|^2: the barrier is |theta|^2
    th = torch.tensor([0.3, -1.2, 2.0])
    r = error_barrier(Vector(th), Vector(-th), quadratic(-torch.eye(3, dtype=torch.float64)), [0], steps=11,
                      verbose=False)
    assert r["barrier"] == pytest.approx(float(th.double() @ th.double()), rel=1e-12)
    assert r["losses"][5] == pytest.approx(0.0, abs=1e-15)


def test_quantized_barrier_endpoints_and_noise():
    data = batches(1)
    a, b = quant_mlp(2), quant_mlp(3)
    r = error_barrier(a, b, ce, data, steps=5, verbose=False)
    with torch.no_grad():
        la = sum(float(ce(a.eval(), x)) for x in data) / len(data)
        lb = sum(float(ce(b.eval(), x)) for x in data) / len(data)
    assert r["loss_a"] == pytest.approx(la, rel=1e-6) and r["loss_b"] == pytest.approx(lb, rel=1e-6)
    assert r["barrier"] >= abs(la - lb) / 2 - 1e-9
    # the midpoint is the interpolated model, hard-quantized at the interpolated step sizes
    mid = interpolate(a, b, 0.5).eval()
    with torch.no_grad():
        lm = sum(float(ce(mid, x)) for x in data) / len(data)
    assert r["losses"][2] == pytest.approx(lm, rel=1e-6)
    rn = error_barrier(a, b, ce, data, steps=5, quant_noise=True, draws=2, seed=4, verbose=False)
    rn2 = error_barrier(a, b, ce, data, steps=5, quant_noise=True, draws=2, seed=4, verbose=False)
    rn3 = error_barrier(a, b, ce, data, steps=5, quant_noise=True, draws=2, seed=5, verbose=False)
    assert rn["losses"] == rn2["losses"]  # seeded
    assert rn["losses"] != rn3["losses"] and rn["losses"] != r["losses"]  # the noise is there
    assert rn["draws"] == 2 and len(rn["losses_std"]) == 5 and max(rn["losses_std"]) > 0
    assert set(r) >= {"lambdas", "losses", "barrier"}


def test_quantized_noise_is_at_the_step_size():
    """With quant_noise, a layer's weight is W + s*u: the loss of a linear probe sees exactly that noise."""
    layer = QuantLinear(nn.Linear(4000, 1, bias=False), 4, 8, a_enabled=False, per_channel=False)
    layer.weight_quantizer.set_scale(torch.tensor(0.2))
    layer.weight.data.zero_()
    model = nn.Sequential(layer)
    x = torch.ones(1, 4000)
    # loss = mean of (w_j)^2 = s^2 * E[u^2] = s^2 / 12 under the noise, 0 without
    loss = lambda m, batch: (m[0].weight_quantizer(m[0].weight) ** 2).mean() + 0 * m(x).sum()
    r = error_barrier(model, copy.deepcopy(model), loss, [0], steps=2, quant_noise=True, draws=3, verbose=False)
    assert r["losses"][0] == pytest.approx(0.04 / 12, rel=0.05)
    assert error_barrier(model, copy.deepcopy(model), loss, [0], steps=2, verbose=False)["losses"][0] == 0.0


def test_barrier_errors():
    a, b = quant_mlp(1), quant_mlp(2)
    with pytest.raises(TypeError, match="re-iterable"):
        error_barrier(a, b, ce, iter(batches()), verbose=False)
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        error_barrier(a, b, ce, batches(), steps=1, verbose=False)
    with pytest.raises(ValueError, match="no QuantLinear"):
        error_barrier(nn.Linear(6, 3), nn.Linear(6, 3), ce, batches(), quant_noise=True, verbose=False)
    with pytest.raises(ValueError, match=r"error_barrier: model 1 does not match model 0: tensor '0.weight'"):
        error_barrier(nn.Sequential(nn.Linear(6, 3)), nn.Sequential(nn.Linear(5, 3)), ce, batches(), verbose=False)
    with pytest.raises(ValueError, match="scalar tensor"):
        error_barrier(a, b, lambda m, x: m(x[0]), batches(), verbose=False)
    with pytest.raises(ValueError, match="no batches"):
        error_barrier(a, b, ce, [], verbose=False)


# --------------------------------------------------------------------------------------------------
# Hessian trace
# --------------------------------------------------------------------------------------------------


def test_hessian_trace_of_a_quadratic():
    # L = 1/2 theta^T Q theta + c^T theta: H = Q. Rademacher probes give a diagonal Q's trace exactly.
    g = make_generator(7)
    diag = torch.diag(torch.randn(20, generator=g, dtype=torch.float64))
    c = torch.randn(20, generator=g, dtype=torch.float64)
    loss = lambda Q: (lambda m, batch: 0.5 * m.theta @ Q @ m.theta + c @ m.theta)
    theta = torch.randn(20, generator=g, dtype=torch.float64)
    r = hessian_trace(Vector(theta), loss(diag), [0], samples=4, verbose=False)
    assert r["trace"] == pytest.approx(float(diag.trace()), rel=1e-12)
    assert r["std_error"] == pytest.approx(0.0, abs=1e-12)
    # a dense Q: unbiased, with variance 2 * sum_{i != j} Q_ij^2 per probe
    A = torch.randn(20, 20, generator=g, dtype=torch.float64)
    Q = (A + A.T) / 2
    n = 400
    r = hessian_trace(Vector(theta), loss(Q), [0, 1], samples=n, seed=3, verbose=False)
    sd = math.sqrt(2 * float((Q ** 2).sum() - (Q.diag() ** 2).sum()) / n)
    assert abs(r["trace"] - float(Q.trace())) < 4 * sd
    assert r["std_error"] == pytest.approx(sd, rel=0.25)
    again = hessian_trace(Vector(theta), loss(Q), [0, 1], samples=n, seed=3, verbose=False)
    assert again["estimates"] == r["estimates"]  # seeded


def test_hessian_trace_of_a_quantized_model_uses_its_float_weights():
    m = quant_mlp(5)
    data = batches(2, n=2)
    fl = nn.Sequential(m[0].float_module(), nn.ReLU(), m[2].float_module())
    rq = hessian_trace(m, ce, data, samples=3, seed=1, verbose=False)
    rf = hessian_trace(fl, ce, data, samples=3, seed=1, verbose=False)
    assert rq["estimates"] == pytest.approx(rf["estimates"], rel=1e-5)
    assert m[0].weight_quantizer.mode == "hard"  # the input model is untouched
    sub = hessian_trace(m, ce, data, samples=2, params=["2.weight"], verbose=False)
    assert len(sub["estimates"]) == 2
    with pytest.raises(ValueError, match="no parameters"):
        hessian_trace(m, ce, data, samples=2, params=["nope"], verbose=False)


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def test_plot_barriers(tmp_path):
    pytest.importorskip("matplotlib")
    data = batches(3)
    a, b = quant_mlp(6), quant_mlp(7)
    results = {"hard": error_barrier(a, b, ce, data, steps=6, verbose=False),
               "quant noise": error_barrier(a, b, ce, data, steps=6, quant_noise=True, draws=2, verbose=False)}
    path = plot_barriers(results, tmp_path / "sub" / "barriers.png")
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
    with pytest.raises(ValueError, match="not an error_barrier result"):
        plot_barriers({"x": {"losses": [1]}}, tmp_path / "bad.png")


def test_plot_barriers_without_matplotlib(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install 'hdrq\[plot\]'"):
        plot_barriers({"x": {"lambdas": [0, 1], "losses": [1, 1], "barrier": 0}}, tmp_path / "x.png")


def test_public_name():
    assert hdrq.error_barrier is error_barrier
    assert hdrq.analysis.hessian_trace is hessian_trace


@pytest.mark.cuda
def test_error_barrier_on_cuda_matches_cpu():
    data = batches(4)
    a, b = quant_mlp(8), quant_mlp(9)
    cpu = error_barrier(a, b, ce, data, steps=5, quant_noise=True, draws=2, verbose=False)
    gdata = [(x.cuda(), y.cuda()) for x, y in data]
    gpu = error_barrier(a.cuda(), b.cuda(), ce, gdata, steps=5, quant_noise=True, draws=2, verbose=False)
    # the noise is Philox on every device, so only float rounding differs
    assert gpu["losses"] == pytest.approx(cpu["losses"], rel=1e-4)
