"""Loss-landscape analysis of (quantized) models: the error barrier between two models, the Hessian trace,
and a plot of barrier curves.

Error barrier (Frankle et al. 2020): along ``theta(l) = (1 - l) theta_a + l theta_b``
for ``l`` in ``linspace(0, 1, steps)``, ``barrier = max_l L(theta(l)) - (L(theta_a) + L(theta_b)) / 2``.

What is evaluated at each point: a copy of ``model_a`` in eval mode in which *every* floating parameter and
buffer is ``torch.lerp(a, b, l)`` of the two models' tensors: weights, biases, norm parameters, BatchNorm
running statistics, and for quantized models the float weights and every quantizer's step size (weights',
layer inputs' and residual-block boundaries'). Non-floating buffers are model a's. So at ``l = 0`` and ``l = 1`` the two models are
reproduced exactly, and a model paired with itself gives the same model at every point (barrier 0).

* ``quant_noise=False``: the point is evaluated as it is. Float models: the plain float interpolation.
  Quantized models: with their quantizers as configured: each weight is rounded onto the grid of its
  interpolated step size, ``s(l) * clamp(round(W(l) / s(l)))``, and inputs are quantized as the activation
  quantizers say.
* ``quant_noise=True`` (the quantized barrier; quantized models only): each quantized layer's weight gets
  uniform noise at its interpolated step size instead of rounding, ``W(l) + s(l) * u`` with
  ``u ~ U[-0.5, 0.5)`` per element (elements outside the grid's range are clamped to it, as
  ``hdrq.ops.noise_fake_quant`` does). Activations are *not* noised: they stay quantized as configured.
  Each point's loss is the mean over ``draws`` seeded draws; draw ``d`` uses the same noise at every point
  (common random numbers: ``mix_seed(seed, d, layer_index)`` as each layer's quantizer seed, restarted at
  each point), so the curve is smooth in ``l`` and a model paired with itself has barrier exactly 0.

``L`` at a point is the unweighted mean of ``loss_fn(model, batch)`` over the batches of ``data`` (re-iterated
at each point: pass a list or a DataLoader, not a one-shot iterator).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .merge import check_compatible
from .quant.layers import expand_weights, float_state_dict, quant_layers
from .quant.quantizer import Quantizer
from .reference import mix_seed

__all__ = ["error_barrier", "hessian_trace", "plot_barriers", "interpolate"]

LossFn = Callable[[nn.Module, object], Tensor]


def _check_data(data, name: str) -> None:
    if iter(data) is data:
        raise TypeError(f"{name}: data must be re-iterable (a list of batches or a DataLoader): it is read "
                        f"once per point, and a {type(data).__name__} is exhausted after the first")


def _mean_loss(model: nn.Module, loss_fn: LossFn, data, name: str) -> float:
    total, count = None, 0
    for batch in data:
        loss = loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"{name}: loss_fn must return a scalar tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        loss = loss.detach().reshape(()).to(torch.float64)
        total = loss if total is None else total + loss  # summed on the device: one sync per point
        count += 1
    if count == 0:
        raise ValueError(f"{name}: data yielded no batches")
    return float(total) / count


@torch.no_grad()
def interpolate(model_a: nn.Module, model_b: nn.Module, lam: float, *, out: Optional[nn.Module] = None) -> nn.Module:
    """A model whose floating tensors are ``torch.lerp(a, b, lam)`` of the two models' (exact at 0 and 1,
    and for equal tensors); other tensors are model a's. Writes into ``out`` (a model of the same
    architecture) if given, else into a deep copy of ``model_a``."""
    out = expand_weights(copy.deepcopy(model_a) if out is None else out)
    sd_a, sd_b = float_state_dict(model_a), float_state_dict(model_b)
    new = {k: torch.lerp(a, sd_b[k].to(a.device), lam) if a.is_floating_point() else a for k, a in sd_a.items()}
    out.load_state_dict(new)
    return out


def error_barrier(model_a: nn.Module, model_b: nn.Module, loss_fn: LossFn, data: Iterable, *, steps: int = 11,
                  quant_noise: bool = False, draws: int = 3, seed: int = 0, verbose: bool = True) -> dict:
    """The loss along the line from ``model_a`` to ``model_b`` and its error barrier (see the module
    docstring for exactly what is evaluated).

    loss_fn(model, batch) returns a scalar tensor; data is a re-iterable of batches. steps: points on
    ``linspace(0, 1, steps)`` (>= 2). quant_noise: the quantized barrier, uniform weight noise at each
    layer's step size averaged over ``draws`` seeded draws (``seed``). Models are evaluated in eval mode
    under ``torch.no_grad()``; the inputs are untouched.

    Returns ``{"lambdas", "losses", "barrier", "loss_a", "loss_b", "quant_noise", "draws"}``, plus
    ``"losses_std"`` (the spread over draws at each point) with ``quant_noise``."""
    name = "error_barrier"
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"{name}: steps must be an int >= 2, got {steps!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"{name}: draws must be an int >= 1, got {draws!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{name}: seed must be an int >= 0, got {seed!r}")
    if not callable(loss_fn):
        raise TypeError(f"{name}: loss_fn must be a callable loss_fn(model, batch) -> scalar tensor, got "
                        f"{type(loss_fn).__name__}")
    check_compatible([model_a, model_b], what=name, require_hard=False)
    _check_data(data, name)
    work = expand_weights(copy.deepcopy(model_a)).eval()
    layers = [layer for _, layer in quant_layers(work)]
    if quant_noise:
        if not layers:
            raise ValueError(f"{name}: quant_noise=True adds noise at each quantized layer's step size, but the "
                             f"models have no QuantLinear / QuantConv2d layers")
        for layer in layers:
            layer.weight_quantizer.set_mode("noise", "uniform")
    n_draws = draws if quant_noise else 1
    lambdas = torch.linspace(0.0, 1.0, steps, dtype=torch.float64).tolist()
    losses, spreads = [], []
    bar = _progress(steps * n_draws, verbose, "error barrier" + (" (quant noise)" if quant_noise else ""))
    with torch.no_grad():
        for lam in lambdas:
            interpolate(model_a, model_b, lam, out=work)
            point = []
            for d in range(n_draws):
                for idx, layer in enumerate(layers):
                    layer.weight_quantizer.seed = mix_seed(seed, d, idx)
                    layer.weight_quantizer.step = 0
                point.append(_mean_loss(work, loss_fn, data, name))
                if bar is not None:
                    bar.update(1)
            losses.append(math.fsum(point) / len(point))
            spreads.append(_std(point))
    if bar is not None:
        bar.close()
    result = {"lambdas": lambdas, "losses": losses, "barrier": max(losses) - (losses[0] + losses[-1]) / 2,
              "loss_a": losses[0], "loss_b": losses[-1], "quant_noise": bool(quant_noise), "draws": n_draws}
    if quant_noise:
        result["losses_std"] = spreads
    return result


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Iterable, *, samples: int = 32, seed: int = 0,
                  params: Optional[Sequence[str]] = None, verbose: bool = True) -> dict:
    """Hutchinson estimate of the trace of the Hessian of the mean loss over ``data``, for comparing
    flatness (e.g. HDRQ vs QDrop models): ``tr(H) ~ mean_j v_j^T H v_j`` over ``samples`` Rademacher vectors
    ``v_j`` (drawn on the CPU from ``seed``, so the estimate does not depend on the device).

    Evaluated on a copy of ``model`` in eval mode with every quantizer switched off: the Hessian of the
    float network at the model's current weights, which for a quantized model in the hard-quantized state
    are its dequantized weights (a rounding quantizer has zero second derivative almost everywhere, so the
    quantized loss itself has no useful Hessian). params: names of the parameters the Hessian is taken over
    (default: every floating parameter except quantizer step sizes).

    Returns ``{"trace", "std_error", "estimates"}``: the mean, its standard error, and each sample's value."""
    name = "hessian_trace"
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"{name}: samples must be an int >= 1, got {samples!r}")
    _check_data(data, name)
    work = expand_weights(copy.deepcopy(model)).eval()  # the weights as parameters, to differentiate
    scale_names = set()
    for qname, m in work.named_modules():
        if isinstance(m, Quantizer):
            m.set_mode("off")
            scale_names.add(f"{qname}.scale" if qname else "scale")
    named = dict(work.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.is_floating_point() and n not in scale_names]
    else:
        names = list(params)
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"{name}: the model has no parameters {missing[:4]}")
    if not names:
        raise ValueError(f"{name}: no parameters to take the Hessian over")
    tensors = [named[n] for n in names]
    for p in work.parameters():
        p.requires_grad_(False)
    for p in tensors:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in _progress_iter(range(samples), verbose, "hessian trace"):
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in tensors]
        total, count = 0.0, 0
        for batch in data:
            loss = loss_fn(work, batch)
            grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
            gv = sum((g * v).sum() for g, v in zip(grads, vs) if g is not None)
            if isinstance(gv, Tensor) and gv.requires_grad:  # else the loss is at most linear: H v = 0
                hv = torch.autograd.grad(gv, tensors, allow_unused=True)
                total += float(sum((h * v).sum() for h, v in zip(hv, vs) if h is not None))
            count += 1
        if count == 0:
            raise ValueError(f"{name}: data yielded no batches")
        estimates.append(total / count)
    mean = math.fsum(estimates) / len(estimates)
    return {"trace": mean, "std_error": _std(estimates) / math.sqrt(len(estimates)), "estimates": estimates}


