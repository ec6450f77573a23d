"""examples/digits_common.py: class vectors, cosine logits, augmentation, evaluation, ensembling, training."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fxmerge.data import load_digits_split

_PATH = Path(__file__).resolve().parents[2] / "examples" / "digits_common.py"
_SPEC = importlib.util.spec_from_file_location("digits_common", _PATH)
dc = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("digits_common", dc)
_SPEC.loader.exec_module(dc)


@pytest.fixture(scope="module")
def split():
    return load_digits_split(seed=0)


class _Oracle(torch.nn.Module):
    """Embeds each test image as (a scaled copy of) the class vector of a label looked up by image identity."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, wrong_every: int = 0) -> None:
        super().__init__()
        self.keys, self.labels, self.wrong_every = images.flatten(1), labels, wrong_every

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.cdist(x.flatten(1), self.keys).argmin(dim=1)
        labels = self.labels[index].clone()
        if self.wrong_every:
            labels[:: self.wrong_every] = (labels[:: self.wrong_every] + 1) % 10
        return 3.0 * dc.class_vectors()[labels]


def test_class_vectors_are_fixed_unit_and_seeded() -> None:
    vectors = dc.class_vectors(64, seed=7)
    assert vectors.shape == (10, 64)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(10), rtol=0, atol=1e-6)
    assert torch.equal(vectors, dc.class_vectors(64, seed=7))
    assert not torch.equal(vectors, dc.class_vectors(64, seed=8))
    assert torch.equal(dc.class_vectors(), dc.class_vectors(dc.EMBED_DIM, dc.CLASS_SEED))


def test_logits_are_scaled_cosine_similarities() -> None:
    emb = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    vectors = dc.class_vectors(16)
    expected = torch.empty(3, 2)
    for i in range(3):
        for j, cls in enumerate((4, 7)):
            cos = torch.dot(emb[i], vectors[cls]) / (emb[i].norm() * vectors[cls].norm())
            expected[i, j] = dc.TEMPERATURE * cos
    torch.testing.assert_close(dc.logits(emb, (4, 7)), expected, rtol=1e-5, atol=1e-5)
    assert dc.logits(emb).shape == (3, 10)


def test_shift_matches_brute_force_translation() -> None:
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    shifted = dc._shift(images, torch.Generator().manual_seed(2))
    offsets = torch.randint(0, 3, (5, 2), generator=torch.Generator().manual_seed(2))
    for b in range(5):
        dy, dx = int(offsets[b, 0]) - 1, int(offsets[b, 1]) - 1
        expected = torch.zeros(8, 8)
        for r in range(8):
            for c in range(8):
                if 0 <= r + dy < 8 and 0 <= c + dx < 8:
                    expected[r, c] = images[b, 0, r + dy, c + dx]
        assert torch.equal(shifted[b, 0], expected)


def test_evaluate_counts_hand_computed_accuracies(split) -> None:
    images, labels = split.arrays("test")
    perfect = dc.evaluate(_Oracle(images, labels), split)
    assert perfect == {"task_0": 1.0, "task_1": 1.0, "avg_task": 1.0, "joint": 1.0}
    # Every 4th image of each evaluated batch is pushed to the next digit. Within a task, label 4 -> 5 and
    # 9 -> 0 leave the task, so the restricted argmax then picks the nearest in-task vector instead.
    noisy = dc.evaluate(_Oracle(images, labels, wrong_every=4), split)
    n_joint = len(labels)
    assert noisy["joint"] == pytest.approx(1.0 - len(range(0, n_joint, 4)) / n_joint, abs=1e-6)
    assert noisy["task_0"] < 1.0 and noisy["task_1"] < 1.0


def test_ensemble_is_mean_of_normalised_embeddings() -> None:
    members = [dc.make_model("mlp", 4, seed=s) for s in (0, 1)]
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = (F.normalize(members[0](x), dim=1) + F.normalize(members[1](x), dim=1)) / 2
        torch.testing.assert_close(dc.ensemble(members)(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", dc.MODEL_KINDS)
def test_models_embed_and_are_seeded(kind: str) -> None:
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    model, again, other = (dc.make_model(kind, 8, seed=s).eval() for s in (0, 0, 1))
    assert torch.equal(state, torch.get_rng_state())
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, dc.EMBED_DIM) and torch.isfinite(out).all()
        assert torch.equal(out, again(x)) and not torch.allclose(out, other(x))


def test_short_training_beats_chance_by_a_wide_margin(split) -> None:
    model = dc.make_model("mlp", 16, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = split.loader("train", 0, 64, shuffle=True, generator=torch.Generator().manual_seed(1))
    trained = dc.train(model, loader, epochs=8, lr=3e-3, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "train must not touch its input"
    scores = dc.evaluate(trained, split)
    assert scores["task_0"] > 0.9  # chance is 0.2 over the task's 5 classes
    assert scores["joint"] < 0.6  # it never saw digits 5-9: at most about half of the 10-way test set


def test_trained_models_are_deterministic_and_ensemble_covers_both_tasks(split) -> None:
    first = dc.train_task_model(split, "mlp", 0, width=16, seed=0, epochs=8)
    again = dc.train_task_model(split, "mlp", 0, width=16, seed=0, epochs=8)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), again.parameters(), strict=True))
    second = dc.train_task_model(split, "mlp", 1, width=16, seed=10, epochs=8)
    both = dc.evaluate(dc.ensemble([first, second]), split)
    # Measured with these seeds: task_0 0.96, task_1 0.80, joint 0.71 (chance: 0.2 per task, 0.1 joint).
    assert both["task_0"] > 0.7 and both["task_1"] > 0.7
    assert both["joint"] > 0.6  # above either single model's ceiling of about 0.5
