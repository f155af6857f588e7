"""Offline domain-adaptation data for ``hdrq demo``: a synthetic multi-domain digits benchmark built from
scikit-learn's bundled digits (no download), and a reader for Office-Home-style image folders.

Both produce a :class:`DomainSuite`: one labelled source domain and several target domains, each split
into train and test parts. The demo trains on the source train split, adapts to each target's train split
*without its labels*, calibrates on a few unlabeled target train images and reports accuracy on the
target test splits.

The digits domains (``make_digits_domains``). scikit-learn's ``load_digits`` holds 1,797 8x8 grey images
(values 0-16) of the ten digits. They are scaled to [0, 1] and upsampled bilinearly to ``image_size``.
One seeded split of the *image indices* into train and test is shared by every domain, so no domain's test
split contains a digit that appears (in any domain) in a train split. Each domain is a fixed, seeded
transformation of all 1,797 images (:data:`DIGIT_SHIFTS`):

=============  ==================================================================================
``source``     the clean upsampled digits
``rotate``     rotated counter-clockwise by an angle drawn uniformly from [30, 50] degrees per image
``noise_blur`` Gaussian blur (sigma = 1 pixel at 16x16, scaled with the size), then additive Gaussian
               noise (std 0.25), clipped to [0, 1]
``thick``      strokes thickened (3x3 grey dilation at 16x16) and the digit shrunk to 70% of its size
``invert``     inverted contrast, ``1 - x`` (a hard shift: available, not in the default targets)
=============  ==================================================================================
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DomainData", "DomainSuite", "DIGIT_SHIFTS", "DEFAULT_DIGIT_TARGETS", "make_digits_domains",
           "ImageFolderDomains", "IMAGE_EXTENSIONS"]


@dataclass
class DomainData:
    """One domain: images ``[N, C, H, W]`` float32 in [0, 1] and int64 labels, split into train and test."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def __post_init__(self):
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"DomainData {self.name!r}: x_{part} must be [N, C, H, W] and y_{part} [N], got "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}")

    def __repr__(self) -> str:
        return (f"DomainData({self.name!r}, train={tuple(self.x_train.shape)}, "
                f"test={tuple(self.x_test.shape)})")


@dataclass
class DomainSuite:
    """A source domain, its target domains and the class names shared by all of them."""

    source: DomainData
    targets: list[DomainData]
    classes: list[str]
    description: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.targets:
            raise ValueError("DomainSuite needs at least one target domain, got none")
        shape = tuple(self.source.x_train.shape[1:])
        for d in self.targets:
            if tuple(d.x_train.shape[1:]) != shape:
                raise ValueError(f"DomainSuite: target {d.name!r} has images of shape {tuple(d.x_train.shape[1:])}, "
                                 f"the source {shape}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.source.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.source.x_train.shape[-1])

    def domain(self, name: str) -> DomainData:
        for d in [self.source, *self.targets]:
            if d.name == name:
                return d
        raise KeyError(f"no domain {name!r}; have {[self.source.name] + [d.name for d in self.targets]}")


# ================================================================================================
# The digits domains
# ================================================================================================


def _generator(seed: int, stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + stream * 7919) % (2**63 - 1))
    return g


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


def _load_digits_tensor() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits domains need scikit-learn: pip install 'hdrq[demo]'") from e
    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(d.target).long()
    return x, y


