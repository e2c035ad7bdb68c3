"""The race's workloads: data, model, loss, batch order, evaluation and step budget.

A workload is a name and a ``setup(quick, steps)`` function returning a :class:`Task`. The
race builds the task once and gives every optimizer the same initial model (same seed) and
the same batch sequence (same ``torch.Generator`` seed). To add a workload, write its loader
in ``data.py``, a ``_setup_*`` here returning a Task, and add it to :data:`WORKLOADS`. W3
(regression on ``load_diabetes``) and W3s (badly-scaled ``load_breast_cancer``) live in
``benchmarks/workload_regression.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.data import fixed_windows, load_digits_split, load_stdlib_corpus, sample_windows
from benchmarks.models import MLP, ByteTransformer, count_parameters
from benchmarks.workload_regression import setup_w3, setup_w3s

__all__ = ["Task", "Workload", "WORKLOADS", "evaluate", "lr_factor"]

Batch = tuple[torch.Tensor, torch.Tensor]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position: logits ``(..., C)``, integer target ``(...)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, ``output`` and ``target`` of equal shape (for regression workloads)."""
    return F.mse_loss(output, target)


@dataclass
class Task:
    """Everything one race run needs, built once per workload.

    ``make_model()`` builds a fresh model (the race seeds torch first). ``train_batch(gen)``
    returns ``(inputs, targets)`` drawn with ``gen``. ``loss(model(inputs), targets)`` is a
    scalar mean loss. ``eval_sets`` maps ``"train"`` / ``"test"`` to fixed ``(inputs,
    targets)``; ``kind`` is ``"classification"``, ``"language_model"`` (accuracy = next-byte
    accuracy) or ``"regression"`` (no accuracy). The LR follows :func:`lr_factor` with
    ``warmup`` steps.
    """

    kind: str
    make_model: Callable[[], nn.Module]
    train_batch: Callable[[torch.Generator], Batch]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    eval_sets: dict[str, Batch]
    steps: int
    eval_every: int
    warmup: int
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    """A named workload: ``setup(quick, steps)`` builds its :class:`Task` (``steps`` overrides
    the default budget when not None)."""

    name: str
    description: str
    setup: Callable[[bool, int | None], Task]


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier at 0-based ``step``: linear warm-up over ``warmup`` steps, then a cosine
    decay from 1 to ``floor`` at ``total`` (the same schedule for every optimizer)."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, chunk: int = 256) -> dict[str, float]:
    """Mean loss (and accuracy unless regression) on each of ``task.eval_sets``.

    Returns e.g. ``{"train_loss": ..., "test_loss": ..., "train_acc": ..., "test_acc": ...}``.
    The model is put in eval mode for the duration and restored.
    """
    was_training = model.training
    model.eval()
    result: dict[str, float] = {}
    for split, (inputs, targets) in task.eval_sets.items():
        total, correct, count = 0.0, 0, 0
        for start in range(0, len(inputs), chunk):
            x, y = inputs[start:start + chunk], targets[start:start + chunk]
            out = model(x)
            n = y.numel() if task.kind != "regression" else len(y)
            total += float(task.loss(out, y)) * n
            count += n
            if task.kind != "regression":
                correct += int((out.argmax(dim=-1) == y).sum())
        result[f"{split}_loss"] = total / count
        if task.kind != "regression":
            result[f"{split}_acc"] = correct / count
    model.train(was_training)
    return result


def _setup_w1(quick: bool, steps: int | None) -> Task:
    """W1: MLP 64 -> 128 -> 128 -> 10 on standardised digits, batch 64."""
    split = load_digits_split()
    batch = 64
    sizes = (64, 128, 128, 10)

    def train_batch(gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(split.train_x), (batch,), generator=gen)
        return split.train_x[idx], split.train_y[idx]

    total = steps or (300 if quick else 1000)
    meta = dict(split.meta, model=f"MLP{sizes}", batch=batch, params=count_parameters(MLP(sizes)))
    return Task(kind="classification", make_model=lambda: MLP(sizes), train_batch=train_batch,
                loss=cross_entropy, eval_sets={"train": (split.train_x, split.train_y),
                                               "test": (split.test_x, split.test_y)},
                steps=total, eval_every=max(1, total // 50), warmup=0, meta=meta)


# Full and quick configurations of W2 (quick: half the width, half the context, batch 16).
W2_FULL = dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, context=128)
W2_QUICK = dict(d_model=64, n_layers=4, n_heads=4, d_ff=256, context=64)


def _setup_w2(quick: bool, steps: int | None) -> Task:
    """W2: byte-level 4-layer causal transformer on the standard-library corpus."""
    corpus = load_stdlib_corpus()
    config = W2_QUICK if quick else W2_FULL
    context = config["context"]
    batch = 16 if quick else 32
    n_eval = 64 if quick else 128

    def make_model() -> nn.Module:
        return ByteTransformer(**config)

    def train_batch(gen: torch.Generator) -> Batch:
        return sample_windows(corpus.train, batch, context, gen)

    total = steps or (400 if quick else 2000)
    meta = dict(corpus.meta, model=f"ByteTransformer{config}", batch=batch,
                params=count_parameters(make_model()), eval_windows=n_eval)
    return Task(kind="language_model", make_model=make_model, train_batch=train_batch,
                loss=cross_entropy,
                eval_sets={"train": fixed_windows(corpus.train, n_eval, context),
                           "test": fixed_windows(corpus.test, n_eval, context)},
                steps=total, eval_every=max(1, total // 20), warmup=max(1, total // 20), meta=meta)


WORKLOADS: dict[str, Workload] = {
    "W1": Workload("W1", "MLP classifier on sklearn load_digits", _setup_w1),
    "W2": Workload("W2", "byte-level transformer LM on Python stdlib text", _setup_w2),
    "W3": Workload("W3", "linear regression on sklearn load_diabetes", setup_w3),
    "W3s": Workload("W3s", "linear classifier on badly-scaled sklearn breast_cancer", setup_w3s),
}
