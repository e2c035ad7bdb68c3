"""W3 workloads: small tabular problems where Polyak-type and Gauss-Newton steps shine.

* **W3** — regression on scikit-learn's ``load_diabetes`` (442 patients, 10 features, a
  disease-progression score): a linear model ``10 -> 1`` with mean squared error on the
  standardised target, batch 64. (An MLP overfits these 354 training rows within a few dozen
  steps, after which "steps to AdamW's final held-out loss" measures nothing; the convex
  problem compares convergence speed, the setting of SANIA's and Gauss-Newton's papers.)
* **W3s** — the *badly-scaled* classification set of SANIA's paper (Abdukhakimov et al.
  2023, §4 of reference/sania.md): scikit-learn's ``load_breast_cancer`` (569 samples, 30
  features), standardised, then feature ``j`` multiplied by ``e^{u_j}`` with
  ``u_j ~ U[−4, 4]`` (fixed seed): a linear classifier ``30 -> 2`` with cross-entropy,
  batch 64. The SQR preconditioners of SANIA are invariant to this scaling; Adam is not.

Both load from installed packages (no download) with a fixed train/held-out split; the
setup functions return :class:`benchmarks.workloads.Task` objects and are registered in
``benchmarks.workloads.WORKLOADS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.data import TensorSplit
from benchmarks.models import MLP, count_parameters

if TYPE_CHECKING:  # the Task class lives in workloads.py, which imports this module
    from benchmarks.workloads import Task

__all__ = ["load_diabetes_split", "load_scaled_breast_cancer_split", "setup_w3", "setup_w3s"]

W3_SIZES = (10, 1)
W3S_SIZES = (30, 2)
BATCH = 64


def _split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid test_fraction: {test_fraction} (expected 0 < test_fraction < 1)")
    order = np.random.RandomState(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    return order[n_test:], order[:n_test]


def _standardise(x: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    mean, std = x[train_idx].mean(axis=0), x[train_idx].std(axis=0)
    std[std == 0] = 1.0
    return (x - mean) / std


def load_diabetes_split(test_fraction: float = 0.2, seed: int = 0) -> TensorSplit:
    """W3: ``load_diabetes`` with features and target standardised by the training split.

    Returns ``train_x (354, 10)``, ``train_y (354, 1)`` float32 and ``test_x (88, 10)``,
    ``test_y (88, 1)`` at the default fraction (numpy ``RandomState(seed)`` permutation).
    """
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    train_idx, test_idx = _split_indices(len(x), test_fraction, seed)
    x = _standardise(np.asarray(x, dtype=np.float64), train_idx)
    y = _standardise(np.asarray(y, dtype=np.float64)[:, None], train_idx)
    as_tensor = lambda a, idx: torch.from_numpy(a[idx]).to(torch.float32)  # noqa: E731
    meta = {
        "source": "sklearn.datasets.load_diabetes",
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "n_features": x.shape[1],
        "target": "standardised progression score",
        "split_seed": seed,
    }
    return TensorSplit(
        as_tensor(x, train_idx),
        as_tensor(y, train_idx),
        as_tensor(x, test_idx),
        as_tensor(y, test_idx),
        meta,
    )


def load_scaled_breast_cancer_split(
    scale: float = 4.0, test_fraction: float = 0.2, seed: int = 0
) -> TensorSplit:
    """W3s: standardised ``load_breast_cancer`` with feature ``j`` multiplied by ``e^{u_j}``,
    ``u_j ~ U[−scale, scale]`` drawn from ``RandomState(seed + 1)``.

    Returns ``train_x (455, 30)`` float32, ``train_y (455,)`` int64 and ``test_x (114, 30)``,
    ``test_y (114,)``; ``meta["log_scales"]`` holds the ``u_j``.
    """
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    train_idx, test_idx = _split_indices(len(x), test_fraction, seed)
    log_scales = np.random.RandomState(seed + 1).uniform(-scale, scale, size=x.shape[1])
    x = _standardise(np.asarray(x, dtype=np.float64), train_idx) * np.exp(log_scales)
    y = np.asarray(y, dtype=np.int64)
    as_x = lambda idx: torch.from_numpy(x[idx]).to(torch.float32)  # noqa: E731
    as_y = lambda idx: torch.from_numpy(y[idx])  # noqa: E731
    meta = {
        "source": "sklearn.datasets.load_breast_cancer",
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "n_features": x.shape[1],
        "n_classes": 2,
        "split_seed": seed,
        "feature_scale": f"e^U[-{scale},{scale}]",
        "log_scales": [round(float(u), 4) for u in log_scales],
    }
    return TensorSplit(as_x(train_idx), as_y(train_idx), as_x(test_idx), as_y(test_idx), meta)


def _sampler(split: TensorSplit):
    def train_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(split.train_x), (BATCH,), generator=gen)
        return split.train_x[idx], split.train_y[idx]

    return train_batch


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def setup_w3(quick: bool, steps: int | None) -> Task:
    """W3: linear 10 -> 1 regression on standardised diabetes, batch 64, MSE."""
    from benchmarks.workloads import Task

    split = load_diabetes_split()
    total = steps or (300 if quick else 900)
    meta = dict(
        split.meta, model=f"MLP{W3_SIZES}", batch=BATCH, params=count_parameters(MLP(W3_SIZES))
    )
    return Task(
        kind="regression",
        make_model=lambda: MLP(W3_SIZES),
        train_batch=_sampler(split),
        loss=_mse,
        eval_sets={"train": (split.train_x, split.train_y), "test": (split.test_x, split.test_y)},
        steps=total,
        eval_every=max(1, total // 150),
        warmup=0,
        meta=meta,
    )


def setup_w3s(quick: bool, steps: int | None) -> Task:
    """W3s: linear classifier 30 -> 2 on badly-scaled breast_cancer, batch 64, cross-entropy."""
    from benchmarks.workloads import Task

    split = load_scaled_breast_cancer_split()
    total = steps or (300 if quick else 900)
    meta = dict(
        split.meta, model=f"MLP{W3S_SIZES}", batch=BATCH, params=count_parameters(MLP(W3S_SIZES))
    )
    return Task(
        kind="classification",
        make_model=lambda: MLP(W3S_SIZES),
        train_batch=_sampler(split),
        loss=_cross_entropy,
        eval_sets={"train": (split.train_x, split.train_y), "test": (split.test_x, split.test_y)},
        steps=total,
        eval_every=max(1, total // 150),
        warmup=0,
        meta=meta,
    )
