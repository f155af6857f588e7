"""The fake quantizer module used for weights and activations during calibration.

All the math goes through ``hdrq.ops`` (so it runs on whichever backend is selected); this module only
holds state: the learnable step size, the grid, the mode, and a per-call seed counter.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor, nn

from .. import ops
from ..reference import mix_seed, qrange

MODES = ("off", "hard", "noise")

# Learned step sizes are used through |s| clamped here, so an optimiser step can never hand a
# non-positive scale to the ops.
MIN_SCALE = 1e-8


class RoundingHook(Protocol):
    """Replaces round-to-nearest in ``"hard"`` mode (AdaRound's learned rounding, calibration issue).

    Called as ``hook(x, scale)`` with ``scale`` already broadcast against ``x``; returns the fake-quantized
    ``x`` on the quantizer's grid."""

    def __call__(self, x: Tensor, scale: Tensor) -> Tensor: ...


class Quantizer(nn.Module):
    """A uniform symmetric fake quantizer with a learnable step size (LSQ).

    Args:
        bits: 2 to 8.
        signed: grid ``[-2^(b-1), 2^(b-1)-1]`` if True, else ``[0, 2^b-1]``.
        axis: None for one step size, or the dimension that carries one step size per index.
        channels: the length of that dimension (required when ``axis`` is not None).
        mode: ``"off"`` (identity), ``"hard"`` (round to nearest, LSQ gradients) or ``"noise"``
            (``x + s*u``, HDRQ's noise quantization).
        noise_mode: ``"uniform"`` or ``"histogram"`` (the noise distribution in ``"noise"`` mode).
        drop_prob: QDrop's probability of keeping an element full-precision (training mode only).
        seed: base seed; each call in ``"noise"`` mode or with dropping uses ``mix_seed(seed, step)`` and
            advances ``step`` (a Python int: no device sync).
        lsq_grad_scale: multiply the step size's gradient by ``1/sqrt(numel * qmax)`` (LSQ's rule).
        dynamic: one step size per token (each row of the last dimension), ``absmax / qmax`` computed from the
            data at every call, on the symmetric signed grid ``[-qmax, qmax]``: ``hdrq.ops.quantize_per_token``,
            what a converted layer with ``act="dynamic"`` runs. In ``"hard"`` mode the values are exactly that
            op's (the gradient passes straight through); ``"noise"`` and dropping use the per-row step sizes
            with the usual ops. ``scale`` is not used (and not learned).

    ``scale`` starts at 1 and is set by :meth:`set_scale` (from an observer) before use.
    """

    def __init__(self, bits: int, *, signed: bool = True, axis: Optional[int] = None,
                 channels: Optional[int] = None, mode: str = "hard", noise_mode: str = "uniform",
                 drop_prob: float = 0.0, seed: int = 0, lsq_grad_scale: bool = False, dynamic: bool = False):
        super().__init__()
        ops._check_bits(bits)
        if dynamic and (axis is not None or not signed):
            raise ValueError(f"Quantizer: dynamic (per-token) quantization is signed with no axis, got "
                             f"signed={signed}, axis={axis}")
        if axis is not None and (channels is None or channels < 1):
            raise ValueError(f"Quantizer: axis={axis} needs channels >= 1, got channels={channels!r}")
        self.bits = bits
        self.signed = signed
        self.axis = axis
        self.scale = nn.Parameter(torch.ones(channels) if axis is not None else torch.ones(()))
        self.mode = mode
        self.noise_mode = noise_mode
        self.drop_prob = drop_prob
        self.seed = seed
        self.step = 0
        self.lsq_grad_scale = lsq_grad_scale
        self.dynamic = bool(dynamic)
        self.rounding: Optional[RoundingHook] = None
        self._validate()

    def _validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Quantizer: mode must be one of {MODES}, got {self.mode!r}")
        if self.noise_mode not in ops.NOISE_MODES:
            raise ValueError(f"Quantizer: noise_mode must be one of {ops.NOISE_MODES}, got {self.noise_mode!r}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"Quantizer: drop_prob must be in [0, 1], got {self.drop_prob!r}")

    # -- grid --------------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed)[1]

    def set_mode(self, mode: str, noise_mode: Optional[str] = None) -> None:
        self.mode = mode
        if noise_mode is not None:
            self.noise_mode = noise_mode
        self._validate()

    @torch.no_grad()
    def set_scale(self, scale: Tensor) -> None:
        """Copy ``scale`` (shape ``[]``/``[1]`` or ``[channels]``) into the step size."""
        if scale.numel() != self.scale.numel():
            raise ValueError(f"Quantizer.set_scale: expected {self.scale.numel()} step sizes, got shape "
                             f"{tuple(scale.shape)}")
        self.scale.copy_(scale.reshape(self.scale.shape).to(self.scale))

    def step_size(self) -> Tensor:
        """The step size the ops see: ``max(|scale|, MIN_SCALE)``, with LSQ gradient scaling if enabled."""
        return self.scale.abs().clamp_min(MIN_SCALE)

    def _grad_scaled(self, s: Tensor, x: Tensor) -> Tensor:
        if not self.lsq_grad_scale:
            return s
        g = 1.0 / (max(x.numel() // max(s.numel(), 1), 1) * max(self.qmax, 1)) ** 0.5
        return s + (s * g - (s * g).detach())  # value exactly s; gradient scaled by g

    def _next_seed(self) -> int:
        seed = mix_seed(self.seed, self.step)
        self.step += 1
        return seed

    def integers(self, x: Tensor) -> Tensor:
        """The integers ``clamp(round(x/s), qmin, qmax)`` (int32) that ``"hard"`` mode represents."""
        s = self.step_size().detach()
        fq = ops.fake_quant(x.detach().float(), s.float(), bits=self.bits, signed=self.signed, axis=self.axis)
        return torch.round(fq / _bcast(s.float(), x, self.axis)).to(torch.int32)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return x
        if self.dynamic:
            return self._per_token(x)
        s = self._grad_scaled(self.step_size(), x)
        dropping = self.training and self.drop_prob > 0.0
        if self.mode == "hard" and self.rounding is not None:
            q = self.rounding(x, _bcast(s, x, self.axis))
            if not dropping:
                return q
            keep = ops.uniform_noise(x.shape, mix_seed(self._next_seed(), 1), x.device) + 0.5 < self.drop_prob
            return torch.where(keep, x, q)
        kw = dict(bits=self.bits, signed=self.signed, axis=self.axis)
        if dropping:
            return ops.qdrop_fake_quant(x, s, seed=self._next_seed(), p=self.drop_prob,
                                        noise=self.mode == "noise", mode=self.noise_mode, **kw)
        if self.mode == "noise":
            return ops.noise_fake_quant(x, s, seed=self._next_seed(), mode=self.noise_mode, **kw)
        return ops.fake_quant(x, s, **kw)

    def _per_token(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.numel() == 0:
            return x
        rows = x.reshape(-1, x.shape[-1])
        dropping = self.training and self.drop_prob > 0.0
        if self.mode == "hard" and not dropping and self.rounding is None:
            with torch.no_grad():
                q, s = ops.quantize_per_token(rows.detach().float(), bits=self.bits)
                fq = (q.float() * s[:, None]).to(x.dtype)
            return (rows + (fq - rows).detach()).reshape(x.shape)  # straight-through: every value is in range
        if self.rounding is not None:
            raise ValueError("Quantizer: a rounding hook is not supported with dynamic (per-token) quantization")
        qmax = (1 << (self.bits - 1)) - 1
        s = (rows.detach().abs().amax(1).float() / qmax).clamp_min(MIN_SCALE)
        kw = dict(bits=self.bits, signed=True, axis=0)
        if dropping:
            y = ops.qdrop_fake_quant(rows, s, seed=self._next_seed(), p=self.drop_prob, noise=self.mode == "noise",
                                     mode=self.noise_mode, **kw)
        elif self.mode == "noise":
            y = ops.noise_fake_quant(rows, s, seed=self._next_seed(), mode=self.noise_mode, **kw)
        else:
            y = ops.fake_quant(rows, s, **kw)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        if self.dynamic:
            return f"bits={self.bits}, per-token dynamic, mode={self.mode!r}, drop_prob={self.drop_prob}"
        return (f"bits={self.bits}, signed={self.signed}, axis={self.axis}, mode={self.mode!r}, "
                f"noise_mode={self.noise_mode!r}, drop_prob={self.drop_prob}")


def _bcast(s: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    if axis is None:
        return s.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return s.reshape(shape)
