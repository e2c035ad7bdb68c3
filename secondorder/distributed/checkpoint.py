"""Checkpoint glue: ``torch.distributed.checkpoint`` (DCP) save and load of model + optimizer.

How owned state survives DCP (and why it reshards). Under an
:class:`~secondorder.distributed.distributor.AllGatherDistributor` every preconditioner block
is owned by exactly one rank and its state lives under a *block-unique* key of the
parameter's entry (``state[fqn]["block_3"]``: Shampoo; a layer's entry for capture-based
optimizers), present on the owner only. DCP's planner merges the per-rank save plans, so
the checkpoint holds every block once, written by its owner. Keys replicated on every rank
(``step`` counters, hyperparameters) carry identical values and are deduplicated. (DCP
assumes that a plain tensor saved under one key by several ranks is replicated,
pytorch/pytorch#120356: that is why owned state never shares a key across ranks.)

Why block-unique plain keys and not DTensor state (DESIGN.md asked for DTensor): a DTensor
``Shard(0)`` over a block axis needs ``torch.chunk``-shaped shares (DCP computes every chunk's
offset that way), which a cost-balanced assignment does not produce; a ``Replicate`` DTensor
on a one-rank mesh per owner saves exactly what a unique key saves, at the price of one
process group per rank and a ``state_dict()`` that cannot be read without a process group.
distributed_shampoo's own state dict uses plain per-block keys too (``block_3``;
``rank_3-block_0`` for FSDP).

Loading at any world size works because DCP loads *into* a template: a fresh optimizer is
stepped once with zero gradients at ``lr = 0`` by ``get_optimizer_state_dict`` (DCP's
``_init_optim_state``), which allocates exactly the blocks this rank owns under the *new*
assignment; DCP then fills them from whichever rank wrote them. So a checkpoint written at
2 ranks loads at 1 rank (one process, no process group needed) and back at 2, continuing
the same trajectory (``tests/distributed/test_checkpoint.py``).

Shampoo on FSDP2 parameters keeps per-*shard* block state (keys naming the shard's offset and
shape, :mod:`~secondorder.distributed.sharding`): it resumes at the same shard boundaries,
and :func:`load_checkpoint` raises a ``ValueError`` where they differ instead of silently
restarting those preconditioners.

State an optimizer creates lazily (after statistics arrive) is added to the template inside
the dicts this rank owns (:func:`_extend`). Parameters that never had a gradient in the saved
run come back without state (DCP's template
step gives every parameter a zero gradient; :func:`load_checkpoint` drops what the checkpoint
lacks). Every rank must call :func:`save_checkpoint` / :func:`load_checkpoint` (they are collective,
and the template step runs the distributor's all-gather).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from secondorder.distributed.sharding import check_shard_layout

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save model and optimizer state with DCP (collective: every rank calls it).

    Args:
        checkpoint_dir: a directory (created by DCP); one ``.distcp`` file per rank.
        model: the model (plain, DDP-wrapped or ``torch.compile``-d; keys are FQNs).
        optimizer: any optimizer of the suite (or torch.optim).
        extra: further tensors to save, e.g. ``{"step": torch.tensor(step)}`` (replicated:
            the same value on every rank).
    """
    with _uniform_template_step(optimizer):
        model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    if extra:
        state["extra"] = dict(extra)
    dcp.save(state, checkpoint_id=os.fspath(checkpoint_dir))


