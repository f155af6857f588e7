"""AdaRound (Nagel et al. 2020): learned up/down rounding, as a ``Quantizer.rounding`` hook.

The weight stays fixed; each element learns whether it rounds down or up through a variable ``alpha``:

    w_q = s * clamp(floor(w / s) + h(alpha), qmin, qmax),   h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)

with the rectified sigmoid's stretch ``zeta = 1.1, gamma = -0.1`` (so h reaches exactly 0 and 1). ``alpha``
starts where ``h(alpha)`` equals the fractional part of ``w / s`` (the soft rounding starts at the
float weight). The regulariser ``sum(1 - |2h - 1|^beta)`` pushes every h to 0 or 1 as beta anneals; at the
end :meth:`AdaRound.integers` rounds up where ``alpha >= 0``.

The step size is a fixed input here (it comes from the weight observer): AdaRound learns rounding only.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

ZETA, GAMMA = 1.1, -0.1


class AdaRound(nn.Module):
    """Learned rounding of one weight tensor on the grid ``[qmin, qmax]``.

    Args:
        weight: the (fixed) float weight.
        scale: its step size, broadcastable against ``weight`` (``[]`` or ``[C, 1, ...]``).
        qmin, qmax: the integer grid.
    """

    def __init__(self, weight: Tensor, scale: Tensor, qmin: int, qmax: int):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        with torch.no_grad():
            v = weight.detach().float() * (1.0 / scale.detach().float())
            rest = v - torch.floor(v)  # in [0, 1)
            # the inverse of h on (0, 1): sigmoid(alpha) = (rest - gamma) / (zeta - gamma)
            alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
        self.alpha = nn.Parameter(alpha)

    def soft(self) -> Tensor:
        """h(alpha) in [0, 1]: the learned rounding offset."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        """The ``Quantizer.rounding`` hook: soft-rounded ``x`` on the grid (gradients reach ``alpha`` only)."""
        s = scale.detach()
        base = torch.floor(x.detach() * (1.0 / s))
        return torch.clamp(base + self.soft(), self.qmin, self.qmax) * s

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2h - 1|^beta)``: zero when every h is 0 or 1."""
        return (1.0 - (2.0 * self.soft() - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def integers(self, x: Tensor, scale: Tensor) -> Tensor:
        """The hard rounding: ``clamp(floor(x/s) + [alpha >= 0], qmin, qmax)`` (float tensor of integers)."""
        base = torch.floor(x.detach().float() * (1.0 / scale.detach().float()))
        return torch.clamp(base + (self.alpha >= 0).float(), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"grid=[{self.qmin}, {self.qmax}], numel={self.alpha.numel()}"
