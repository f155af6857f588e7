"""What the benchmark measures about each method's models, besides accuracy: each link of HDRQ's claim
(flatter and closer to the source, therefore a lower error barrier, therefore a better merge).

* :func:`moved_share`: how far calibration moved a model: the share of weight integers that differ from
  round-to-nearest of the adapted float weights at the model's own step sizes (0 for RTN).
* :func:`weight_distance`: ``sum_l ||W_l(a) - W_l(b)||_F / sum_l ||W_l(b)||_F`` over the quantized layers,
  the (dequantized) weights of a model against the source's, or of one target model against another.
* :func:`flatness`: the Hutchinson Hessian trace of the cross-entropy at the model's dequantized weights
  (``hdrq.analysis.hessian_trace``).
* :func:`barrier`: the error barrier between two models (``hdrq.error_barrier``; the quantized barrier,
  uniform noise at the step sizes, for quantized models).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hdrq
from hdrq.analysis import hessian_trace
from hdrq.quant import quant_layers

__all__ = ["moved_share", "weight_distance", "flatness", "barrier", "ce_loss", "labelled_batches"]


def ce_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def labelled_batches(xs: Sequence[Tensor], ys: Sequence[Tensor], n: int, device: torch.device,
                     batch_size: int = 256) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` images of each ``(x, y)`` pair, concatenated, as batches on ``device``."""
    x = torch.cat([t[:n] for t in xs]).to(device)
    y = torch.cat([t[:n] for t in ys]).to(device)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def _weights(model: nn.Module) -> dict[str, Tensor]:
    """Dequantized weights of the quantized layers, or the float weights of every conv / linear layer."""
    layers = dict(quant_layers(model))
    if layers:
        return {n: m.weight_quantizer(m.weight).detach() for n, m in layers.items()}
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def moved_share(quantized: nn.Module, float_model: nn.Module) -> float:
    """Share of ``quantized``'s weight integers that differ from ``clamp(round(W / s))``, ``W`` the weight of
    the same layer of ``float_model`` (BatchNorm folded like the quantized model) and ``s`` the quantized
    layer's step size."""
    floats = dict(float_model.named_modules())
    changed = total = 0
    for name, layer in quant_layers(quantized):
        w = floats[name].weight.to(layer.weight)
        changed += int((layer.weight_integers() != layer.weight_quantizer.integers(w)).sum())
        total += w.numel()
    if total == 0:
        raise ValueError(f"moved_share: {type(quantized).__name__} has no quantized layers")
    return changed / total


@torch.no_grad()
def weight_distance(a: nn.Module, b: nn.Module) -> float:
    """Relative Frobenius distance of ``a``'s layer weights to ``b``'s (layers matched by name)."""
    wa, wb = _weights(a), _weights(b)
    missing = [n for n in wa if n not in wb]
    if missing:
        raise ValueError(f"weight_distance: {missing[:3]} are missing from the second model")
    num = sum(float((wa[n] - wb[n].to(wa[n])).norm()) for n in wa)
    den = sum(float(wb[n].norm()) for n in wa)
    return num / den


def flatness(model: nn.Module, data: list, *, samples: int, seed: int) -> dict:
    """``{"trace", "std_error"}`` of the Hessian of the mean cross-entropy over ``data``."""
    r = hessian_trace(model, ce_loss, data, samples=samples, seed=seed, verbose=False)
    return {"trace": float(r["trace"]), "std_error": float(r["std_error"])}


def barrier(a: nn.Module, b: nn.Module, data: list, *, steps: int, seed: int, quantized: bool) -> dict:
    """``{"lambdas", "losses", "barrier"}`` of the line from ``a`` to ``b``."""
    r = hdrq.error_barrier(a, b, ce_loss, data, steps=steps, quant_noise=quantized, draws=2 if quantized else 1,
                           seed=seed, verbose=False)
    return {"lambdas": [float(v) for v in r["lambdas"]], "losses": [float(v) for v in r["losses"]],
            "barrier": float(r["barrier"])}
