"""Small models for the export tests; importable as constructors (``export_test_models:build_tied_lm``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def reinit_(model: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    """Overwrite every parameter and norm statistic with values drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (nn.LayerNorm, _BatchNorm))
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
                param.copy_(1.0 + 0.1 * noise if is_norm and name == "weight" else std * noise)
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
    return model


class MLP(nn.Module):
    """Two hidden layers with GELU."""

    def __init__(self, d_in: int = 6, hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResBlock(nn.Module):
    """conv-bn-relu-conv-bn with an identity skip."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResCNN(nn.Module):
    """Stem with BN, one residual block, global pooling and a linear head."""

    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.block = ResBlock(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


class TiedLM(nn.Module):
    """Embedding whose matrix is reused (tied) as the output projection, when ``tie`` is true."""

    def __init__(self, vocab: int = 11, dim: int = 6, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def build_tied_lm(vocab: int = 11, dim: int = 6, tie: bool = True) -> TiedLM:
    """Constructor used through the ``"export_test_models:build_tied_lm"`` spec."""
    return TiedLM(vocab=vocab, dim=dim, tie=tie)


class KthBlock(nn.Module):
    """Calls torch.kthvalue, which neither torch ONNX exporter can translate."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.kthvalue(self.lin(x), 2, dim=1).values


class KthModel(nn.Module):
    """A linear layer followed by :class:`KthBlock` under the attribute ``blk``."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.blk = KthBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blk(self.pre(x))


class SignBranch(nn.Module):
    """Data-dependent control flow: torch.export refuses it, TorchScript tracing bakes one branch in."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if x.sum() > 0:
            return y * 2
        return y - 1


class TwoHeads(nn.Module):
    """The issue's model: one head for inputs with a positive sum, another (times -50) for the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h) if x.sum() > 0 else -50 * self.c(h)


class LargeValueBranch(nn.Module):
    """Branches on the first feature exceeding 100: no rescaling of standard-normal inputs reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if x[:, 0].min() > 100:
            return y + 7
        return y
