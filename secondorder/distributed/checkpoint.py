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

Faults: a save is committed atomically (a hidden partial directory, a completion marker listing
every file with its size, a rename; :mod:`~secondorder.distributed.checkpoint_files`), so a
killed rank leaves the previous checkpoint or the new one, never a mix; :func:`load_checkpoint`
reads only complete checkpoints (given a folder, the newest). ``extra`` takes DCP ``Stateful``
objects besides tensors; :class:`RNGStates` saves each rank's random streams under its own key.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from secondorder.distributed import checkpoint_files
from secondorder.distributed.checkpoint_files import CheckpointError, latest_checkpoint
from secondorder.distributed.sharding import check_shard_layout, is_sharded

__all__ = [
    "CheckpointError",
    "RNGStates",
    "checkpoint_bytes",
    "check_checkpoint_dir",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, torch.Tensor | Stateful] | None = None,
    *,
    step: int | None = None,
    keep_last: int | None = None,
) -> str:
    """Save model and optimizer state with DCP, atomically (collective: every rank calls it).

    The ranks write into a hidden sibling directory; once all are done, rank 0 writes the
    completion marker and renames it into place (:mod:`~secondorder.distributed.checkpoint_files`).
    A rank killed at any moment leaves the previous checkpoint or the new one, complete.

    Args:
        checkpoint_dir: the checkpoint's directory, e.g. ``ckpt/step_50`` (one ``.distcp`` file
            per rank); an existing checkpoint there is replaced only once the new one is complete.
        model: the model (plain, DDP-wrapped or ``torch.compile``-d; keys are FQNs).
        optimizer: any optimizer of the suite (or torch.optim).
        extra: further state by name: tensors (replicated: the same value on every rank, e.g.
            ``{"step": torch.tensor(step)}``) or objects with ``state_dict`` /
            ``load_state_dict`` (DCP's ``Stateful``: an LR scheduler, a data position, the
            per-rank :class:`RNGStates`).
        step: the training step saved, which orders checkpoints for :func:`latest_checkpoint`
            (default: ``extra["step"]`` when present).
        keep_last: keep only this many newest complete checkpoints in ``checkpoint_dir``'s
            parent (and remove interrupted saves' debris there); ``None`` keeps all.

    Returns:
        The checkpoint's absolute path.

    Raises:
        CheckpointError: naming the cause (no space left, read-only, ...) when a write fails,
            on every rank.
    """
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"Invalid keep_last: {keep_last!r} (expected an integer >= 1 or None)")
    final = os.path.abspath(os.fspath(checkpoint_dir))
    if step is None and extra is not None and isinstance(extra.get("step"), (int, torch.Tensor)):
        step = int(extra["step"])
    with _uniform_template_step(optimizer):
        model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    if extra:
        state["extra"] = {key: _state_of(value) for key, value in extra.items()}
    _on_rank0(lambda: checkpoint_files.prepare(final), final, "prepare")
    try:
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=checkpoint_files.partial_path(final))
    except BaseException as error:  # DCP's CheckpointException derives from BaseException
        if isinstance(error, KeyboardInterrupt):
            raise
        cause = checkpoint_files.describe(error, os.path.dirname(final))
        raise CheckpointError(f"save_checkpoint could not write {final!r}: {cause}") from error
    _barrier()  # every rank's files are written before rank 0 marks them complete
    world_size = dist.get_world_size() if _distributed() else 1

    def commit() -> None:
        checkpoint_files.commit(final, step, world_size)
        if keep_last is not None:
            checkpoint_files.prune_checkpoints(os.path.dirname(final), keep_last)

    _on_rank0(commit, final, "commit")
    return final


