"""Observers: initial step sizes from data.

``minmax_scale`` covers the observed range exactly; ``mse_scale`` searches clipping ratios of that range
for the one with the smallest Lp quantization error (p = 2.4, as BRECQ/QDrop), per tensor or per channel,
vectorised over candidates and channels (no Python loop over channels). The observer classes accumulate
what they see over calibration batches and call these functions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import qrange

# A zero range (an all-zero tensor or channel) still needs a positive step size.
MIN_RANGE_SCALE = float(torch.finfo(torch.float32).eps)


def _channel_view(x: Tensor, axis: Optional[int]) -> Tensor:
    """``x`` as ``[channels, elements]`` (one channel for ``axis=None``), fp32."""
    x = x.detach().to(torch.float32)
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _range_scale(lo: Tensor, hi: Tensor, bits: int, signed: bool) -> Tensor:
    qmin, qmax = qrange(bits, signed)
    if signed:
        s = torch.maximum(hi.clamp_min(0) / qmax, lo.clamp_max(0) / qmin)
    else:
        s = hi.clamp_min(0) / qmax
    return s.clamp_min(MIN_RANGE_SCALE)


def _shape_out(s: Tensor, axis: Optional[int]) -> Tensor:
    return s.reshape(()) if axis is None else s


def minmax_scale(x: Tensor, bits: int, signed: bool, axis: Optional[int] = None) -> Tensor:
    """The smallest step size whose grid covers ``[min(x), max(x)]`` (per channel on ``axis``)."""
    xc = _channel_view(x, axis)
    return _shape_out(_range_scale(xc.amin(1), xc.amax(1), bits, signed), axis)


def default_ratios(n: int = 80) -> Tensor:
    """Clipping ratios 1.00, 0.99, ..., as in QDrop's MSE observer."""
    return 1.0 - 0.01 * torch.arange(n, dtype=torch.float32)


def mse_scale(x: Tensor, bits: int, signed: bool, axis: Optional[int] = None, *, p: float = 2.4,
              ratios: Optional[Tensor] = None, max_chunk_elements: int = 1 << 22) -> Tensor:
    """The step size ``r * minmax_scale`` minimising ``sum |fake_quant(x) - x|^p`` over ratios ``r``.

    Per channel on ``axis``; every (ratio, channel) pair is one row of a batched ``fake_quant`` call, the
    ratios processed in chunks of at most ``max_chunk_elements`` elements."""
    ratios = default_ratios() if ratios is None else ratios.to(torch.float32)
    xc = _channel_view(x, axis)  # [C, E]
    c, e = xc.shape
    base = _range_scale(xc.amin(1), xc.amax(1), bits, signed)  # [C]
    ratios = ratios.to(xc.device)
    per_chunk = max(1, max_chunk_elements // max(c * e, 1))
    qmin, qmax = qrange(bits, signed)
    errors = []
    with torch.no_grad():
        for start in range(0, ratios.numel(), per_chunk):
            r = ratios[start:start + per_chunk]  # [R]
            cand = (r[:, None] * base[None, :]).clamp_min(MIN_RANGE_SCALE).unsqueeze(-1)  # [R, C, 1]
            # hdrq.ops.fake_quant's arithmetic (x * (1/s), round half to even, clamp, times s), in place: this
            # search runs 80 candidates over every weight, and needs no gradient.
            err = xc.unsqueeze(0) * (1.0 / cand)  # [R, C, E]
            err.round_().clamp_(qmin, qmax).mul_(cand).sub_(xc.unsqueeze(0)).abs_()
            err = err.square_() if p == 2 else err.pow_(p)
            errors.append(err.sum(-1))
    best = torch.cat(errors, 0).argmin(0)  # [C]; the first (largest ratio) on ties
    s = (ratios[best] * base).clamp_min(MIN_RANGE_SCALE)
    return _shape_out(s, axis)


class MinMaxObserver:
    """Tracks the running min and max (per channel on ``axis``) over the batches it sees."""

    def __init__(self, bits: int, signed: bool, axis: Optional[int] = None):
        self.bits, self.signed, self.axis = bits, signed, axis
        self.lo: Optional[Tensor] = None
        self.hi: Optional[Tensor] = None

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        xc = _channel_view(x, self.axis)
        lo, hi = xc.amin(1), xc.amax(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def scale(self) -> Tensor:
        if self.lo is None:
            raise RuntimeError("MinMaxObserver.scale() called before any update()")
        return _shape_out(_range_scale(self.lo, self.hi, self.bits, self.signed), self.axis)


class MSEObserver:
    """Keeps the data it sees (up to ``max_elements`` per channel, evenly subsampled beyond that) and
    returns :func:`mse_scale` of it."""

    def __init__(self, bits: int, signed: bool, axis: Optional[int] = None, *, p: float = 2.4,
                 ratios: Optional[Tensor] = None, max_elements: int = 1 << 22):
        self.bits, self.signed, self.axis, self.p, self.ratios = bits, signed, axis, p, ratios
        self.max_elements = max_elements
        self._chunks: list[Tensor] = []

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        self._chunks.append(_channel_view(x, self.axis))

    def scale(self) -> Tensor:
        if not self._chunks:
            raise RuntimeError("MSEObserver.scale() called before any update()")
        data = torch.cat(self._chunks, 1)
        if data.shape[1] > self.max_elements:
            idx = torch.linspace(0, data.shape[1] - 1, self.max_elements, device=data.device).long()
            data = data[:, idx]
        s = mse_scale(data, self.bits, self.signed, axis=0, p=self.p, ratios=self.ratios)
        return s.reshape(()) if self.axis is None else s
