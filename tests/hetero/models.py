"""Small models of configurable depth and width for the heterogeneous-merging tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of basic blocks (stride 2 and doubled width from stage 1 on), pooling, linear head."""

    def __init__(self, depths: Sequence[int] = (2, 2), width: int = 4, in_ch: int = 1, out: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, c = [], width
        for s, d in enumerate(depths):
            for i in range(d):
                c_out = width * 2**s
                blocks.append(BasicBlock(c, c_out, 2 if s > 0 and i == 0 else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class VGG(nn.Module):
    """Plain conv/BN/ReLU stages separated by max pooling, then pooling and a linear head."""

    def __init__(self, depths: Sequence[int] = (2, 2), width: int = 4, in_ch: int = 1, out: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for s, d in enumerate(depths):
            if s > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(d):
                layers += [nn.Conv2d(c, width * 2**s, 3, padding=1), nn.BatchNorm2d(width * 2**s), nn.ReLU()]
                c = width * 2**s
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class MLP(nn.Module):
    """ReLU MLP: input layer, ``depth - 1`` square hidden layers, output layer."""

    def __init__(self, depth: int = 3, width: int = 8, in_dim: int = 5, out: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(in_dim if i == 0 else width, width) for i in range(depth)])
        self.out = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.out(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    """Pre-LN transformer over [B, T, in_dim] inputs with a final norm and a linear head on the mean token."""

    def __init__(self, depth: int = 2, dim: int = 8, heads: int = 2, in_dim: int = 5, out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 4, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x) + self.pos)).mean(1))


def seeded(cls: type[nn.Module], seed: int, *args, **kwargs) -> nn.Module:
    """Build ``cls(*args, **kwargs)`` in float64 with weights (and BN statistics) drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(*args, **kwargs).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated units of the test models, in order (test-side knowledge of the architectures)."""
    if isinstance(model, ResNet | Transformer):
        return list(model.blocks)
    if isinstance(model, MLP):
        return list(model.layers)
    assert isinstance(model, VGG)
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    return [nn.ModuleList([model.features[i], model.features[i + 1]]) for i in convs]


def _identity_(block: nn.Module) -> None:
    """Make a test-model block an identity by hand (not with fxmerge's expansion)."""
    with torch.no_grad():
        if isinstance(block, BasicBlock):
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
        elif isinstance(block, TransformerBlock):
            for lin in (block.attn.proj, block.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        elif isinstance(block, nn.Linear):
            block.weight.copy_(torch.eye(block.weight.shape[0], dtype=block.weight.dtype))
            block.bias.zero_()
        else:
            conv, bn = block
            nn.init.dirac_(conv.weight)
            conv.bias.zero_()
            bn.weight.fill_(1.0)
            bn.bias.zero_()
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)


def with_identities(shallow: nn.Module, deep: nn.Module, slots: Sequence[int]) -> nn.Module:
    """``deep`` with shallow block k copied into deep block ``slots[k]``, every other block an identity,
    and the shallow stem and head copied. Returns ``deep`` (modified in place)."""
    src, dst = _blocks(shallow), _blocks(deep)
    with torch.no_grad():
        for k, j in enumerate(slots):
            dst[j].load_state_dict(src[k].state_dict())
        for j in sorted(set(range(len(dst))) - set(slots)):
            _identity_(dst[j])
        own = {id(p) for b in dst for p in b.state_dict(keep_vars=True).values()}
        mine = deep.state_dict(keep_vars=True)
        for name, t in shallow.state_dict().items():
            if name in mine and id(mine[name]) not in own and mine[name].shape == t.shape:
                mine[name].copy_(t)
    return deep
