"""Domains of a multi-target domain adaptation benchmark: one labelled source domain and several target
domains with the same classes, each split into train and test.

The pipeline trains on the source train split, adapts to each target's train split *without its labels*,
calibrates on a few unlabeled target train images and reports accuracy on the target test splits.
:func:`validation_split` replaces a domain's test split by a part carved from its train split: the split
every setting of the benchmark is chosen on.

Three families of domains build a :class:`DomainSuite`: real digits (``examples.mtda.real``: MNIST, UCI
digits, ImageNet-C corruptions of MNIST), synthetic digits (``examples.mtda.synthetic``) and
Office-Home-style image folders (``examples.mtda.folders``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DomainData", "DomainSuite", "generator", "split_indices", "validation_split"]


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

    def validation(self, seed: int) -> "DomainSuite":
        """Every domain through :func:`validation_split`."""
        return DomainSuite(validation_split(self.source, seed), [validation_split(d, seed) for d in self.targets],
                           self.classes, {k: v + " (validation split)" for k, v in self.description.items()})


def generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for ``(seed, stream)``: distinct streams never share a sequence."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + stream * 7919) % (2**63 - 1))
    return g


def split_indices(n: int, test_fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """A seeded split of ``range(n)`` into sorted train and test indices."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if n < 2:
        raise ValueError(f"need at least 2 images to split into train and test, got {n}")
    perm = torch.randperm(n, generator=g)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def validation_split(domain: DomainData, seed: int, fraction: float = 0.2) -> DomainData:
    """``domain`` with its test split replaced by a seeded ``fraction`` of its train split (which loses
    those images; the test split itself is dropped): the split to choose settings on."""
    tr, va = split_indices(domain.x_train.shape[0], fraction, generator(seed, 99))
    return DomainData(domain.name, domain.x_train[tr], domain.y_train[tr], domain.x_train[va], domain.y_train[va])