def load_checkpoint(
    checkpoint_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Load what :func:`save_checkpoint` wrote, at any world size (collective).

    Call it on a freshly built model and optimizer (before any ``step``): the optimizer's
    state template is allocated for this rank's blocks by one zero-gradient, ``lr = 0``
    step (parameters unchanged; existing gradients are cleared first), then filled from the
    checkpoint.

    Args:
        checkpoint_dir: the directory :func:`save_checkpoint` wrote.
        model: the model to load into (same architecture).
        optimizer: the optimizer to load into (same class and param_groups layout).
        extra: templates of the extra tensors to read (shapes and dtypes as saved).

    Returns:
        The loaded extra tensors (empty dict when ``extra`` is None).
    """
    if not any(_has_tensor(entry) for entry in optimizer.state.values()):
        # DCP allocates the state template (one zero-gradient step) only when the state is
        # empty and no gradient exists; empty per-parameter dicts (left by a lookup in the
        # defaultdict ``optimizer.state``) would stop it.
        optimizer.state.clear()
        optimizer.zero_grad(set_to_none=True)
    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    if extra:
        state["extra"] = {key: value.clone() for key, value in extra.items()}
    saved = dcp.FileSystemReader(os.fspath(checkpoint_dir)).read_metadata().state_dict_metadata
    check_shard_layout(saved, _paths(state["optim"]["state"], "optim.state"))
    state["optim"]["state"] = _prune(state["optim"]["state"], "optim.state", set(saved))
    for fqn, entry in state["optim"]["state"].items():
        _extend(entry, f"optim.state.{fqn}", saved)
    dcp.load(state, checkpoint_id=os.fspath(checkpoint_dir))
    set_model_state_dict(model, state["model"])
    # strict=False: parameters without saved state (dead layers) are allowed.
    with _uniform_template_step(optimizer):
        set_optimizer_state_dict(
            model, optimizer, state["optim"], options=StateDictOptions(strict=False)
        )
    return state.get("extra", {})


@contextlib.contextmanager
def _uniform_template_step(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Let DCP's template step run on every rank or on none.

    ``get_/set_optimizer_state_dict`` step an optimizer whose state is empty and that has no
    gradients (``_init_optim_state``). A rank that owns no block holds no state, so after
    training it would step alone while its peers skip, and the step's collectives would hang.
    When some rank would skip, the others get an empty placeholder entry (which makes DCP
    skip too; they own nothing, so the step would have created nothing) that is removed
    afterwards.
    """
    distributor = getattr(optimizer, "distributor", None)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if distributor is None or distributor.world_size == 1 or not params:
        yield
        return
    would_step = not optimizer.state and all(p.grad is None for p in params)
    some_rank_skips = distributor.any(not would_step)  # collective: every rank calls it once
    placeholder = would_step and some_rank_skips
    if placeholder:
        optimizer.state[params[0]] = {}
    try:
        yield
    finally:
        if placeholder and not optimizer.state.get(params[0]):
            optimizer.state.pop(params[0], None)


def _paths(tree: dict[str, Any], prefix: str) -> list[str]:
    """DCP's dotted path of every leaf of a nested state dict."""
    paths = []
    for key, value in tree.items():
        path = f"{prefix}.{key}"
        paths.extend(_paths(value, path) if isinstance(value, dict) else [path])
    return paths


def _has_tensor(value: Any) -> bool:
    """Whether ``value`` (a state entry, possibly nested) holds any tensor."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(item) for item in value)
    return False


def _extend(node: dict[str, Any], prefix: str, saved: dict[str, Any]) -> None:
    """Add the checkpoint's tensors missing from an *existing* state dict of the template.

    Optimizers create some state lazily (EK-FAC's factors appear with the first captured
    statistics, which DCP's zero-gradient template step never provides). Inside a dict the
    template already holds for this rank (a parameter it owns, a block it owns), every direct
    tensor entry of the checkpoint is added with its saved shape and dtype, so DCP loads it.
    Dicts the template lacks (blocks another rank owns now) are never created.
    """
    for key, value in node.items():
        if isinstance(value, dict):
            _extend(value, f"{prefix}.{key}", saved)
    start = prefix + "."
    for path, meta in saved.items():
        name = path[len(start) :] if path.startswith(start) else ""
        if (
            name
            and "." not in name
            and name not in node
            and isinstance(meta, TensorStorageMetadata)
        ):
            node[name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)


def _prune(tree: dict[str, Any], prefix: str, saved_keys: set[str]) -> dict[str, Any]:
    """Drop template entries the checkpoint lacks (recursively; emptied dicts go too).

    DCP's template step gives *every* parameter a zero gradient, so parameters that never
    had a gradient in the saved run (dead layers) get state the checkpoint does not hold;
    they must come back without state, as they were.
    """
    kept: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict):
            value = _prune(value, path, saved_keys)
            if value:
                kept[key] = value
        elif path in saved_keys:
            kept[key] = value
    return kept
