"""Exact influence for small models: dense curvature and a direct solve (the reference strategy).

For models with up to a few thousand tracked parameters this computes

    score(q, m) = ∇f_qᵀ (B + λI)⁻¹ ∇L_m

with a dense ``B`` of the **mean** training loss (the units and sign of
:mod:`secondorder.influence.scores`), so an approximate strategy can be compared with the
quantity it approximates (reference/influence.md §6.4):

* ``empirical_fisher``: ``(1/N) Σ_n ∇L_n ∇L_nᵀ`` (what ``fisher="empirical"`` factors
  approximate);
* ``ggn``: ``(1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` with ``J_n`` the Jacobian of the
  example's logits (``task.compute_train_logits``, softmax cross-entropy; equals the true
  Fisher, what ``fisher="sampled"``/``"exact"`` approximate);
* ``hessian``: the Hessian of ``(1/N) Σ_n L_n`` (forward-over-reverse products, symmetrised).

``block_diagonal=True`` keeps only each tracked layer's block (weight and bias together), the
structure K-FAC and EK-FAC share; the gap between the block and the full solve is the part of
an approximation's error that no per-layer method can remove.

Gradients are per-example ``torch.func.vmap(grad)`` of the task's losses through
``functional_call`` (independent of the hooks the fitted strategies use). Memory is
``O(P²)`` plus ``(N + Q) · P``: keep ``P`` below ~10⁴.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap
from torch.utils._pytree import tree_map
from torch.utils.data import default_collate

from secondorder.influence.collect import LayerRecorder, resolve_indices
from secondorder.influence.scores import InfluenceScores
from secondorder.influence.task import InfluenceTask
from secondorder.optimizers.validation import check_choice, check_real

__all__ = ["CURVATURES", "exact_curvature", "exact_scores", "flat_gradients"]

CURVATURES = ("empirical_fisher", "ggn", "hessian")


class _Bound(nn.Module):
    """``model`` called with the parameters in ``params`` (``functional_call``)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.inner = model
        self.params = params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.inner, self.params, args, kwargs)


def _tracked(model: nn.Module, task: InfluenceTask) -> list[tuple[str, list[str]]]:
    """``[(layer name, [parameter names])]`` of the tracked layers, in model order."""
    with LayerRecorder(model, task) as recorder:
        layers = [(layer.name, layer.module) for layer in recorder.layers]
    by_id = {id(p): name for name, p in model.named_parameters()}
    result = []
    for name, module in layers:
        names = [
            by_id[id(p)]
            for p in (module.weight, getattr(module, "bias", None))
            if isinstance(p, Tensor) and id(p) in by_id
        ]
        result.append((name, names))
    return result


def _collate(dataset: Any, indices: list[int], collate_fn) -> Any:
    collate = default_collate if collate_fn is None else collate_fn
    return collate([dataset[i] for i in indices])


