"""Merging: average, task arithmetic, TIES, the HDRQ merge (ambiguity rule, cosine filter, seeding)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hdrq
from hdrq.merge import (ambiguous_mask, candidate_noise, check_compatible, filter_candidates, merge, merge_weight,
                        ties_delta)
from hdrq.quant import QuantConv2d, QuantLinear, quant_layers
from hdrq.reference import mix_seed, qrange

from conftest import make_generator

METHODS = ("average", "task_arithmetic", "ties", "hdrq")


def set_layer(layer, integers: torch.Tensor, step: torch.Tensor) -> None:
    """Put a quantized layer in the hard-quantized state with the given integers and step sizes."""
    layer.weight_quantizer.set_scale(step)
    s = step.reshape(-1, *([1] * (integers.dim() - 1))) if step.numel() > 1 else step.reshape(())
    layer.weight.data = s * integers.float()


def quant_model(seed: int, bits: int = 4, per_channel: bool = True) -> nn.Module:
    """A small conv + linear quantized model with random integers, step sizes, biases and act scales."""
    g = make_generator(seed)
    torch.manual_seed(0)  # same float init everywhere; everything that matters is set below
    model = nn.Sequential(QuantConv2d(nn.Conv2d(3, 5, 3), bits, 8, per_channel=per_channel), nn.ReLU(),
                          nn.Flatten(), QuantLinear(nn.Linear(5 * 3 * 3, 3), bits, 8, per_channel=per_channel,
                                                    a_signed=False))
    qmin, qmax = qrange(bits, True)
    for _, layer in quant_layers(model):
        shape = layer.weight.shape
        q = torch.randint(qmin, qmax + 1, shape, generator=g, dtype=torch.int32)
        step = torch.rand(shape[0] if per_channel else (), generator=g) * 0.1 + 0.02
        set_layer(layer, q, step)
        layer.bias.data = torch.randn(shape[0], generator=g)
        layer.act_quantizer.set_scale(torch.rand((), generator=g) + 0.1)
    return model


def assert_contract(model: nn.Module) -> None:
    """Every quantized layer is in the hard-quantized state: weight == step * integers exactly, on the grid."""
    for name, layer in quant_layers(model):
        wq = layer.weight_quantizer
        q = layer.weight_integers()
        assert wq.mode == "hard" and wq.rounding is None, name
        assert q.min() >= wq.qmin and q.max() <= wq.qmax, name
        s = wq.step_size().detach()
        s = s.reshape(-1, *([1] * (q.dim() - 1))) if s.numel() > 1 else s
        assert torch.equal(layer.weight.detach(), s * q.float()), name


# --------------------------------------------------------------------------------------------------
# Copies merge to themselves
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_copies_merge_to_the_same_model(method, per_channel):
    model = quant_model(1, per_channel=per_channel)
    copies = [copy.deepcopy(model) for _ in range(3)]
    # TIES trims the task vector, so it only reproduces the model unchanged when nothing is trimmed (k=1).
    kw = {"source": quant_model(2, per_channel=per_channel), "k": 1.0} if method in ("task_arithmetic", "ties") else {}
    merged = merge(copies, method=method, seed=5, candidates=7, verbose=False, **kw)
    for (name, a), (_, b) in zip(quant_layers(model), quant_layers(merged)):
        assert torch.equal(a.weight_integers(), b.weight_integers()), name
        assert torch.equal(a.weight_quantizer.step_size(), b.weight_quantizer.step_size()), name
    for (key, a), b in zip(model.state_dict().items(), merged.state_dict().values()):
        assert torch.equal(a, b), key
    assert_contract(merged)
    for m in copies:  # inputs untouched
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))


def test_ties_with_the_model_as_source_is_the_model():
    model = quant_model(3)
    merged = merge([model, copy.deepcopy(model)], method="ties", source=model, verbose=False)
    for (name, a), (_, b) in zip(quant_layers(model), quant_layers(merged)):
        assert torch.equal(a.weight_integers(), b.weight_integers()), name


# --------------------------------------------------------------------------------------------------
# "average" on hand-made integers
# --------------------------------------------------------------------------------------------------


def linear_model(q: list, step, bias: list, act: float) -> nn.Module:
    q = torch.tensor(q, dtype=torch.int32)
    layer = QuantLinear(nn.Linear(q.shape[1], q.shape[0]), 4, 8)
    set_layer(layer, q, torch.as_tensor(step, dtype=torch.float32))
    layer.bias.data = torch.tensor(bias)
    layer.act_quantizer.set_scale(torch.tensor(act))
    return nn.Sequential(layer)


def test_average_hand_made():
    # per-channel steps: row 0 (0.1, 0.3), row 1 equal (0.2, 0.2); S = (0.2, 0.2)
    a = linear_model([[1, 2, -3, 7, -8], [1, 3, -1, 2, 0]], [0.1, 0.2], [1.0, -2.0], 0.5)
    b = linear_model([[2, 2, -4, 6, 7], [0, 0, 0, 2, -5]], [0.3, 0.2], [3.0, 0.0], 1.5)
    merged = merge([a, b], method="average", verbose=False)
    layer = merged[0]
    # row 0: t = (0.1 q_a + 0.3 q_b) / 0.4 = [1.75, 2, -3.75, 6.25, 3.25]
    # row 1: t = (q_a + q_b) / 2 = [0.5, 1.5, -0.5, 2, -2.5], ties to even
    expect = torch.tensor([[2, 2, -4, 6, 3], [0, 2, 0, 2, -2]], dtype=torch.int32)
    assert torch.equal(layer.weight_integers(), expect)
    torch.testing.assert_close(layer.weight_quantizer.step_size().detach(), torch.tensor([0.2, 0.2]))
    torch.testing.assert_close(layer.bias.detach(), torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(layer.act_quantizer.step_size().detach(), torch.tensor(1.0))
    assert_contract(merged)
    # weights=: 3:1 towards a. row 1: t = 0.75 q_a + 0.25 q_b = [0.75, 2.25, -0.75, 2, -1.25]
    merged = merge([a, b], method="average", weights=[3, 1], verbose=False)
    assert torch.equal(merged[0].weight_integers()[1], torch.tensor([1, 2, -1, 2, -1], dtype=torch.int32))
    torch.testing.assert_close(merged[0].bias.detach(), torch.tensor([1.5, -1.5]))


# --------------------------------------------------------------------------------------------------
# The HDRQ merge
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tol", [0.0, 0.1, 0.25, 0.49])
def test_ambiguity_is_the_odd_sum_rule_for_two_equal_steps(tol):
    g = make_generator(4)
    q1, q2 = (torch.randint(-32, 32, (17, 33), generator=g, dtype=torch.int32) for _ in range(2))
    step = torch.rand(17, generator=g) * 0.1 + 0.01
    odd = (q1 + q2) % 2 == 1
    t = (step[:, None].double() * q1 * 0.5 + step[:, None].double() * q2 * 0.5) / step[:, None].double()
    assert torch.equal(ambiguous_mask(t, tol), odd)
    res = merge_weight([q1, q2], [step, step], bits=6, seed=3, candidates=5, tol=tol)
    assert res.ambiguous == int(odd.sum()) > 0
    # even sums are the exact average; odd sums go to one of the two neighbours of the midpoint
    total = (q1 + q2).to(torch.int64)
    assert torch.equal(res.integers[~odd].to(torch.int64), total[~odd] // 2)
    lo = torch.div(total[odd], 2, rounding_mode="floor")
    assert (((res.integers[odd] == lo) | (res.integers[odd] == lo + 1))).all()
    assert torch.equal(res.step, step)


def bruteforce_hdrq(ints, steps, weights, seed, candidates, tol, bits):
    """The HDRQ merge written as the authors' loop: one full-size candidate at a time, noise on the
    ambiguous elements, round the noised mean, fp64 cosine similarity of the whole flattened tensor."""
    n, rows = len(ints), steps[0].numel()
    qmin, qmax = qrange(bits, True)
    s = [x.reshape(rows, 1).double() for x in steps]
    wq = [si * qi.reshape(rows, -1).double() for si, qi in zip(s, ints)]
    S = sum(w * si for w, si in zip(weights, s))
    avg = sum(w * x for w, x in zip(weights, wq))
    t = avg / S
    mask = ((t - t.floor()) - 0.5).abs() <= tol
    best, best_cos, accepted = None, None, []
    for c in range(candidates):
        u = candidate_noise(seed, c, n, int(mask.sum()), "cpu")
        noised = []
        for i in range(n):
            noise = torch.zeros_like(wq[i])
            noise[mask] = u[i].double() * s[i].expand_as(noise)[mask]
            noised.append(wq[i] - noise)
        cand = torch.round(sum(w * x for w, x in zip(weights, noised)) / S).clamp(qmin, qmax)
        cos = [F.cosine_similarity((S * cand - wq[i]).flatten(), (avg - wq[i]).flatten(), dim=0).abs().item()
               for i in range(n)]
        if c == 0 or all(a > b for a, b in zip(cos, best_cos)):
            best, best_cos = cand, cos
            accepted.append(c)
    return best.to(torch.int32).reshape(ints[0].shape), accepted


@pytest.mark.parametrize("n, equal_steps, weights, shape", [
    (2, True, None, (6, 3, 2, 2)),
    (2, False, None, (6, 3, 2, 2)),
    (3, False, [0.5, 0.3, 0.2], (6, 12)),
    (3, True, None, (1, 25)),
    (2, False, None, (1, 40)),  # per tensor
])
def test_hdrq_merge_equals_the_authors_loop(n, equal_steps, weights, shape):
    g = make_generator(10 + n)
    ints = [torch.randint(-8, 8, shape, generator=g, dtype=torch.int32) for _ in range(n)]
    rows = shape[0] if len(shape) > 2 or shape[0] > 1 else 1
    steps = [torch.rand(rows, generator=g) * 0.1 + 0.01 for _ in range(n)]
    if equal_steps:
        steps = [steps[0]] * n
    w = [1.0 / n] * n if weights is None else weights
    res = merge_weight(ints, steps, bits=4, weights=weights, seed=11, candidates=30)
    expect, accepted = bruteforce_hdrq(ints, steps, w, 11, 30, 0.25, 4)
    assert res.accepted == accepted
    assert torch.equal(res.integers, expect)
    assert res.cosines.shape == (30, n)


def test_hdrq_filter_is_exercised():
    """The brute-force comparison above only tests the filter if some candidates after the first win."""
    g = make_generator(12)
    ints = [torch.randint(-8, 8, (6, 12), generator=g, dtype=torch.int32) for _ in range(3)]
    steps = [torch.rand(6, generator=g) * 0.1 + 0.01 for _ in range(3)]
    res = merge_weight(ints, steps, bits=4, weights=[0.5, 0.3, 0.2], seed=11, candidates=30)
    assert len(res.accepted) > 1


def test_cosine_filter_needs_every_model_to_improve():
    table = torch.tensor([
        [0.50, 0.50],   # 0: always accepted
        [0.60, 0.40],   # model 0 improves, model 1 does not: rejected
        [0.40, 0.90],   # model 1 improves, model 0 does not: rejected
        [0.55, 0.50],   # a tie for model 1 is not an improvement: rejected
        [0.70, 0.60],   # both improve: accepted
        [0.65, 0.95],   # better than 0 for both, but not than 4 for model 0: rejected
        [0.80, 0.61],   # both improve over 4: accepted
    ])
    assert filter_candidates(table) == [0, 4, 6]
    assert filter_candidates(table[:1]) == [0]
    assert filter_candidates(torch.tensor([[0.3, 0.2, 0.1], [0.4, 0.3, 0.1], [0.5, 0.1, 0.2]])) == [0]


def test_cosine_filter_on_constructed_candidates():
    """merge_weight's candidate table against cosines computed directly from each candidate's integers."""
    q1 = torch.tensor([[0, 2, 5, -3, 1, 1]], dtype=torch.int32)
    q2 = torch.tensor([[1, 4, 2, -2, 0, 3]], dtype=torch.int32)
    s1, s2 = torch.tensor([0.1]), torch.tensor([0.3])
    res = merge_weight([q1, q2], [s1, s2], bits=4, seed=2, candidates=20, tol=0.45)
    S = 0.2
    avg = (0.1 * q1.double() + 0.3 * q2.double()) / 2
    t = avg / S
    mask = ((t - t.floor()) - 0.5).abs() <= 0.45
    assert res.ambiguous == int(mask.sum())
    for c in range(20):
        u = candidate_noise(2, c, 2, res.ambiguous, "cpu").double()
        nu = (0.5 * 0.1 * u[0] + 0.5 * 0.3 * u[1]) / S
        cand = torch.round(t)
        cand[mask] = torch.round(t[mask] - nu)
        for i, wq in enumerate((0.1 * q1.double(), 0.3 * q2.double())):
            cos = F.cosine_similarity((S * cand - wq).flatten(), (avg - wq).flatten(), dim=0).abs()
            assert math.isclose(res.cosines[c, i].item(), cos.item(), rel_tol=1e-6), (c, i)
    assert res.accepted == filter_candidates(res.cosines)


def test_hdrq_is_seeded():
    models = [quant_model(s) for s in (20, 21)]
    a = merge(models, seed=1, candidates=10, verbose=False)
    b = merge(models, seed=1, candidates=10, verbose=False)
    c = merge(models, seed=2, candidates=10, verbose=False)
    ia = [l.weight_integers() for _, l in quant_layers(a)]
    assert all(torch.equal(x, l.weight_integers()) for x, (_, l) in zip(ia, quant_layers(b)))
    assert not all(torch.equal(x, l.weight_integers()) for x, (_, l) in zip(ia, quant_layers(c)))
    assert a.hdrq_merge["layers"]["0"]["ambiguous"] > 0
    assert a.hdrq_merge["config"]["seed"] == 1
    assert_contract(a)
    # the torch.Generator noise source is seeded too
    d = merge(models, seed=1, candidates=10, rng="torch", verbose=False)
    e = merge(models, seed=1, candidates=10, rng="torch", verbose=False)
    assert all(torch.equal(x.weight_integers(), y.weight_integers())
               for (_, x), (_, y) in zip(quant_layers(d), quant_layers(e)))


def test_hdrq_layer_seeds():
    """Layer l of merge() is merge_weight with seed mix_seed(seed, l)."""
    models = [quant_model(s) for s in (30, 31)]
    merged = merge(models, seed=9, candidates=6, verbose=False)
    for idx, (name, layer) in enumerate(quant_layers(merged)):
        mods = [m.get_submodule(name) for m in models]
        res = merge_weight([m.weight_integers() for m in mods], [m.weight_quantizer.step_size().detach() for m in mods],
                           bits=4, seed=mix_seed(9, idx), candidates=6)
        assert torch.equal(layer.weight_integers(), res.integers)


def test_hdrq_chunking_does_not_change_the_result():
    g = make_generator(40)
    ints = [torch.randint(-8, 8, (9, 13), generator=g, dtype=torch.int32) for _ in range(2)]
    steps = [torch.rand(9, generator=g) * 0.1 + 0.01 for _ in range(2)]
    a = merge_weight(ints, steps, bits=4, seed=4, candidates=9)
    b = merge_weight(ints, steps, bits=4, seed=4, candidates=9, chunk_elements=1)
    assert torch.equal(a.integers, b.integers) and a.accepted == b.accepted
    torch.testing.assert_close(a.cosines, b.cosines, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Task arithmetic and TIES
# --------------------------------------------------------------------------------------------------


def test_ties_hand_computation():
    d1 = torch.tensor([0.5, -0.1, 0.3, -0.8, 0.0])
    d2 = torch.tensor([-0.6, 0.2, 0.1, -0.2, 0.0])
    # k = 0.4 keeps ceil(2) magnitudes per delta, ties at the threshold kept:
    #   d1 -> [0.5, 0, 0, -0.8, 0];  |d2| 2nd largest is 0.2 -> [-0.6, 0.2, 0, -0.2, 0]
    # sum [-0.1, 0.2, 0, -1.0, 0] -> signs [-, +, (total -0.9 -> -), -, -]
    # disjoint means: [-0.6, 0.2, 0, (-0.8 - 0.2) / 2, 0]
    expect = torch.tensor([-0.6, 0.2, 0.0, -0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ties_delta([d1, d2], 0.4), expect)
    # through merge() on float models, with lam
    src = nn.Linear(5, 1, bias=False)
    src.weight.data = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    models = []
    for d in (d1, d2):
        m = copy.deepcopy(src)
        m.weight.data = src.weight.data + d
        models.append(m)
    merged = merge(models, method="ties", source=src, k=0.4, lam=2.0, verbose=False)
    torch.testing.assert_close(merged.weight.data, (src.weight.data.double() + 2 * expect).float())


def test_task_arithmetic_float_and_quantized():
    src = nn.Linear(4, 2)
    models = [copy.deepcopy(src) for _ in range(3)]
    for i, m in enumerate(models):
        m.weight.data += 0.1 * (i + 1)
        m.bias.data -= 0.2 * (i + 1)
    merged = merge(models, method="task_arithmetic", source=src, lam=0.5, verbose=False)
    torch.testing.assert_close(merged.weight.data, src.weight.data + 0.5 * 0.6)
    torch.testing.assert_close(merged.bias.data, src.bias.data - 0.5 * 1.2)
    # quantized: source + lam * sum of dequantized deltas, rounded onto the averaged grid
    a = linear_model([[1, -2, 3]], [0.1], [0.0], 1.0)
    b = linear_model([[3, 0, 3]], [0.1], [1.0], 1.0)
    fsrc = nn.Sequential(nn.Linear(3, 1))
    fsrc[0].weight.data = torch.tensor([[0.1, -0.1, 0.0]])
    fsrc[0].bias.data = torch.tensor([0.5])
    merged = merge([a, b], method="task_arithmetic", source=fsrc, lam=1.0, verbose=False)
    # 0.1 * ([1,-2,3] + [3,0,3]) - 0.1 * [1,-1,0] = [0.3, -0.1, 0.6] -> integers [3, -1, 6] at step 0.1
    assert torch.equal(merged[0].weight_integers(), torch.tensor([[3, -1, 6]], dtype=torch.int32))
    torch.testing.assert_close(merged[0].bias.data, torch.tensor([0.5 + 1.0 * (-0.5 + 0.5)]))
    assert_contract(merged)
    # a quantized source contributes its dequantized weights: the same source, quantized, gives the same
    qsrc = linear_model([[1, -1, 0]], [0.1], [0.5], 1.0)
    merged_q = merge([a, b], method="task_arithmetic", source=qsrc, lam=1.0, verbose=False)
    assert torch.equal(merged_q[0].weight_integers(), merged[0].weight_integers())
    # clamped to the 4-bit grid
    big = merge([a, b], method="task_arithmetic", source=fsrc, lam=10.0, verbose=False)
    assert big[0].weight_integers().max() == 7


def test_float_models_merge_as_floats():
    g = make_generator(50)
    models = [nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)) for _ in range(2)]
    for m in models:
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=g)
        m[1].running_var.data = torch.rand(3, generator=g) + 0.5
    for method in ("average", "hdrq"):
        merged = merge(models, method=method, weights=[1, 3], verbose=False)
        for key, v in merged.state_dict().items():
            a, b = models[0].state_dict()[key], models[1].state_dict()[key]
            if v.is_floating_point():
                torch.testing.assert_close(v, 0.25 * a + 0.75 * b)
            else:
                assert torch.equal(v, a)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_mismatched_models_raise_naming_the_mismatch():
    a = quant_model(1)
    b = quant_model(2, bits=6)
    with pytest.raises(ValueError, match=r"model 1 .*quantizer '0.weight_quantizer' has bits=6.*bits=4"):
        merge([a, b], verbose=False)
    c = quant_model(2)
    c[3] = QuantLinear(nn.Linear(45, 4), 4, 8, a_signed=False)
    with pytest.raises(ValueError, match=r"tensor '3.weight' is torch.float32 \(4, 45\).*\(3, 45\)"):
        merge([a, c], verbose=False)
    d = nn.Sequential(*list(quant_model(2).children())[:3], nn.Linear(45, 3))
    with pytest.raises(ValueError, match=r"module '3' is a Linear, model 0's is a QuantLinear"):
        merge([a, d], verbose=False)
    e = nn.Sequential(*list(quant_model(2).children()))
    e.add_module("extra", nn.ReLU())
    with pytest.raises(ValueError, match=r"module 'extra' is in only one"):
        merge([a, e], verbose=False)
    f = quant_model(2)
    f[0].weight_quantizer.set_mode("noise")
    with pytest.raises(ValueError, match=r"model 0 does not match|'0.weight_quantizer' has mode="):
        merge([a, f], verbose=False)
    f2, f3 = quant_model(2), quant_model(3)
    for m in (f2, f3):
        m[0].weight_quantizer.set_mode("off")
    with pytest.raises(ValueError, match=r"layer '0' is not in the hard-quantized state"):
        merge([f2, f3], verbose=False)
    with pytest.raises(ValueError, match="at least 2 models"):
        merge([a], verbose=False)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_missing_source_raises(method):
    with pytest.raises(ValueError, match=rf"method '{method}' needs source="):
        merge([quant_model(1), quant_model(2)], method=method, verbose=False)


def test_source_with_unfolded_batchnorm_raises():
    models = [nn.Sequential(nn.Conv2d(2, 3, 3), nn.Identity()) for _ in range(2)]
    src = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="fold_batchnorm"):
        merge(models, method="task_arithmetic", source=src, verbose=False)
    bad_src = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Identity())
    with pytest.raises(ValueError, match=r"source's '0.weight'"):
        merge(models, method="ties", source=bad_src, verbose=False)


def test_bad_options_raise():
    models = [quant_model(1), quant_model(2)]
    with pytest.raises(ValueError, match="method must be one of"):
        merge(models, method="mean", verbose=False)
    with pytest.raises(ValueError, match=r"one entry per model \(2\), got 3"):
        merge(models, weights=[1, 2, 3], verbose=False)
    with pytest.raises(ValueError, match="non-negative"):
        merge(models, weights=[1, -1], verbose=False)
    with pytest.raises(ValueError, match="candidates"):
        merge(models, candidates=0, verbose=False)
    with pytest.raises(ValueError, match="tol"):
        merge(models, tol=0.5, verbose=False)
    with pytest.raises(ValueError, match=r"k \(the fraction"):
        merge(models, method="ties", source=models[0], k=0.0, verbose=False)
    with pytest.raises(ValueError, match="rng"):
        merge(models, rng="mt", verbose=False)
    with pytest.raises(ValueError, match=r"got 1 and 1"):
        merge_weight([torch.zeros(3, dtype=torch.int32)], [torch.ones(())], bits=4)
    with pytest.raises(ValueError, match=r"steps of shape \(2,\)"):
        merge_weight([torch.zeros(3, 4, dtype=torch.int32)] * 2, [torch.ones(2)] * 2, bits=4)
    with pytest.warns(UserWarning, match="ignores it"):
        merge(models, method="average", source=models[0], verbose=False)


def test_check_compatible_accepts_float_models():
    check_compatible([nn.Linear(2, 3), nn.Linear(2, 3)], what="x", require_hard=False)


# --------------------------------------------------------------------------------------------------
# Public name and the merged model
# --------------------------------------------------------------------------------------------------


def test_public_name_is_callable_every_time():
    models = [quant_model(1), quant_model(2)]
    for _ in range(2):  # after the first access the package attribute is the submodule: it must still call
        merged = hdrq.merge(models, method="average", verbose=False)
        assert_contract(merged)


def test_merged_model_runs_and_keeps_attributes():
    models = [quant_model(s) for s in (1, 2, 3)]
    for m in models:
        m.hdrq_config = {"w_bits": 4}
    merged = merge(models, candidates=5, verbose=False)
    assert merged.hdrq_config == {"w_bits": 4}
    x = torch.randn(2, 3, 5, 5)
    y = merged(x)
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    assert set(merged.hdrq_merge["layers"]) == {"0", "3"}


def test_merge_noise_is_the_same_on_the_triton_backend():
    """rng="philox" draws through hdrq.ops.uniform_noise: the Triton kernel gives the reference's numbers."""
    if "triton" not in hdrq.ops.available_backends("cpu"):
        pytest.skip("the Triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    g = make_generator(70)
    ints = [torch.randint(-8, 8, (5, 7), generator=g, dtype=torch.int32) for _ in range(2)]
    steps = [torch.rand(5, generator=g) * 0.1 + 0.01 for _ in range(2)]
    ref = merge_weight(ints, steps, bits=4, seed=1, candidates=4)
    hdrq.set_backend("triton")
    tri = merge_weight(ints, steps, bits=4, seed=1, candidates=4)
    assert torch.equal(ref.integers, tri.integers)
    torch.testing.assert_close(ref.cosines, tri.cosines, rtol=0, atol=0)


@pytest.mark.cuda
def test_merge_weight_cuda_matches_cpu():
    g = make_generator(60)
    ints = [torch.randint(-32, 32, (96, 300), generator=g, dtype=torch.int32) for _ in range(3)]
    steps = [torch.rand(96, generator=g) * 0.1 + 0.01 for _ in range(3)]
    cpu = merge_weight(ints, steps, bits=6, seed=7, candidates=40)
    gpu = merge_weight([x.cuda() for x in ints], [s.cuda() for s in steps], bits=6, seed=7, candidates=40)
    torch.testing.assert_close(gpu.cosines, cpu.cosines, rtol=1e-6, atol=1e-9)
    assert gpu.accepted == cpu.accepted
    assert torch.equal(gpu.integers.cpu(), cpu.integers)
    assert torch.equal(gpu.step.cpu(), cpu.step)


@pytest.mark.cuda
def test_merge_models_on_cuda():
    models = [quant_model(s).cuda() for s in (1, 2)]
    merged = merge(models, candidates=10, verbose=False)
    ref = merge([quant_model(s) for s in (1, 2)], candidates=10, verbose=False)
    for (name, a), (_, b) in zip(quant_layers(merged), quant_layers(ref)):
        assert torch.equal(a.weight_integers().cpu(), b.weight_integers()), name
