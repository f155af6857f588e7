"""The model of the benchmark and its supervised training and scoring.

:class:`SmallResNet` is a ResNet for small images built of torchvision-style BasicBlocks (BatchNorm,
residual add, ReLU), so ``hdrq.quantize`` finds its residual blocks exactly as on the paper's ResNets.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DomainData, generator

__all__ = ["BasicBlock", "SmallResNet", "train_source", "evaluate", "harmonic_mean"]


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (conv-BN-ReLU-conv-BN plus the shortcut, then ReLU), so that the
    calibration engine finds it as a residual block exactly as on the paper's ResNets."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A ResNet for small images: a 3x3 stem (conv-BN-ReLU, stride ``stem_stride``), one BasicBlock per
    width (stride 2 from the second on), global average pooling, and a linear classifier ``fc`` (the head
    SHOT keeps frozen)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 stem_stride: int = 1):
        super().__init__()
        if not widths:
            raise ValueError("SmallResNet needs at least one width")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, prev = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(prev, w, stride=1 if i == 0 else 2))
            prev = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def _translate(x: Tensor, g: torch.Generator) -> Tensor:
    """Random translation by up to one pixel (one shift per batch): the source stage's only augmentation."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_source(model: nn.Module, domain: DomainData, *, epochs: int, lr: float, batch_size: int, seed: int,
                 device: torch.device) -> nn.Module:
    """Supervised training on the source train split (Adam, one-cycle lr, label smoothing 0.1)."""
    g = generator(seed)
    x, y = domain.x_train.to(device), domain.y_train.to(device)
    n = x.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = max(1, epochs * math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_translate(x[b], g)), y[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()




@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) on ``(x, y)``."""
    if x.shape[0] == 0:
        raise ValueError(f"evaluate: empty data, got x of shape {tuple(x.shape)}")
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        pred = model(x[i:i + batch_size].to(device)).argmax(dim=1)
        correct += int((pred == y[i:i + batch_size].to(device)).sum())
    return correct / x.shape[0]


def harmonic_mean(values: Sequence[float]) -> float:
    """The harmonic mean (0 if any value is 0): the MTDA summary, dominated by the worst domain."""
    if not values:
        raise ValueError("harmonic_mean of an empty list")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic_mean needs non-negative values, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


