"""Running the model over data and collecting per-layer inputs and output gradients.

* :func:`resolve_indices` / :func:`shard` / :func:`iterate_batches`: which examples, in which
  batches, on which rank (contiguous shards, one per rank of the distributor), with an
  optional tqdm progress bar.
* :class:`LayerRecorder`: wraps :class:`secondorder.precond.capture.LayerCapture` (the suite's
  one hook mechanism) around the task's tracked modules and returns, per backward pass, each
  layer's rows ``a`` and output gradients ``g`` scaled to per-example losses (the task's
  losses are sums). Gradients are taken with ``torch.autograd.grad``, so the model's
  ``.grad`` fields are never touched.

Fisher modes (reference/ekfac.md §2):

* ``"empirical"``: the dataset labels (``compute_train_loss(sample=False)``);
* ``"sampled"``: labels drawn from the model with a generator seeded once per stage from
  ``seed`` (same seed, same batching ⇒ bit-identical factors);
* ``"exact"``: for a task with
  :meth:`~secondorder.influence.task.InfluenceTask.compute_train_logits`
  (one softmax over ``C`` classes per example): ``C`` backward passes of
  ``Σ_n sqrt(p_nc) · (−log p_nc)`` with ``p`` detached, whose squared gradients summed over
  ``c`` give ``E_{y~p}[∇ log p_y ∇ log p_yᵀ]`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from secondorder.influence.task import InfluenceTask
from secondorder.precond.capture import LayerCapture, LayerStats
from secondorder.precond.capture_layers import (
    KRONECKER_KINDS,
    CapturedLayer,
    module_kind,
    module_parameters,
)

__all__ = [
    "FISHER_MODES",
    "LayerRecorder",
    "LayerRows",
    "iterate_batches",
    "resolve_indices",
    "shard",
]

FISHER_MODES = ("empirical", "sampled", "exact")
SUPPORTED_KINDS = KRONECKER_KINDS


def resolve_indices(dataset: Any, indices: Sequence[int] | None, name: str) -> list[int]:
    """The dataset positions to use: ``indices`` (checked) or ``range(len(dataset))``."""
    size = len(dataset)
    if indices is None:
        return list(range(size))
    result = [int(i) for i in indices]
    for index in result:
        if not 0 <= index < size:
            raise ValueError(f"Invalid {name}: index {index} outside a dataset of {size} examples")
    return result


def shard(indices: Sequence[int], rank: int, world_size: int) -> tuple[list[int], list[int]]:
    """Rank ``rank``'s contiguous share of ``indices`` among ``world_size`` ranks, and every
    rank's share size.

    Returns:
        ``(local indices, sizes per rank)``; concatenating the shards in rank order gives
        ``indices`` back, so gathered results keep the caller's order.
    """
    total = len(indices)
    bounds = [total * r // world_size for r in range(world_size + 1)]
    return list(indices[bounds[rank] : bounds[rank + 1]]), [
        bounds[r + 1] - bounds[r] for r in range(world_size)
    ]


def iterate_batches(
    dataset: Any,
    indices: Sequence[int],
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    *,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "",
) -> Iterator[tuple[list[int], Any]]:
    """Yield ``(positions, batch)`` over ``indices`` in order, ``batch_size`` at a time.

    ``batch`` is ``collate_fn([dataset[i] for i in positions])`` (``default_collate`` when
    ``None``), moved to ``device`` when given. A tqdm bar is shown when ``progress`` and tqdm is
    installed.
    """
    collate = default_collate if collate_fn is None else collate_fn
    starts = range(0, len(indices), batch_size)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(indices), desc=desc, leave=False)
        except ImportError:  # tqdm is optional
            bar = None
    try:
        for start in starts:
            positions = list(indices[start : start + batch_size])
            batch = collate([dataset[i] for i in positions])
            if device is not None:
                batch = _to_device(batch, device)
            yield positions, batch
            if bar is not None:
                bar.update(len(positions))
    finally:
        if bar is not None:
            bar.close()


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class LayerRows:
    """One layer's captured rows for one backward pass.

    Attributes:
        layer: the captured layer (kind, groups, sizes).
        stats: its :class:`~secondorder.precond.capture.LayerStats`: inputs ``(N, T, d_in')``
            (``(N, T, groups, d_in')`` for grouped conv; long indices ``(N, T)`` for an
            embedding, ``-1`` = no token) and output gradients of the per-example losses;
            masked positions are zeroed (embedding: index ``-1``) and not counted.
    """

    layer: CapturedLayer
    stats: LayerStats

    @property
    def num_examples(self) -> int:
        return self.stats.num_examples

    def grouped(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(a (N, T, groups, d_in'), g (N, T, groups, d_out))``; embedding ``a`` is one-hot."""
        g = self.stats.output_grads
        dtype = dtype or g.dtype
        a = self.stats.inputs
        if self.layer.kind == "embedding":
            valid = (a >= 0).unsqueeze(-1)
            a = (
                torch.nn.functional.one_hot(a.clamp(min=0), self.layer.in_features).to(dtype)
                * valid
            )
        a, g = a.to(dtype), g.to(dtype)
        if a.dim() == 3:
            a = a.unsqueeze(2)
        if g.dim() == 3:
            g = g.unsqueeze(2)
        return a, g


class LayerRecorder:
    """Capture tracked layers of ``model`` for the losses of ``task`` (module docstring).

    Args:
        model: the model (not modified: hooks are removed by :meth:`close`, and tracked
            parameters that do not require grad are switched on only until then).
        task: the :class:`InfluenceTask`; its :meth:`tracked_modules` picks the layers.

    Attributes:
        names: tracked module names, in ``model.named_modules()`` order.
    """

    def __init__(self, model: nn.Module, task: InfluenceTask) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(task, InfluenceTask):
            raise TypeError(f"Invalid task: expected an InfluenceTask, got {type(task).__name__}")
        self.model, self.task = model, task
        modules = dict(model.named_modules())
        wanted = task.tracked_modules()
        if wanted is None:
            chosen = [m for m in modules.values() if module_kind(m) in SUPPORTED_KINDS]
        else:
            chosen = []
            for name in wanted:
                if name not in modules:
                    raise ValueError(
                        f"Invalid tracked module: {name!r} is not a module of the model"
                    )
                if module_kind(modules[name]) not in SUPPORTED_KINDS:
                    raise ValueError(
                        f"Invalid tracked module: {name!r} is a {type(modules[name]).__name__}; "
                        f"supported kinds: {SUPPORTED_KINDS}"
                    )
                chosen.append(modules[name])
        params = []
        self._frozen: list[Tensor] = []  # switched on for the backward passes, restored by close
        for module in chosen:
            for parameter in module_parameters(module):
                if isinstance(parameter, Tensor):
                    if not parameter.requires_grad:
                        self._frozen.append(parameter)
                    params.append(parameter)
        if not params:
            raise ValueError(
                f"Invalid task: no supported module (kinds {SUPPORTED_KINDS}) is tracked"
            )
        self._params = params
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        self.capture = LayerCapture(model, params, loss_reduction="sum", kinds=SUPPORTED_KINDS)
        self.capture.enabled = False
        self.layers = list(self.capture.layers)
        self.names = [layer.name for layer in self.layers]

    def close(self) -> None:
        """Remove the hooks and re-freeze parameters that did not require grad."""
        self.capture.remove()
        for parameter in self._frozen:
            parameter.requires_grad_(False)
        self._frozen = []

    def __enter__(self) -> LayerRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ passes
    def _backward(self, loss: Tensor) -> None:
        if loss.dim() != 0:
            raise ValueError(
                f"Invalid task: the loss must be a scalar, got shape {tuple(loss.shape)}"
            )
        torch.autograd.grad(loss, self._params, allow_unused=True)

    def _rows(
        self, stats: dict[CapturedLayer, LayerStats], mask: Tensor | None
    ) -> dict[str, LayerRows]:
        result = {}
        for layer in self.layers:
            if layer not in stats:
                raise ValueError(
                    f"Invalid task: tracked module {layer.name!r} got no gradient from the loss"
                )
            item = stats[layer]
            inputs, grads = item.inputs, item.output_grads
            repeats = _mask_repeats(mask, inputs)
            if repeats:  # a layer applied k times (tied or shared weight): k blocks of T rows
                keep = mask.to(device=inputs.device, dtype=torch.bool).repeat(1, repeats)
                if layer.kind == "embedding":
                    inputs = torch.where(keep, inputs, torch.full_like(inputs, -1))
                else:
                    inputs = inputs * keep.reshape(keep.shape + (1,) * (inputs.dim() - 2)).to(
                        inputs.dtype
                    )
                grads = grads * keep.reshape(keep.shape + (1,) * (grads.dim() - 2)).to(grads.dtype)
                item = LayerStats(inputs, grads, item.num_examples, int(keep.sum()))
            result[layer.name] = LayerRows(layer, item)
        counts = {name: rows.num_examples for name, rows in result.items()}
        if len(set(counts.values())) > 1:
            majority = max(set(counts.values()), key=list(counts.values()).count)
            odd = [name for name, count in counts.items() if count != majority]
            raise ValueError(
                f"Invalid tracked module: {odd} saw {[counts[n] for n in odd]} examples where "
                f"the others saw {majority} (an input without a batch dimension, e.g. a "
                f"position embedding called on arange(T)); per-example gradients need one row "
                f"per example: leave it out of tracked_modules"
            )
        return result

    def train_passes(
        self, batch: Any, fisher: str = "empirical", generator: torch.Generator | None = None
    ) -> list[dict[str, LayerRows]]:
        """Rows of the training loss of ``batch``: one pass, or ``C`` passes for ``"exact"``."""
        mask = self.task.token_mask(batch)
        passes = []
        with self.capture.recording(True):
            if fisher == "exact":
                with torch.no_grad():  # not recorded: the capture ignores no-grad forwards
                    logits = self.task.compute_train_logits(batch, self.model)
                if logits.dim() != 2:
                    raise ValueError(
                        f"Invalid fisher: 'exact' needs (batch, classes) logits, "
                        f"got shape {tuple(logits.shape)}"
                    )
                weights = torch.softmax(logits, dim=-1).sqrt()
                for label in range(logits.shape[1]):
                    logits = self.task.compute_train_logits(batch, self.model)
                    log_probs = torch.log_softmax(logits, dim=-1)
                    self._backward(-(weights[:, label] * log_probs[:, label]).sum())
                    passes.append(self._rows(self.capture.pop(), mask))
            else:
                loss = self.task.compute_train_loss(
                    batch, self.model, sample=fisher == "sampled", generator=generator
                )
                self._backward(loss)
                passes.append(self._rows(self.capture.pop(), mask))
        return passes

    def measurement_pass(self, batch: Any) -> dict[str, LayerRows]:
        """Rows of the task's measurement of ``batch`` (per-query gradients)."""
        with self.capture.recording(True):
            self._backward(self.task.compute_measurement(batch, self.model))
            return self._rows(self.capture.pop(), self.task.token_mask(batch))

    def loss_pass(self, batch: Any) -> dict[str, LayerRows]:
        """Rows of the (empirical) training loss of ``batch`` (per-example training gradients)."""
        return self.train_passes(batch, "empirical")[0]


def _mask_repeats(mask: Tensor | None, inputs: Tensor) -> int:
    """How many ``(N, T)`` blocks of ``mask`` cover the rows ``inputs (N, k·T, …)`` (0: none).

    A weight applied ``k`` times per pass (a module called twice, an embedding tied to the
    head) has its calls concatenated along positions, ``T`` rows each.
    """
    if mask is None or mask.dim() != 2 or mask.shape[0] != inputs.shape[0]:
        return 0
    length = mask.shape[1]
    if length == 0 or inputs.shape[1] % length:
        return 0
    return inputs.shape[1] // length
