"""Model, data and evaluation references that misbehave, for the CLI contract tests (``tests.cli.contract_models:NAME``)."""

from __future__ import annotations

import torch
from torch import nn

from tests.cli.tiny_models import IN_DIM, make_mlp


def raising_factory() -> nn.Module:
    raise RuntimeError("the weights server is down")


def factory_with_arguments(width: int) -> nn.Module:
    return nn.Linear(IN_DIM, width)


def raising_data() -> list[torch.Tensor]:
    raise ValueError("the dataset is offline")


def data_failing_midway():
    """One good batch, then the user's loader breaks."""
    yield torch.randn(16, IN_DIM)
    raise OSError("lost the data volume")


def nan_data() -> list[torch.Tensor]:
    """Batches with NaN in them."""
    batch = torch.randn(16, IN_DIM, generator=torch.Generator().manual_seed(3))
    batch[3, 2] = float("nan")
    return [batch, batch.clone()]


class Noisy(nn.Module):
    """Adds fresh noise in eval mode: no permutation check can pass on it."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + 0.1 * torch.randn(x.shape[0], 3)


def make_noisy() -> nn.Module:
    return Noisy().eval()


class TwoHeads(nn.Module):
    """The issue's model: one head for inputs with a positive sum, another (times -50) for the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(IN_DIM, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h) if x.sum() > 0 else -50 * self.c(h)


def make_two_heads() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The model and positive example inputs (the ``self.b`` branch)."""
    torch.manual_seed(0)
    return TwoHeads().eval(), (torch.rand(2, IN_DIM, generator=torch.Generator().manual_seed(0)),)
