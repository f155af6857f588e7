"""Float architectures for the command-line pipeline's tests (``--builder pipeline_models:res_mlp``)."""
import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return F.relu(x + self.fc2(F.relu(self.fc1(x))))


class ResMLP(nn.Module):
    """A stem, three residual blocks (a chain: streamed), a head."""

    def __init__(self, d_in=8, d=12, d_out=3):
        super().__init__()
        self.stem = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[ResBlock(d) for _ in range(3)])
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))))


def res_mlp() -> nn.Module:
    return ResMLP()


def wider() -> nn.Module:
    return ResMLP(d=16)


def not_a_module():
    return torch.zeros(3)