def load_checkpoint(
    checkpoint_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, torch.Tensor | Stateful] | None = None,
) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote, at any world size (collective).

    Call it on a freshly built model and optimizer (before any ``step``): the optimizer's
    state template is allocated for this rank's blocks by one zero-gradient, ``lr = 0``
    step (parameters unchanged; existing gradients are cleared first), then filled from the
    checkpoint.

    Args:
        checkpoint_dir: a checkpoint :func:`save_checkpoint` wrote, or a folder of them (then
            the newest complete one, :func:`latest_checkpoint`). A directory whose save was
            interrupted (no completion marker, or a file missing or truncated) is refused.
        model: the model to load into (same architecture).
        optimizer: the optimizer to load into (same class and param_groups layout).
        extra: templates of the extra tensors to read (shapes and dtypes as saved), and the
            ``Stateful`` objects to restore in place (their ``load_state_dict`` is called).

    Returns:
        The loaded extra entries by name: tensors, and for ``Stateful`` objects the
        restored object itself (empty dict when ``extra`` is None).

    Raises:
        CheckpointError: ``checkpoint_dir`` holds no complete checkpoint.
    """
    path = _complete_checkpoint(os.fspath(checkpoint_dir))
    if not any(_has_tensor(entry) for entry in optimizer.state.values()):
        # DCP allocates the state template (one zero-gradient step) only when the state is
        # empty and no gradient exists; empty per-parameter dicts (left by a lookup in the
        # defaultdict ``optimizer.state``) would stop it.
        optimizer.state.clear()
        optimizer.zero_grad(set_to_none=True)
    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    if extra:
        state["extra"] = {
            key: _prune(value.state_dict(), f"extra.{key}", set(saved), prefixes=True)
            if isinstance(value, Stateful) and not isinstance(value, torch.Tensor)
            else value.clone()
            for key, value in extra.items()
        }
    check_shard_layout(saved, _paths(state["optim"]["state"], "optim.state"), _whole_parameters(optimizer))
    state["optim"]["state"] = _prune(state["optim"]["state"], "optim.state", set(saved))
    for fqn, entry in state["optim"]["state"].items():
        _extend(entry, f"optim.state.{fqn}", saved)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    # strict=False: parameters without saved state (dead layers) are allowed.
    with _uniform_template_step(optimizer):
        set_optimizer_state_dict(
            model, optimizer, state["optim"], options=StateDictOptions(strict=False)
        )
    loaded: dict[str, Any] = {}
    for key, value in (extra or {}).items():
        if isinstance(value, Stateful) and not isinstance(value, torch.Tensor):
            value.load_state_dict(state["extra"][key])
            loaded[key] = value
        else:
            loaded[key] = state["extra"][key]
    return loaded


def check_checkpoint_dir(root: str | os.PathLike, required_bytes: int = 0) -> None:
    """Before training: ``root`` is a writable directory with ``required_bytes`` free (collective
    when distributed: rank 0 checks, every rank raises the same :class:`CheckpointError`)."""
    root = os.path.abspath(os.fspath(root))
    _on_rank0(lambda: checkpoint_files.check_writable(root, required_bytes), root, "check")


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes one checkpoint takes: the model's tensors once, plus every rank's optimizer state
    (collective when distributed: an all-reduce of the per-rank state sizes)."""
    module = model.module if hasattr(model, "module") else model
    total = sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    owned = 0 if optimizer is None else _tensor_bytes(optimizer.state)
    if _distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        count = torch.tensor([owned], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        owned = int(count.item())
    return int(total + owned)


class RNGStates:
    """``Stateful`` random-number states of this rank: torch (CPU, and CUDA when available) and
    Python's ``random``. Saved per rank (``rank_<r>``); a rank the checkpoint has no entry for
    (loaded at another world size) keeps its states and warns."""

    def state_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            entry["cuda"] = torch.cuda.get_rng_state()
        return {f"rank_{_rank()}": entry}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        entry = state.get(f"rank_{_rank()}")
        if entry is None:
            warnings.warn(f"RNGStates: the checkpoint holds no random states for rank {_rank()}; kept", stacklevel=2)
            return
        torch.set_rng_state(entry["torch"])
        random.setstate(_as_python_state(entry["python"]))
        if "cuda" in entry and torch.cuda.is_available():
            torch.cuda.set_rng_state(entry["cuda"])


def _as_python_state(value: Any) -> tuple:
    """``random.setstate`` wants nested tuples; a round trip may return lists."""
    return tuple(_as_python_state(v) for v in value) if isinstance(value, (list, tuple)) else value


def _state_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Stateful):
        return value.state_dict()
    raise TypeError(
        f"Invalid extra: expected tensors or objects with state_dict/load_state_dict, "
        f"got {type(value).__name__}"
    )


def _complete_checkpoint(path: str) -> str:
    """``path`` if it is a complete checkpoint, else the newest complete one inside it."""
    if checkpoint_files.read_marker(path) is not None:
        return path
    newest = latest_checkpoint(path)
    if newest is not None:
        return newest
    raise CheckpointError(
        f"Invalid checkpoint_dir: {path!r} holds no complete checkpoint (no {checkpoint_files.MARKER} "
        "with every listed file intact: its save was interrupted, or it is not a checkpoint)"
    )


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every save/load without a process group; one process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed() and dist.get_world_size() > 1:
        dist.barrier()


def _on_rank0(action, path: str, what: str) -> None:
    """Run ``action`` on rank 0 and raise its failure, as a :class:`CheckpointError`, on every rank."""
    message = None
    if _rank() == 0:
        try:
            action()
        except CheckpointError as error:
            message = str(error)
        except OSError as error:
            message = f"could not {what} checkpoint {path!r}: {checkpoint_files.describe(error, os.path.dirname(path))}"
    if _distributed() and dist.get_world_size() > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise CheckpointError(message)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


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


def _prune(
    tree: dict[str, Any], prefix: str, saved_keys: set[str], prefixes: bool = False
) -> dict[str, Any]:
    """Drop template entries the checkpoint lacks (recursively; emptied dicts go too).

    DCP's template step gives *every* parameter a zero gradient, so parameters that never
    had a gradient in the saved run (dead layers) get state the checkpoint does not hold;
    they must come back without state, as they were.

    With ``prefixes`` (non-tensor extra state, which DCP may flatten further), a leaf is kept
    when any saved key starts with its path.
    """
    kept: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict):
            value = _prune(value, path, saved_keys, prefixes)
            if value:
                kept[key] = value
        elif path in saved_keys or (prefixes and any(k.startswith(path) for k in saved_keys)):
            kept[key] = value
    return kept


def _whole_parameters(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` preconditions whole parameters (all but Shampoo's local-shard mode
    on FSDP2 parameters)."""
    if getattr(optimizer, "fsdp_mode", None) != "local_shard":
        return True
    return not any(is_sharded(p) for group in optimizer.param_groups for p in group["params"])