def _split_indices(n: int, test_fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if n < 2:
        raise ValueError(f"need at least 2 images to split into train and test, got {n}")
    perm = torch.randperm(n, generator=g)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


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
    x, y = _load_digits_tensor()
    if max_images is not None:
        if max_images < 20:
            raise ValueError(f"max_images must be >= 20, got {max_images}")
        keep = torch.randperm(x.shape[0], generator=_generator(seed, 1))[:max_images].sort().values
        x, y = x[keep], y[keep]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    train, test = _split_indices(x.shape[0], test_fraction, _generator(seed, 2))

    def domain(name: str, xs: Tensor) -> DomainData:
        return DomainData(name, xs[train].contiguous(), y[train].clone(), xs[test].contiguous(), y[test].clone())

    desc = {"source": f"clean sklearn digits upsampled to {image_size}x{image_size}"}
    doms = []
    for i, name in enumerate(targets):
        fn, text = DIGIT_SHIFTS[name]
        doms.append(domain(name, fn(x, _generator(seed, 100 + i)).clamp_(0.0, 1.0)))
        desc[name] = text
    return DomainSuite(domain("source", x), doms, [str(c) for c in range(10)], desc)


# ================================================================================================
# Image folders (Office-Home layout)
# ================================================================================================

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _visible_dirs(path: str) -> list[str]:
    return sorted(e for e in os.listdir(path) if not e.startswith(".") and os.path.isdir(os.path.join(path, e)))


class ImageFolderDomains:
    """Domains read from ``root/<domain>/<class>/<image>`` (the Office-Home / DomainNet layout).

    Every domain directory that holds images is a domain; the classes are the union of the class
    directory names over all domains (sorted), so a label means the same class in every domain. Images are
    decoded with Pillow, converted to RGB (or grey with ``grayscale=True``), resized to
    ``image_size`` x ``image_size`` and scaled to [0, 1]; each domain is split into train/test with a seeded
    permutation.

    >>> folders = ImageFolderDomains("OfficeHome", image_size=32)        # doctest: +SKIP
    >>> suite = folders.suite(source="Real_World")                        # the other domains are targets

    Raises ``FileNotFoundError`` for a missing root and ``ValueError`` for a root without images.
    """

    def __init__(self, root: str, *, image_size: int = 32, grayscale: bool = False, test_fraction: float = 0.3,
                 seed: int = 0, max_per_class: Optional[int] = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolderDomains: root {root!r} does not exist or is not a directory")
        if image_size < 1:
            raise ValueError(f"ImageFolderDomains: image_size must be >= 1, got {image_size}")
        self.root = root
        self.image_size = image_size
        self.grayscale = grayscale
        self.test_fraction = test_fraction
        self.seed = seed
        self.max_per_class = max_per_class
        # domain -> class -> sorted image paths
        self._files: dict[str, dict[str, list[str]]] = {}
        for dom in _visible_dirs(root):
            per_class = {}
            for cls in _visible_dirs(os.path.join(root, dom)):
                d = os.path.join(root, dom, cls)
                imgs = sorted(os.path.join(d, f) for f in os.listdir(d)
                              if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(d, f)))
                if imgs:
                    per_class[cls] = imgs[:max_per_class] if max_per_class else imgs
            if per_class:
                self._files[dom] = per_class
        if not self._files:
            raise ValueError(f"ImageFolderDomains: no images found under {root!r}; expected "
                             f"root/<domain>/<class>/<image> with extensions {IMAGE_EXTENSIONS}")
        self.domains: list[str] = list(self._files)
        self.classes: list[str] = sorted({c for per in self._files.values() for c in per})
        self._cache: dict[str, DomainData] = {}

    def __repr__(self) -> str:
        return (f"ImageFolderDomains({self.root!r}, domains={self.domains}, classes={len(self.classes)}, "
                f"image_size={self.image_size})")

    def num_images(self, domain: str) -> int:
        return sum(len(v) for v in self._files[self._check(domain)].values())

    def _check(self, domain: str) -> str:
        if domain not in self._files:
            raise KeyError(f"ImageFolderDomains: no domain {domain!r} under {self.root!r}; have {self.domains}")
        return domain

    def _read(self, path: str) -> Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L" if self.grayscale else "RGB").resize((self.image_size, self.image_size),
                                                                     Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        c = 1 if self.grayscale else 3
        return data.reshape(self.image_size, self.image_size, c).permute(2, 0, 1).float().div_(255.0)

    def domain(self, name: str) -> DomainData:
        """The images of one domain, split into train and test (read once, then cached)."""
        if name in self._cache:
            return self._cache[self._check(name)]
        try:
            import PIL  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("ImageFolderDomains needs Pillow: pip install 'hdrq[demo]'") from e
        per_class = self._files[self._check(name)]
        xs, ys = [], []
        for cls, paths in per_class.items():
            label = self.classes.index(cls)
            for p in paths:
                try:
                    xs.append(self._read(p))
                except OSError as e:
                    raise ValueError(f"ImageFolderDomains: cannot read image {p!r}: {e}") from e
                ys.append(label)
        if len(xs) < 2:
            raise ValueError(f"ImageFolderDomains: domain {name!r} has {len(xs)} image(s); need at least 2 to "
                             f"split into train and test")
        x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.long)
        stream = sum(ord(ch) * 31**i for i, ch in enumerate(name)) % 1_000_003
        train, test = _split_indices(len(xs), self.test_fraction, _generator(self.seed, stream))
        data = DomainData(name, x[train].contiguous(), y[train], x[test].contiguous(), y[test])
        self._cache[name] = data
        return data

    def suite(self, source: str, targets: Optional[Sequence[str]] = None) -> DomainSuite:
        """``source`` as the labelled source domain and ``targets`` (default: every other domain)."""
        self._check(source)
        targets = [d for d in self.domains if d != source] if targets is None else list(targets)
        for t in targets:
            self._check(t)
        if not targets or source in targets:
            raise ValueError(f"ImageFolderDomains.suite: need at least one target other than the source "
                             f"{source!r}, got {targets}")
        desc = {d: f"{self.num_images(d)} images from {os.path.join(self.root, d)}" for d in [source, *targets]}
        return DomainSuite(self.domain(source), [self.domain(t) for t in targets], list(self.classes), desc)
