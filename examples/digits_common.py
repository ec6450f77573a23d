"""Shared kit for the digits merge examples: embedding models, fixed class vectors, training and evaluation.

As in ZipIt / MuDSC (which use CLIP text embeddings as the classifier), every model outputs an EMBEDDING and its
logits are ``temperature * cos(embedding, class_vector)`` against ONE fixed set of 10 class vectors shared by all
models. A model trained on a task sees only that task's classes (its loss uses only their vectors) but can be
scored on all 10 digits, so merged models and ensembles are evaluated exactly like the models they came from.

Models (all map ``[B, 1, 8, 8]`` to ``[B, embed_dim]``; ``width`` scales every hidden size, wider merges better):
``mlp``, ``resnet_bn``, ``resnet_gn`` (small ResNets with BatchNorm / GroupNorm) and ``vit`` (patch 2).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fxmerge.data.digits import NUM_CLASSES, DigitsSplit

EMBED_DIM = 64
TEMPERATURE = 15.0
CLASS_SEED = 1234
MODEL_KINDS = ("mlp", "resnet_bn", "resnet_gn", "vit")
# (epochs, learning rate) per kind at batch 64, tuned for >95% own-task test accuracy in seconds on one CPU core.
RECIPES = {"mlp": (30, 3e-3), "resnet_bn": (20, 3e-3), "resnet_gn": (25, 3e-3), "vit": (70, 5e-3)}
# Extra kinds accepted by make_model but left out of MODEL_KINDS (not in the digits_merge sweep): the residual MLP
# of the width-heterogeneous merges (examples/digits_hetero.py).
RECIPES["resmlp"] = (30, 3e-3)


class EmbedMLP(nn.Module):
    """Flatten -> two ReLU hidden layers of ``4 * width`` -> embedding."""

    def __init__(self, width: int = 32, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.fc1, self.fc2 = nn.Linear(64, 4 * width), nn.Linear(4 * width, 4 * width)
        self.out = nn.Linear(4 * width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.out(F.relu(self.fc2(h)))


class EmbedResMLP(nn.Module):
    """Flatten -> linear stem to ``4 * width`` -> ``depth`` pre-LayerNorm residual blocks
    ``x + fc2(relu(fc1(norm(x))))`` (hidden ``4 * width``) -> LayerNorm -> embedding."""

    def __init__(self, width: int = 32, depth: int = 2, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        d = 4 * width
        self.stem = nn.Linear(64, d)
        self.blocks = nn.ModuleList(_ResMLPBlock(d) for _ in range(depth))
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.flatten(x, 1))
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))


class _ResMLPBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(4, channels)


class ResBlock(nn.Module):
    """conv-norm-ReLU-conv-norm plus a shortcut (1x1 conv + norm when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class EmbedResNet(nn.Module):
    """Stem conv, then blocks at 8x8 (``width``) and 4x4 (``2 * width``), global pool -> embedding."""

    def __init__(self, width: int = 16, norm: str = "bn", embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), _norm(norm, width), nn.ReLU())
        self.blocks = nn.Sequential(
            ResBlock(width, width, 1, norm), ResBlock(width, 2 * width, 2, norm), ResBlock(2 * width, 2 * width, 1, norm)
        )
        self.out = nn.Linear(2 * width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.out(F.adaptive_avg_pool2d(h, 1).flatten(1))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), _Attention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class EmbedViT(nn.Module):
    """Patch-2 ViT on 8x8 (16 patches + cls token), pre-LN blocks, embedding from the cls token."""

    def __init__(self, width: int = 32, depth: int = 3, heads: int = 4, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch = nn.Conv2d(1, width, 2, stride=2)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, width))
        self.blocks = nn.Sequential(*(_ViTBlock(width, heads) for _ in range(depth)))
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.out(self.norm(self.blocks(tokens))[:, 0])


def make_model(kind: str, width: int, *, seed: int, embed_dim: int = EMBED_DIM) -> nn.Module:
    """Build a model of ``kind`` (one of ``MODEL_KINDS``) with initial weights drawn from ``seed``."""
    factories: dict[str, Callable[[], nn.Module]] = {
        "mlp": lambda: EmbedMLP(width, embed_dim),
        "resnet_bn": lambda: EmbedResNet(width, "bn", embed_dim),
        "resnet_gn": lambda: EmbedResNet(width, "gn", embed_dim),
        "vit": lambda: EmbedViT(width, embed_dim=embed_dim),
        "resmlp": lambda: EmbedResMLP(width, embed_dim=embed_dim),
    }
    if kind not in factories:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factories[kind]()


