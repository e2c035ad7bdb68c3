"""Measuring attribution quality: the linear datamodeling score and leave-one-out correlation.

Both compare predicted effects of removing training data with the effects measured by
retraining (reference/influence.md §6.4); the retraining is the user's ``train_fn``, so any
model and training loop can be evaluated.

* **LDS** (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale", §2): draw ``M``
  random subsets keeping a ``fraction`` of the training set, retrain on each and record the
  query measurements ``f`` ``(M, Q)``. The prediction for a subset is ``−mask @ scoresᵀ``
  (kronfluence's sign: a positive score is helpful, so keeping it lowers the query loss); per
  query, the Spearman correlation between prediction and measurement over the ``M`` subsets,
  averaged over queries. Its ceiling is set by retraining noise: :func:`evaluate_lds` with
  ``seeds=2`` retrains every subset twice and reports the correlation between the two
  retrainings (``seed_to_seed``), which no attribution method can be expected to exceed by
  much, and the LDS against each seed.
* **Leave-one-out**: remove example ``m``, retrain, record the change of every query
  measurement ``Δf (R, Q)``; the prediction is ``+score(q, m) / N`` (the units of
  :mod:`secondorder.influence.scores`). Reported: mean over queries of per-query Pearson and
  Spearman across the removed examples, and one pooled Pearson over all pairs.

Correlations ignore queries whose values are constant (their correlation is undefined).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from secondorder.optimizers.validation import check_int, check_real

__all__ = [
    "LDSResult",
    "LeaveOneOutResult",
    "evaluate_lds",
    "evaluate_leave_one_out",
    "leave_one_out_correlation",
    "linear_datamodeling_score",
    "spearman_columns",
    "subset_masks",
]


def _ranks(values: Tensor) -> Tensor:
    """Ranks along dim 0 (ties broken by position), float64."""
    return values.argsort(dim=0).argsort(dim=0).to(torch.float64)


def _pearson_columns(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each column pair of ``a``, ``b`` ``(M, Q)`` → ``(Q,)``; NaN where a
    column is constant."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    denominator = (a.square().sum(0) * b.square().sum(0)).sqrt()
    result = (a * b).sum(0) / denominator
    return torch.where(denominator > 0, result, torch.full_like(result, float("nan")))


def spearman_columns(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of each column pair of ``a``, ``b`` ``(M, Q)`` → ``(Q,)``."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"Invalid shapes: {tuple(a.shape)} and {tuple(b.shape)} (need equal 2-D)")
    return _pearson_columns(_ranks(a), _ranks(b))


def _check_scores(scores: Tensor) -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError("Invalid scores: expected a (Q, N) tensor of pairwise scores")
    return scores.detach().cpu().double()


def subset_masks(
    num_train: int, count: int, fraction: float = 0.5, seed: int = 0
) -> Tensor:
    """``count`` random subsets as a ``(count, num_train)`` bool mask (``True`` = kept).

    Each example is kept independently with probability ``fraction`` (a seeded generator).
    """
    check_int("num_train", num_train, low=1)
    check_int("count", count, low=2)
    fraction = check_real("fraction", fraction, low=0.0, high=1.0)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, num_train, generator=generator) < fraction


def linear_datamodeling_score(
    scores: Tensor, masks: Tensor, measurements: Tensor
) -> tuple[float, Tensor]:
    """LDS of ``scores`` against retrained measurements (module docstring).

    Args:
        scores: ``(Q, N)`` pairwise scores.
        masks: ``(M, N)`` kept examples of each subset (bool or 0/1).
        measurements: ``(M, Q)`` query measurements of the model retrained on each subset.

    Returns:
        ``(mean over queries, per-query Spearman (Q,))``.
    """
    scores = _check_scores(scores)
    masks = masks.detach().cpu().double()
    if masks.dim() != 2 or masks.shape[1] != scores.shape[1]:
        raise ValueError(
            f"Invalid masks: shape {tuple(masks.shape)} for {scores.shape[1]} training examples"
        )
    measurements = measurements.detach().cpu().double()
    if measurements.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"Invalid measurements: shape {tuple(measurements.shape)}, expected "
            f"{(masks.shape[0], scores.shape[0])} (subsets, queries)"
        )
    per_query = spearman_columns(-masks @ scores.T, measurements)
    return float(per_query.nanmean()), per_query


@dataclass
class LDSResult:
    """What :func:`evaluate_lds` measured.

    Attributes:
        lds: mean over queries and seeds of the per-query Spearman correlation.
        per_seed: the LDS against each retraining seed.
        seed_to_seed: mean per-query Spearman between two retraining seeds' measurements
            (``None`` with one seed): the noise ceiling of the ground truth.
        masks: ``(M, N)`` the subsets; measurements: ``(seeds, M, Q)``.
    """

    lds: float
    per_seed: list[float]
    seed_to_seed: float | None
    masks: Tensor
    measurements: Tensor

    def score(self, scores: Tensor) -> float:
        """LDS of other ``scores`` against the same retrainings (mean over seeds)."""
        values = [linear_datamodeling_score(scores, self.masks, m)[0] for m in self.measurements]
        return float(sum(values) / len(values))


def evaluate_lds(
    scores: Tensor | None,
    train_fn: Callable[[Tensor, int], Tensor],
    num_train: int,
    *,
    count: int = 50,
    fraction: float = 0.5,
    seeds: int = 1,
    seed: int = 0,
) -> LDSResult:
    """Retrain on ``count`` random subsets and compute the LDS (module docstring).

    Args:
        scores: ``(Q, N)`` pairwise scores, or ``None`` to only collect the ground truth (then
            use :meth:`LDSResult.score` for each method).
        train_fn: ``train_fn(indices, seed) -> (Q,)``: train a model on the training examples
            ``indices`` (int64) with training randomness ``seed`` and return its query
            measurements (e.g. the query losses).
        num_train: ``N``.
        count: number of subsets ``M``.
        fraction: probability that an example is kept.
        seeds: retrainings per subset (``2`` also measures the seed-to-seed noise ceiling).
        seed: seed of the subsets.

    Returns:
        :class:`LDSResult`.
    """
    check_int("seeds", seeds, low=1)
    if not callable(train_fn):
        raise TypeError("Invalid train_fn: expected a callable train_fn(indices, seed)")
    masks = subset_masks(num_train, count, fraction, seed)
    measurements = torch.stack(
        [
            torch.stack(
                [
                    torch.as_tensor(train_fn(mask.nonzero().flatten(), run)).detach().cpu().double()
                    for mask in masks
                ]
            )
            for run in range(seeds)
        ]
    )
    seed_to_seed = None
    if seeds > 1:
        seed_to_seed = float(spearman_columns(measurements[0], measurements[1]).nanmean())
    result = LDSResult(float("nan"), [], seed_to_seed, masks, measurements)
    if scores is not None:
        result.per_seed = [
            linear_datamodeling_score(scores, masks, m)[0] for m in measurements
        ]
        result.lds = float(sum(result.per_seed) / len(result.per_seed))
    return result


@dataclass
class LeaveOneOutResult:
    """Leave-one-out agreement (module docstring): per-query means and the pooled Pearson."""

    pearson: float
    spearman: float
    pooled_pearson: float


def leave_one_out_correlation(
    scores: Tensor, removed: Sequence[int], changes: Tensor, num_train: int | None = None
) -> LeaveOneOutResult:
    """Compare ``+score / N`` with measured changes of the query measurements.

    Args:
        scores: ``(Q, N)`` pairwise scores.
        removed: the ``R`` removed training positions (columns of ``scores``).
        changes: ``(R, Q)`` measurement after retraining without ``removed[r]`` minus before.
        num_train: ``N`` of the units (default ``scores.shape[1]``).
    """
    scores = _check_scores(scores)
    removed = [int(i) for i in removed]
    if len(removed) < 2:
        raise ValueError("Invalid removed: need at least two removed examples")
    changes = changes.detach().cpu().double()
    if changes.shape != (len(removed), scores.shape[0]):
        raise ValueError(
            f"Invalid changes: shape {tuple(changes.shape)}, expected "
            f"{(len(removed), scores.shape[0])} (removed, queries)"
        )
    predicted = scores[:, removed].T / float(num_train or scores.shape[1])
    pooled = torch.corrcoef(torch.stack([predicted.flatten(), changes.flatten()]))[0, 1]
    return LeaveOneOutResult(
        pearson=float(_pearson_columns(predicted, changes).nanmean()),
        spearman=float(spearman_columns(predicted, changes).nanmean()),
        pooled_pearson=float(pooled),
    )


def evaluate_leave_one_out(
    scores: Tensor,
    retrain_without: Callable[[int], Tensor],
    baseline: Tensor,
    removed: Sequence[int],
) -> tuple[LeaveOneOutResult, Tensor]:
    """Retrain without each of ``removed`` and correlate (module docstring).

    Args:
        scores: ``(Q, N)`` pairwise scores.
        retrain_without: ``retrain_without(m) -> (Q,)`` query measurements of the model
            retrained without training example ``m`` (warm-started from the trained model
            for low noise).
        baseline: ``(Q,)`` the measurements of the model trained on everything.
        removed: the training positions to remove.

    Returns:
        ``(LeaveOneOutResult, changes (R, Q))``.
    """
    if not callable(retrain_without):
        raise TypeError("Invalid retrain_without: expected a callable retrain_without(index)")
    baseline = torch.as_tensor(baseline).detach().cpu().double()
    changes = torch.stack(
        [
            torch.as_tensor(retrain_without(int(m))).detach().cpu().double() - baseline
            for m in removed
        ]
    )
    return leave_one_out_correlation(scores, removed, changes), changes
