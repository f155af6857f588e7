"""Synthetic digits domains (``--data synthetic``): scikit-learn's bundled 1,797 8x8 digits (no download) as
the clean source and fixed, seeded shifts of them as targets.

The images are scaled to [0, 1] and upsampled bilinearly to ``image_size``. One seeded split of the
*image indices* into train and test is shared by every domain, so no domain's test split contains a digit
that appears (in any domain) in a train split. Each target is a transformation of all images
(:data:`DIGIT_SHIFTS`): ``rotate`` (counter-clockwise by U[30, 50] degrees per image), ``noise_blur``
(Gaussian blur, sigma 1 px at 16x16, then Gaussian noise with std 0.25), ``thick`` (strokes dilated 3x3 at
16x16, digit shrunk to 70%) and ``invert`` (``1 - x``; a hard shift, not in the default targets).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import DomainData, DomainSuite, generator, split_indices

__all__ = ["DIGIT_SHIFTS", "DEFAULT_DIGIT_TARGETS", "make_digits_domains", "load_uci_digits"]


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample ``x`` [N, C, H, W] with per-image 2x3 affine matrices (output -> input coordinates);
    outside the image is background (0)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rotate(x: Tensor, g: torch.Generator) -> Tensor:
    # One direction of rotation (not +-) so that the shift is consistent: a model cannot be rotation
    # invariant by accident, and adaptation has a definite shift to undo.
    angle = torch.empty(x.shape[0]).uniform_(30.0, 50.0, generator=g) * (math.pi / 180.0)
    c, s = torch.cos(angle), torch.sin(angle)
    z = torch.zeros_like(c)
    theta = torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1)
    return _affine(x, theta)


def _gaussian_kernel(sigma: float) -> Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _noise_blur(x: Tensor, g: torch.Generator) -> Tensor:
    sigma = x.shape[-1] / 16.0  # one pixel at 16x16: the same blur relative to the digit at any size
    k = _gaussian_kernel(sigma)
    r = k.numel() // 2
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return (x + 0.25 * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


def _thick(x: Tensor, g: torch.Generator) -> Tensor:
    # Grey dilation by a (odd) window of 3 pixels at 16x16, then zoom out to 70%: thicker, smaller digits.
    w = 2 * max(1, round(x.shape[-1] / 16.0)) + 1
    x = F.max_pool2d(x, w, stride=1, padding=w // 2)
    zoom = 1.0 / 0.7  # output->input scale of the affine map; > 1 shrinks the content
    theta = torch.tensor([[zoom, 0.0, 0.0], [0.0, zoom, 0.0]]).expand(x.shape[0], 2, 3)
    return _affine(x, theta)


def _invert(x: Tensor, g: torch.Generator) -> Tensor:
    return 1.0 - x


# name -> (transform(images in [0, 1], generator) -> images in [0, 1], one-line description)
DIGIT_SHIFTS: dict[str, tuple[Callable[[Tensor, torch.Generator], Tensor], str]] = {
    "rotate": (_rotate, "rotated counter-clockwise by U[30, 50] degrees per image"),
    "noise_blur": (_noise_blur, "Gaussian blur (sigma 1 px at 16x16) + Gaussian noise (std 0.25), clipped"),
    "thick": (_thick, "strokes dilated (3x3 at 16x16), digit shrunk to 70%"),
    "invert": (_invert, "inverted contrast 1 - x"),
}
DEFAULT_DIGIT_TARGETS = ("rotate", "noise_blur", "thick")


def load_uci_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's UCI handwritten digits: images ``[1797, 1, 8, 8]`` in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits domains need scikit-learn: pip install -e '.[demo]'") from e
    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(d.target).long()
    return x, y


def make_digits_domains(*, image_size: int = 16, targets: Sequence[str] = DEFAULT_DIGIT_TARGETS, seed: int = 0,
                        test_fraction: float = 0.3, max_images: Optional[int] = None) -> DomainSuite:
    """The digits benchmark: a clean source domain and the shifted target domains named in ``targets``
    (keys of :data:`DIGIT_SHIFTS`), every domain split into train and test with the same seeded index split.

    Args:
        image_size: side of the square images (>= 8; the 8x8 digits are upsampled bilinearly).
        targets: the target shifts, in order.
        seed: fixes the train/test split and every random part of the shifts (same seed, same tensors).
        test_fraction: share of the images in the test splits.
        max_images: keep only the first ``max_images`` digits of a seeded shuffle (for quick runs).
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    if not targets:
        raise ValueError("make_digits_domains needs at least one target shift, got none")
    unknown = [t for t in targets if t not in DIGIT_SHIFTS]
    if unknown or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct names from {sorted(DIGIT_SHIFTS)}, got {list(targets)}")
    x, y = load_uci_digits()
    if max_images is not None:
        if max_images < 20:
            raise ValueError(f"max_images must be >= 20, got {max_images}")
        keep = torch.randperm(x.shape[0], generator=generator(seed, 1))[:max_images].sort().values
        x, y = x[keep], y[keep]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    train, test = split_indices(x.shape[0], test_fraction, generator(seed, 2))

    def domain(name: str, xs: Tensor) -> DomainData:
        return DomainData(name, xs[train].contiguous(), y[train].clone(), xs[test].contiguous(), y[test].clone())

    desc = {"source": f"clean sklearn digits upsampled to {image_size}x{image_size}"}
    doms = []
    for i, name in enumerate(targets):
        fn, text = DIGIT_SHIFTS[name]
        doms.append(domain(name, fn(x, generator(seed, 100 + i)).clamp_(0.0, 1.0)))
        desc[name] = text
    return DomainSuite(domain("source", x), doms, [str(c) for c in range(10)], desc)