def class_vectors(dim: int = EMBED_DIM, seed: int = CLASS_SEED) -> torch.Tensor:
    """The fixed ``[10, dim]`` unit-norm class vectors shared by every model (deterministic in ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(NUM_CLASSES, dim, generator=generator), dim=1)


def logits(embeddings: torch.Tensor, classes: Sequence[int] | None = None, seed: int = CLASS_SEED) -> torch.Tensor:
    """``TEMPERATURE * cos(embedding, class_vector)`` for ``classes`` (default: all 10), ``[B, len(classes)]``."""
    vectors = class_vectors(embeddings.shape[1], seed).to(embeddings.dtype)
    if classes is not None:
        vectors = vectors[list(classes)]
    return TEMPERATURE * F.normalize(embeddings, dim=1) @ vectors.T


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augment by translating each image by -1, 0 or +1 pixels along each axis (zero fill)."""
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=generator)
    rows = offsets[:, :1] + torch.arange(8)
    cols = offsets[:, 1:] + torch.arange(8)
    batch = torch.arange(images.shape[0])[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    generator: torch.Generator,
    classes: Sequence[int] | None = None,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    augment: bool = True,
) -> nn.Module:
    """Train a copy of ``model`` (the argument is left untouched) and return the copy in eval mode.

    AdamW, linear warmup over the first ``warmup`` fraction of steps then cosine decay; cross-entropy over the
    class vectors of ``classes`` only (default: the distinct labels the loader yields, i.e. its task).
    ``generator`` drives the random-shift augmentation; the loader's own generator drives the shuffling.
    """
    if classes is None:
        classes = sorted({int(label) for _, labels in loader for label in labels})
    local = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
    local[list(classes)] = torch.arange(len(classes))
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * len(loader))
    warmup_steps = max(1, int(warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, total, warmup_steps))
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            inputs = _shift(images, generator) if augment else images
            loss = F.cross_entropy(logits(model(inputs), classes), local[labels])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def _accuracy(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
              classes: Sequence[int]) -> float:
    predicted = torch.tensor(list(classes))[logits(fn(images), classes).argmax(dim=1)]
    return float((predicted == labels).float().mean())


def evaluate(model_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor], split: DigitsSplit) -> dict[str, float]:
    """Test accuracies: ``task_i`` (task i's images, its classes only), ``avg_task`` and ``joint`` (all, 10-way).

    ``model_or_fn`` maps images ``[B, 1, 8, 8]`` to embeddings; a module is evaluated in eval mode (and put back
    into train mode afterwards if it was in it).
    """
    was_training = isinstance(model_or_fn, nn.Module) and model_or_fn.training
    if was_training:
        model_or_fn.eval()
    try:
        results = {}
        for index, task in enumerate(split.tasks):
            images, labels = split.arrays("test", index)
            results[f"task_{index}"] = _accuracy(model_or_fn, images, labels, task)
        results["avg_task"] = sum(results.values()) / len(split.tasks)
        images, labels = split.arrays("test")
        results["joint"] = _accuracy(model_or_fn, images, labels, range(NUM_CLASSES))
    finally:
        if was_training:
            model_or_fn.train()
    return results


class Ensemble(nn.Module):
    """The average of the members' L2-normalised embeddings."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.normalize(member(x), dim=1) for member in self.members]).mean(dim=0)


def ensemble(models: Sequence[nn.Module]) -> Ensemble:
    """An :class:`Ensemble` of ``models`` (evaluate it like any model)."""
    return Ensemble(models).eval()


def train_task_model(
    split: DigitsSplit, kind: str, task: int, *, width: int, seed: int, epochs: int | None = None,
    lr: float | None = None, batch_size: int = 64,
) -> nn.Module:
    """Build ``kind`` from ``seed`` and train it on task ``task`` of ``split`` with its ``RECIPES`` defaults.

    Initial weights, shuffling and augmentation are all seeded from ``seed``.
    """
    model = make_model(kind, width, seed=seed)
    default_epochs, default_lr = RECIPES[kind]
    loader = split.loader("train", task, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed + 1))
    return train(
        model, loader, epochs=epochs or default_epochs, lr=lr or default_lr,
        generator=torch.Generator().manual_seed(seed + 2), classes=split.tasks[task],
    )