def flat_gradients(
    model: nn.Module,
    task: InfluenceTask,
    batch: Any,
    parameter_names: Sequence[str],
    measurement: bool = False,
) -> Tensor:
    """Per-example gradients ``(N, P)`` of the training loss (or the measurement) of ``batch``.

    Args:
        batch: a collated batch whose tensors all have the example dim first.
        parameter_names: the parameters, concatenated in this order.
        measurement: use ``task.compute_measurement`` instead of ``compute_train_loss``.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    chosen = {name: params[name] for name in parameter_names}

    def loss(chosen_params: dict[str, Tensor], example: Any) -> Tensor:
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
        bound = _Bound(model, {**params, **chosen_params})
        if measurement:
            return task.compute_measurement(one, bound)
        return task.compute_train_loss(one, bound)

    grads = vmap(grad(loss), in_dims=(None, 0))(chosen, batch)
    return torch.cat([grads[name].flatten(1) for name in parameter_names], dim=1)


def exact_curvature(
    model: nn.Module,
    task: InfluenceTask,
    dataset: Any,
    *,
    curvature: str = "ggn",
    indices: Sequence[int] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> tuple[Tensor, list[tuple[str, slice]]]:
    """Dense curvature ``(P, P)`` of the mean training loss over the tracked parameters.

    Returns:
        ``(matrix, [(layer name, its slice of the P coordinates)])``.
    """
    check_choice("curvature", curvature, CURVATURES)
    tracked = _tracked(model, task)
    names = [n for _, layer_names in tracked for n in layer_names]
    slices, start = [], 0
    params = {name: p.detach() for name, p in model.named_parameters()}
    for layer, layer_names in tracked:
        size = sum(params[n].numel() for n in layer_names)
        slices.append((layer, slice(start, start + size)))
        start += size
    chosen = resolve_indices(dataset, indices, "indices")
    batch = _collate(dataset, chosen, collate_fn)
    count = len(chosen)
    if curvature == "empirical_fisher":
        grads = flat_gradients(model, task, batch, names)
        return grads.T @ grads / count, slices
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].flatten() for n in names])

    def unflatten(vector: Tensor) -> dict[str, Tensor]:
        pieces = vector.split(sizes)
        return {n: v.reshape(s) for n, v, s in zip(names, pieces, shapes, strict=True)}

    if curvature == "ggn":

        def logits(vector: Tensor, example: Any) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            out = task.compute_train_logits(one, _Bound(model, {**params, **unflatten(vector)}))
            return out[0]

        jacobians = vmap(jacrev(logits), in_dims=(None, 0))(flat, batch)  # (N, C, P)
        with torch.no_grad():
            probs = torch.softmax(task.compute_train_logits(batch, model), dim=-1)
        middle = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        matrix = torch.einsum("ncp,ncd,ndq->pq", jacobians, middle, jacobians) / count
        return (matrix + matrix.T) / 2, slices

    def objective(vector: Tensor) -> Tensor:
        return task.compute_train_loss(batch, _Bound(model, {**params, **unflatten(vector)}))

    gradient = grad(objective)

    def hvp(tangent: Tensor) -> Tensor:
        return jvp(gradient, (flat,), (tangent,))[1]

    eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    matrix = torch.cat([vmap(hvp)(chunk) for chunk in eye.split(256)], dim=0) / count
    return (matrix + matrix.T) / 2, slices


def exact_scores(
    model: nn.Module,
    task: InfluenceTask,
    query_dataset: Any,
    train_dataset: Any,
    *,
    damping: float,
    curvature: str = "ggn",
    block_diagonal: bool = False,
    query_indices: Sequence[int] | None = None,
    train_indices: Sequence[int] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> InfluenceScores:
    """Pairwise scores with the exact damped curvature (module docstring).

    Args:
        model, task, query_dataset, train_dataset, query_indices, train_indices,
            collate_fn: as for :func:`~secondorder.influence.scores.compute_pairwise_scores`
            (the curvature is of the chosen training examples).
        damping: ``λ ≥ 0`` added to the diagonal (e.g. the training weight decay).
        curvature: ``empirical_fisher``, ``ggn`` or ``hessian``.
        block_diagonal: keep only the tracked layers' diagonal blocks.

    Returns:
        :class:`~secondorder.influence.scores.InfluenceScores` ``(Q, N)`` with ``per_layer``
        (block-diagonal only: each layer's own solve).
    """
    damping = check_real("damping", damping, low=0.0)
    if not isinstance(block_diagonal, bool):
        raise TypeError(f"Invalid block_diagonal: {block_diagonal!r} (expected a bool)")
    trains = resolve_indices(train_dataset, train_indices, "train_indices")
    queries = resolve_indices(query_dataset, query_indices, "query_indices")
    matrix, slices = exact_curvature(
        model, task, train_dataset, curvature=curvature, indices=trains, collate_fn=collate_fn
    )
    names = [n for _, layer_names in _tracked(model, task) for n in layer_names]
    train_grads = flat_gradients(
        model, task, _collate(train_dataset, trains, collate_fn), names
    )
    query_grads = flat_gradients(
        model, task, _collate(query_dataset, queries, collate_fn), names, measurement=True
    )
    per_layer = None
    if block_diagonal:
        per_layer = {}
        for layer, piece in slices:
            block = matrix[piece, piece]
            eye = torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
            solved = torch.linalg.solve(block + damping * eye, query_grads[:, piece].T).T
            per_layer[layer] = solved @ train_grads[:, piece].T
        scores = sum(per_layer.values())
    else:
        eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        scores = torch.linalg.solve(matrix + damping * eye, query_grads.T).T @ train_grads.T
    return InfluenceScores(
        scores=scores.detach().cpu(),
        train_indices=trains,
        query_indices=queries,
        per_layer=None if per_layer is None else {k: v.cpu() for k, v in per_layer.items()},
        damping={layer: damping for layer, _ in slices},
    )
