"""Domains read from image folders in the Office-Home / DomainNet layout, ``root/<domain>/<class>/<image>``
(``--data folders``)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .data import DomainData, DomainSuite, generator, split_indices

__all__ = ["ImageFolderDomains", "IMAGE_EXTENSIONS"]


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
            raise ImportError("ImageFolderDomains needs Pillow: pip install -e '.[demo]'") from e
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
        train, test = split_indices(len(xs), self.test_fraction, generator(self.seed, stream))
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