def plot_barriers(results: Mapping[str, dict], path, *, title: str = "Error barrier") -> Path:
    """One PNG at ``path`` with the loss curve of every ``{name: error_barrier(...) result}`` and its barrier
    in the legend. Needs matplotlib (the ``plot`` extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_barriers needs matplotlib: pip install 'hdrq[plot]' (or pip install matplotlib)") from e
    if not results:
        raise ValueError("plot_barriers: no results to plot")
    for key, r in results.items():
        if not isinstance(r, Mapping) or not {"lambdas", "losses", "barrier"} <= set(r):
            raise ValueError(f"plot_barriers: result {key!r} is not an error_barrier result "
                             f"(needs 'lambdas', 'losses' and 'barrier')")
    # A bare Figure with its own Agg canvas: no pyplot global state, no GUI backend.
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, r in results.items():
        label = f"{key}: barrier {r['barrier']:.4g}"
        line, = ax.plot(r["lambdas"], r["losses"], marker="o", markersize=3.5, label=label)
        std = r.get("losses_std")
        if std:
            lo = [m - s for m, s in zip(r["losses"], std)]
            hi = [m + s for m, s in zip(r["losses"], std)]
            ax.fill_between(r["lambdas"], lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("interpolation λ  (0: model a, 1: model b)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _progress(total: int, verbose: bool, desc: str):
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def _progress_iter(items, verbose: bool, desc: str):
    if not verbose:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
