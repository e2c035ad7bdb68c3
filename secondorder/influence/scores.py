"""Influence scores: pairwise, self-influence, per layer, per token, top-k.

**Definition and sign.** For a query ``q`` with measurement ``f_q`` and a training example ``m``
with (summed) loss ``L_m``::

    score(q, m) = Σ_layers ⟨ (G + λI)⁻¹ ∇f_q , ∇L_m ⟩

with ``G`` the fitted block-diagonal curvature of the **mean** training loss (kronfluence's
convention; Grosse et al. 2023 eq. 4 up to the sign discussed below). With a *loss* measurement
(``ClassificationTask``, ``LanguageModelTask``) a **positive score means the example helped**:
removing it would raise the query loss. Grosse et al.'s ``I_f = −∇fᵀ(G+λI)⁻¹∇L_m`` with
``f = log p(completion)`` has both signs flipped and gives the same numbers.

**Units.** Raw scores are ``N`` times the predicted change: for a model trained on
``(1/N) Σ_n L_n + ½·wd·‖θ‖²`` (``λ = wd``), removing ``m`` changes ``f_q`` by about
``+score(q, m) / N``. :meth:`InfluenceScores.normalized` divides by ``N`` (or by a token count for
language models), the scale of the paper's figures.

**Cost.** The query gradients of one query batch are preconditioned once (optionally
compressed to rank ``k`` per layer by an SVD, Grosse et al. 2023 §3.2); one pass over the
training data then scores all of them. Training gradients exist one batch at a time.

**Ranks.** Under ``torch.distributed`` (``distributor=``, as for
:func:`~secondorder.influence.factors.fit_factors`) every rank scores a contiguous shard of the
training examples against every query; two all-gathers per result (the shapes, then the values
in float64) give every rank the whole result in the caller's order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from secondorder.distributed.distributor import Distributor
from secondorder.influence.collect import (
    LayerRecorder,
    iterate_batches,
    resolve_indices,
    shard,
)
from secondorder.influence.contraction import PreparedQuery, low_rank_factors
from secondorder.influence.factors import InfluenceFactors
from secondorder.influence.sharding import influence_distributor
from secondorder.influence.statistics import LayerPreconditioner, per_example_gradients
from secondorder.influence.task import InfluenceTask
from secondorder.optimizers.validation import check_int

__all__ = [
    "InfluenceScores",
    "TopK",
    "compute_pairwise_scores",
    "compute_self_scores",
    "low_rank_factors",
    "preconditioned_query_gradients",
]

# dtypes a gathered score tensor may have; its index travels with its shape
_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class TopK:
    """The ``k`` most helpful and most harmful training examples of each query.

    Attributes:
        helpful_indices / harmful_indices: ``(Q, k)`` dataset indices (largest / most negative
            scores first).
        helpful_scores / harmful_scores: ``(Q, k)`` their scores.
    """

    helpful_indices: Tensor
    helpful_scores: Tensor
    harmful_indices: Tensor
    harmful_scores: Tensor


@dataclass
class InfluenceScores:
    """Scores of queries against training examples (module docstring for sign and units).

    Attributes:
        scores: ``(Q, N)`` (pairwise) or ``(N,)`` (self-influence).
        query_indices: dataset positions of the ``Q`` rows (``None`` for self-influence).
        train_indices: dataset positions of the ``N`` columns.
        per_layer: ``{module name: tensor shaped like scores}`` when requested; they sum to
            ``scores``.
        per_token: ``(Q, N, T)`` when requested: ``Σ_layers g_tᵀ P(∇f_q) ā_t``, the part of
            the training gradient that each tracked layer carries at position ``t``
            (kronfluence's convention); sums over ``T`` to ``scores``. For the output layer
            alone it is exactly the loss term predicting the token at ``t``; through attention,
            an earlier layer's position ``t`` also carries later positions' loss terms. It is
            never the effect of the token's presence as an input.
        damping: the damping used per layer.
    """

    scores: Tensor
    train_indices: list[int]
    query_indices: list[int] | None = None
    per_layer: dict[str, Tensor] | None = None
    per_token: Tensor | None = None
    damping: dict[str, float] | None = None

    def normalized(self, count: int | None = None) -> Tensor:
        """``scores / count``: the predicted change of the measurement when an example is
        removed. ``count`` defaults to the number of scored training examples; pass the size
        of the full training set (or its token count for a language model) when scoring a
        subset."""
        return self.scores / float(count or len(self.train_indices))

    def top_k(self, k: int) -> TopK:
        """The ``k`` most helpful (largest) and most harmful (most negative) examples per query."""
        check_int("k", k, low=1)
        scores = self.scores if self.scores.dim() == 2 else self.scores.unsqueeze(0)
        k = min(k, scores.shape[1])
        positions = torch.tensor(self.train_indices, dtype=torch.long)
        helpful = torch.topk(scores, k, dim=1)
        harmful = torch.topk(-scores, k, dim=1)
        return TopK(
            positions[helpful.indices], helpful.values, positions[harmful.indices], -harmful.values
        )


def _check_layers(recorder: LayerRecorder, factors: InfluenceFactors) -> None:
    missing = [name for name in recorder.names if name not in factors.layers]
    if missing:
        raise ValueError(
            f"Invalid factors: no factors for tracked modules {missing}; "
            "fit them with the same task"
        )


def _gather(local: Tensor, dim: int, distributor: Distributor) -> Tensor:
    """Concatenate every rank's ``local`` along ``dim`` in rank order (sizes may differ).

    Each rank is the owner of its own piece: one all-gather of the shapes and dtypes, then one
    of the values in float64 (lossless for every floating dtype the scores come in). The result
    has the dtype ``torch.cat`` would give (an empty piece of a rank without examples counts).
    """
    if distributor.world_size == 1:
        return local
    if local.dtype not in _SCORE_DTYPES:
        raise TypeError(f"Invalid scores: dtype {local.dtype} (expected one of {_SCORE_DTYPES})")
    device = distributor.communication_device()
    ranks = list(range(distributor.world_size))

    def mine(value: Tensor) -> list[Tensor | None]:
        return [value if rank == distributor.rank else None for rank in ranks]

    header = torch.tensor(
        [*local.shape, _SCORE_DTYPES.index(local.dtype)], dtype=torch.float64, device=device
    )
    headers = [
        [int(value) for value in gathered.tolist()]
        for gathered in distributor.all_gather_values(mine(header), ranks, [header] * len(ranks))
    ]
    sizes = [gathered[:-1] for gathered in headers]
    dtype = functools.reduce(torch.promote_types, [_SCORE_DTYPES[h[-1]] for h in headers])
    flat = local.detach().reshape(-1).to(device=device, dtype=torch.float64)
    # only shape, dtype and device of ``like`` are read: zero-stride views allocate nothing
    like = [
        torch.zeros((), dtype=torch.float64, device=device).expand(math.prod(size))
        for size in sizes
    ]
    values = distributor.all_gather_values(mine(flat), ranks, like)
    parts = [
        value.reshape(size).to(device="cpu", dtype=dtype)
        for value, size in zip(values, sizes, strict=True)
    ]
    return _pad_cat(parts, dim)


def _pad_cat(parts: list[Tensor], dim: int) -> Tensor:
    """Concatenate along ``dim``, zero-padding a trailing token dim (3-D parts) to the longest."""
    if parts[0].dim() == 3:
        longest = max(part.shape[-1] for part in parts)
        parts = [torch.nn.functional.pad(part, (0, longest - part.shape[-1])) for part in parts]
    return torch.cat(parts, dim=dim)


def compute_pairwise_scores(
    model: nn.Module,
    task: InfluenceTask,
    factors: InfluenceFactors,
    query_dataset: Any,
    train_dataset: Any,
    *,
    damping: float | None = None,
    query_batch_size: int = 16,
    train_batch_size: int = 32,
    query_indices: Sequence[int] | None = None,
    train_indices: Sequence[int] | None = None,
    per_layer: bool = False,
    per_token: bool = False,
    low_rank: int | None = None,
    full_svd: bool = False,
    seed: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    distributor: Distributor | torch.distributed.ProcessGroup | bool | None = None,
) -> InfluenceScores:
    """Scores of every query against every training example (module docstring).

    Args:
        model, task: as for :func:`~secondorder.influence.factors.fit_factors` (same tracked
            modules).
        factors: fitted :class:`~secondorder.influence.factors.InfluenceFactors`.
        query_dataset, train_dataset: indexable datasets.
        damping: absolute ``λ``, or ``None`` for ``0.1 × mean eigenvalue`` per layer.
        query_batch_size: queries whose preconditioned gradients share one training pass.
        train_batch_size: training examples per forward/backward pass.
        query_indices, train_indices: subsets by dataset position (default all).
        per_layer: also return each layer's ``(Q, N)`` scores.
        per_token: also return ``(Q, N, T)`` per-position scores (every tracked layer must see
            the same ``T`` positions, e.g. a language model without embeddings tracked at
            another length).
        low_rank: compress each layer's preconditioned query gradient to this rank (SVD).
        full_svd: exact SVD for the compression (default: randomised, seeded by ``seed``).
        collate_fn, device, progress, distributor: as for ``fit_factors`` (every rank
            scores its shard of the training examples; every rank returns all scores).

    Returns:
        :class:`InfluenceScores` with ``scores`` ``(Q, N)``.
    """
    check_int("query_batch_size", query_batch_size, low=1)
    check_int("train_batch_size", train_batch_size, low=1)
    if low_rank is not None:
        check_int("low_rank", low_rank, low=1)
    queries = resolve_indices(query_dataset, query_indices, "query_indices")
    trains = resolve_indices(train_dataset, train_indices, "train_indices")
    device = None if device is None else torch.device(device)
    distributor = influence_distributor(distributor)
    local_trains, _ = shard(trains, distributor.rank, distributor.world_size)
    preconditioners = factors.preconditioners(damping)
    generator = torch.Generator().manual_seed(seed)
    totals, layer_totals, token_totals = [], {}, []
    with LayerRecorder(model, task) as recorder:
        _check_layers(recorder, factors)
        for measured_positions, query_batch in iterate_batches(
            query_dataset, queries, query_batch_size, collate_fn, device=device
        ):
            measured = recorder.measurement_pass(query_batch)
            prepared = {
                name: PreparedQuery(
                    preconditioners[name],
                    rows,
                    len(local_trains),
                    low_rank,
                    full_svd,
                    generator,
                )
                for name, rows in measured.items()
            }
            batch_scores, batch_layers, batch_tokens = [], {name: [] for name in prepared}, []
            for _, train_batch in iterate_batches(
                train_dataset,
                local_trains,
                train_batch_size,
                collate_fn,
                device=device,
                progress=progress,
                desc="scoring",
            ):
                rows_by_layer = recorder.loss_pass(train_batch)
                total, tokens = 0, None
                for name, query in prepared.items():
                    layer_scores, layer_tokens = query.scores(rows_by_layer[name], per_token)
                    total = total + layer_scores
                    batch_layers[name].append(layer_scores.detach().cpu())
                    if per_token:
                        if tokens is not None and tokens.shape != layer_tokens.shape:
                            raise ValueError(
                                f"Invalid per_token: module {name!r} sees "
                                f"{layer_tokens.shape[-1]} positions, others "
                                f"{tokens.shape[-1]}; track modules with equal positions "
                                "or use per_layer"
                            )
                        tokens = layer_tokens if tokens is None else tokens + layer_tokens
                batch_scores.append(total.detach().cpu())
                if per_token:
                    batch_tokens.append(tokens.detach().cpu())
            empty = torch.zeros(len(measured_positions), 0)  # a rank without training examples
            totals.append(_gather(torch.cat(batch_scores or [empty], dim=1), 1, distributor))
            for name, parts in batch_layers.items():
                layer_totals.setdefault(name, []).append(
                    _gather(torch.cat(parts or [empty], dim=1), 1, distributor)
                )
            if per_token:
                local_tokens = _pad_cat(batch_tokens or [empty[:, :, None]], 1)
                token_totals.append(_gather(local_tokens, 1, distributor))
    return InfluenceScores(
        scores=torch.cat(totals, dim=0),
        train_indices=trains,
        query_indices=queries,
        per_layer={name: torch.cat(parts, dim=0) for name, parts in layer_totals.items()}
        if per_layer
        else None,
        per_token=torch.cat(token_totals, dim=0) if per_token else None,
        damping={name: p.damping for name, p in preconditioners.items()},
    )


def compute_self_scores(
    model: nn.Module,
    task: InfluenceTask,
    factors: InfluenceFactors,
    dataset: Any,
    *,
    damping: float | None = None,
    batch_size: int = 32,
    indices: Sequence[int] | None = None,
    use_measurement: bool = False,
    per_layer: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    distributor: Distributor | torch.distributed.ProcessGroup | bool | None = None,
) -> InfluenceScores:
    """Self-influence ``score(m, m) = ⟨(G+λI)⁻¹ ∇L_m, ∇L_m⟩`` of every example (``(N,)``).

    With ``use_measurement`` the left gradient is the measurement's, ``⟨(G+λI)⁻¹ ∇f_m, ∇L_m⟩``.
    High self-influence flags mislabelled or atypical examples. Equals the diagonal of
    :func:`compute_pairwise_scores` of a dataset against itself. Arguments as there.
    """
    check_int("batch_size", batch_size, low=1)
    chosen = resolve_indices(dataset, indices, "indices")
    distributor = influence_distributor(distributor)
    local, _ = shard(chosen, distributor.rank, distributor.world_size)
    preconditioners = factors.preconditioners(damping)
    device = None if device is None else torch.device(device)
    parts, layer_parts = [], {}
    with LayerRecorder(model, task) as recorder:
        _check_layers(recorder, factors)
        names = recorder.names
        for _, batch in iterate_batches(
            dataset,
            local,
            batch_size,
            collate_fn,
            device=device,
            progress=progress,
            desc="self-influence",
        ):
            loss_rows = recorder.loss_pass(batch)
            left_rows = recorder.measurement_pass(batch) if use_measurement else loss_rows
            total = 0
            for name, rows in loss_rows.items():
                gradients = per_example_gradients(rows)
                left = (
                    gradients if left_rows is loss_rows else per_example_gradients(left_rows[name])
                )
                value = (preconditioners[name].apply(left) * gradients).flatten(1).sum(1)
                total = total + value
                layer_parts.setdefault(name, []).append(value.detach().cpu())
            parts.append(total.detach().cpu())
    empty = torch.zeros(0)  # a rank without examples
    per_layer_scores = {
        name: _gather(torch.cat(layer_parts.get(name, [empty])), 0, distributor)
        for name in names
    }
    return InfluenceScores(
        scores=_gather(torch.cat(parts or [empty]), 0, distributor),
        train_indices=chosen,
        per_layer=per_layer_scores if per_layer else None,
        damping={name: p.damping for name, p in preconditioners.items()},
    )


def preconditioned_query_gradients(
    model: nn.Module,
    task: InfluenceTask,
    factors: InfluenceFactors,
    batch: Any,
    damping: float | None = None,
) -> dict[str, Tensor]:
    """``(G + λI)⁻¹ ∇f_q`` per layer for one batch of queries: ``{name: (Q, groups, o, i)}``."""
    preconditioners: dict[str, LayerPreconditioner] = factors.preconditioners(damping)
    with LayerRecorder(model, task) as recorder:
        _check_layers(recorder, factors)
        rows = recorder.measurement_pass(batch)
        return {
            name: preconditioners[name].apply(per_example_gradients(r)) for name, r in rows.items()
        }
