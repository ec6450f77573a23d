"""Tiny models, data and metrics referenced from test configs as ``tests.cli.tiny_models:NAME``."""

from __future__ import annotations

import torch
from torch import nn

IN_DIM, HIDDEN, OUT_DIM = 6, 12, 3


def make_mlp() -> nn.Module:
    """A 6 -> 12 -> 12 -> 3 ReLU MLP (random weights from the global RNG)."""
    return nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, OUT_DIM)).eval()  # fmt: skip


def make_mlp_with_inputs() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The MLP and an example input batch of 2."""
    return make_mlp(), (torch.randn(2, IN_DIM, generator=torch.Generator().manual_seed(0)),)


def batches() -> list[torch.Tensor]:
    """Four random input batches of 16."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, IN_DIM, generator=g) for _ in range(4)]


def batch_generator():
    """The same batches as a one-shot generator."""
    yield from batches()


@torch.no_grad()
def score(model: nn.Module) -> dict[str, float]:
    """Mean and spread of the outputs on a fixed batch (a stand-in for accuracy)."""
    out = model(torch.ones(4, IN_DIM))
    return {"mean": float(out.mean()), "std": float(out.std())}


def not_a_model() -> int:
    return 3


class _Kth(nn.Module):
    """A linear layer then torch.kthvalue, which the ONNX exporters cannot translate."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN_DIM, IN_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.kthvalue(self.lin(x), 2, dim=1).values


def make_kth() -> nn.Module:
    return _Kth().eval()


class ResidualMLP(nn.Module):
    """``inp`` -> ``depth`` residual blocks (Linear, ReLU, Linear) -> ``out``."""

    def __init__(self, depth: int = 2, width: int = HIDDEN) -> None:
        super().__init__()
        self.inp = nn.Linear(IN_DIM, width)
        self.blocks = nn.Sequential(*[_Residual(width) for _ in range(depth)])
        self.out = nn.Linear(width, OUT_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(torch.relu(self.inp(x))))


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def make_deep() -> nn.Module:
    return ResidualMLP(depth=3).eval()


def make_shallow() -> nn.Module:
    return ResidualMLP(depth=2).eval()
