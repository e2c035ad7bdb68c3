"""Full view of sharded (FSDP2 ``fully_shard``, DTensor) parameters during a layer optimizer's step.

A Kronecker layer preconditioner needs the whole layer gradient: its output-side factor mixes
the rows that FSDP2 shards (``Shard(0)``), so no rank can precondition its own shard alone.
:func:`full_view` therefore lets the step body see plain, full-size tensors:

1. every DTensor parameter of the param groups is all-gathered (``full_tensor()``), and so is
   its gradient (FSDP2 has already reduce-scattered it, so it is the global batch's gradient,
   identical on every rank after the gather);
2. the full tensor stands in for the DTensor everywhere the optimizer looks (``param_groups``
   entries, ``optimizer.state`` keys, and whatever the caller's ``swap`` covers: the capture's
   layer references, ownership caches) until the body ends;
3. the body runs unchanged (under :class:`~secondorder.distributed.ownership.LayerOwnership`
   every rank ends with the owners' new full values);
4. every reference is restored (also when the body raises), and on success each rank copies
   its own slice of each full tensor into ``param.to_local()``.

State the body creates for such parameters is therefore plain and full-size, keyed (after the
step) by the DTensor parameter: with layer ownership it exists on the owner only, exactly as
under DDP, so DCP checkpoints and reshards it the same way. Memory: one full copy of each
DTensor parameter and of its gradient for the duration of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from secondorder.distributed.collectives import all_gather_flat
from secondorder.distributed.distributor import AllGatherDistributor, Distributor

__all__ = ["full_view", "dtensor_params", "mesh_distributor", "owner_view", "row_layout", "swap_optimizer"]

Swap = Callable[[Mapping[int, Tensor]], None]
"""Replaces, wherever it keeps them, each tensor ``t`` with ``id(t)`` in the mapping by its value."""


def dtensor_params(optimizer: torch.optim.Optimizer) -> list[DTensor]:
    """The DTensor parameters of ``optimizer``'s param groups (first occurrence order)."""
    seen: set[int] = set()
    result = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if isinstance(param, DTensor) and id(param) not in seen:
                seen.add(id(param))
                result.append(param)
    return result


def mesh_distributor(distributor: Distributor, params: list[DTensor]) -> Distributor:
    """The distributor for whole-parameter work on ``params`` (DTensors, e.g. FSDP2's).

    ``distributor`` itself when it spans several ranks or when no parameter is spread over
    several ranks; otherwise an :class:`AllGatherDistributor` over the process group of the
    parameters' common 1-D mesh (FSDP2's ``fully_shard`` mesh), so that every rank owns a
    cost-balanced share of the blocks without the user naming a process group.

    Raises:
        ValueError: the parameters live on several meshes or on a mesh of more than one
            dimension (HSDP): which ranks share the work is then the caller's choice.
    """
    meshes = {param.device_mesh for param in params}
    if distributor.world_size > 1 or max(mesh.size() for mesh in meshes) == 1:
        return distributor
    mesh = next(iter(meshes))
    if len(meshes) > 1 or mesh.ndim != 1:
        raise ValueError(
            "Invalid distributor: the DTensor parameters live on several meshes or on a "
            "multi-dimensional mesh; pass distributor=True (or the ProcessGroup whose ranks "
            "share the preconditioner work)"
        )
    return AllGatherDistributor(process_group=mesh.get_group())


@contextlib.contextmanager
def full_view(
    optimizer: torch.optim.Optimizer, distributor: Distributor, swap: Swap | None = None
) -> Iterator[dict[int, Tensor]]:
    """Run a step body on full plain tensors in place of DTensor parameters (module docstring).

    Collective when the param groups hold DTensor parameters (every rank must enter it in the
    same step); a no-op otherwise.

    Args:
        optimizer: the optimizer whose ``param_groups`` and ``state`` are swapped.
        distributor: the optimizer's distributor; a single-process one cannot serve parameters
            sharded over several ranks (each rank would precondition with its own statistics).
        swap: further references to swap (called with ``{id(DTensor): full}`` on entry and
            with the reverse mapping on exit).

    Yields:
        ``{id(DTensor parameter): its full plain tensor}`` (empty without DTensor parameters).

    Raises:
        ValueError: DTensor parameters sharded over more than one rank with a single-process
            ``distributor``.
    """
    params = dtensor_params(optimizer)
    if not params:
        yield {}
        return
    spread = max(param.device_mesh.size() for param in params)
    if distributor.world_size == 1 and spread > 1:
        raise ValueError(
            f"Invalid distributor: the parameters are DTensors sharded over {spread} ranks "
            "(FSDP2 fully_shard), but the optimizer was built with a single-process "
            "distributor; pass distributor=True (or the ProcessGroup) so that every layer's "
            "statistics reach the rank that preconditions it"
        )
    with torch.no_grad():
        fulls = _gather(params)
    forward = {id(param): full for param, full in zip(params, fulls, strict=True)}
    backward = {id(full): param for param, full in zip(params, fulls, strict=True)}
    swaps: list[Swap] = [lambda mapping: swap_optimizer(optimizer, mapping)]
    if swap is not None:
        swaps.append(swap)
    done: list[Swap] = []
    try:
        for function in swaps:
            function(forward)
            done.append(function)
        yield forward
    finally:
        for function in reversed(done):
            function(backward)
    for param, full in zip(params, fulls, strict=True):
        _scatter(param, full)


def row_layout(params: list[DTensor], distributor: Distributor) -> dict[int, list[int]] | None:
    """Rows of each parameter per rank, for :func:`owner_view`.

    Returns ``{id(param): [rows on rank 0, rows on rank 1, ...]}`` when every parameter is
    ``Shard(0)`` on a 1-D mesh whose ranks are the distributor's (FSDP2's ``fully_shard``
    layout, ``torch.chunk`` split) and every gradient is too; ``None`` otherwise (a single-process
    distributor included), where :func:`full_view` serves.
    """
    world, rank = distributor.world_size, distributor.rank
    if world == 1:
        return None
    rows: dict[int, list[int]] = {}
    for param in params:
        mesh, grad = param.device_mesh, param.grad
        if (param.dim() == 0 or mesh.ndim != 1 or mesh.size() != world or mesh.get_local_rank() != rank
                or tuple(param.placements) != (Shard(0),)
                or (grad is not None and (not isinstance(grad, DTensor) or tuple(grad.placements) != (Shard(0),)))):
            return None
        chunk = -(-param.shape[0] // world)
        counts = [max(0, min(chunk, param.shape[0] - r * chunk)) for r in range(world)]
        if counts[rank] != param.to_local().shape[0]:
            return None
        rows[id(param)] = counts
    return rows


@contextlib.contextmanager
def owner_view(
    optimizer: torch.optim.Optimizer,
    distributor: Distributor,
    params: list[DTensor],
    owners: list[int],
    rows: dict[int, list[int]],
    swap: Swap | None = None,
    hide_others: bool = False,
) -> Iterator[dict[int, Tensor]]:
    """Run a step body where each DTensor parameter is whole on its owner only (collective).

    The owner of each parameter receives every rank's rows of it and of its (reduce-scattered)
    gradient, concatenated (one ``all_to_all`` per dtype,
    :meth:`~secondorder.distributed.distributor.Distributor.gather_to_owners`); that plain full
    tensor stands in for the DTensor on the owner (``param_groups``, ``optimizer.state`` keys,
    ``swap``). Other ranks keep the DTensor: the body must leave parameters it does not own
    alone (e.g. their gradients hidden). On success a second ``all_to_all`` sends every rank its
    rows of the owners' new values, copied into ``param.to_local()``; references are restored
    in any case (when the body raises, nothing is written back).

    Per step a rank receives the parameters and gradients it owns (about ``2/W`` of the model
    for a balanced assignment) and its own rows of every parameter (``1/W``), and holds full
    copies of its own parameters only; :func:`full_view` moves the whole model three times and
    holds all of it on every rank.

    Args:
        optimizer: the optimizer whose ``param_groups`` and ``state`` are swapped.
        distributor: a multi-rank distributor over the parameters' mesh.
        params: the DTensor parameters (same list on every rank).
        owners: the owner rank of each.
        rows: :func:`row_layout`'s rows per rank of each.
        swap: further references to swap (as for :func:`full_view`).
        hide_others: set the gradients of the parameters other ranks own to ``None`` for the
            body (given back afterwards), so that an optimizer skips them.

    Yields:
        ``{id(DTensor parameter): its full plain tensor}`` for the parameters this rank owns.
    """
    grads = [p.grad for p in params]
    with torch.no_grad():
        tensors = [p.to_local().detach() for p in params] + [g.to_local() for g in grads if g is not None]
        tensor_owners = list(owners) + [o for o, g in zip(owners, grads, strict=True) if g is not None]
        gathered = distributor.gather_to_owners(tensors, tensor_owners)
    gathered_grads = iter(gathered[len(params):])
    forward: dict[int, Tensor] = {}
    for param, full, grad in zip(params, gathered[: len(params)], grads, strict=True):
        full_grad = next(gathered_grads) if grad is not None else None
        if full is None:
            continue
        full = full.view(param.shape)
        full.requires_grad_(param.requires_grad)
        if full_grad is not None:
            full.grad = full_grad.view(param.shape)
        forward[id(param)] = full
    backward = {id(forward[id(p)]): p for p in params if id(p) in forward}
    swaps: list[Swap] = [lambda mapping: swap_optimizer(optimizer, mapping)]
    if swap is not None:
        swaps.append(swap)
    done: list[Swap] = []
    hidden = [(p, g) for p, g in zip(params, grads, strict=True) if hide_others and id(p) not in forward]
    try:
        for param, _ in hidden:
            param.grad = None
        for function in swaps:
            function(forward)
            done.append(function)
        yield forward
        news = [forward.get(id(p)) for p in params]
        with torch.no_grad():
            pieces = distributor.scatter_rows_from_owners(
                [None if value is None else value.detach() for value in news], owners,
                [rows[id(p)] for p in params], [p.to_local() for p in params])
            for param, piece in zip(params, pieces, strict=True):
                param.to_local().copy_(piece)
    finally:
        for function in reversed(done):
            function(backward)
        for param, grad in hidden:
            param.grad = grad


def _gather(params: list[DTensor]) -> list[Tensor]:
    """Full plain leaf copies of ``params``, each with its full gradient (if any) in ``.grad``."""
    grads = [p.grad for p in params]
    sharded = list(params) + [g for g in grads if isinstance(g, DTensor)]
    gathered = iter(_full_tensors(sharded))
    fulls = [next(gathered) for _ in params]
    for param, full, grad in zip(params, fulls, grads, strict=True):
        full.requires_grad_(param.requires_grad)
        if grad is not None:
            full.grad = next(gathered) if isinstance(grad, DTensor) else grad
    return fulls


def _full_tensors(tensors: list[DTensor]) -> list[Tensor]:
    """``t.full_tensor()`` for each (new storage), batched: one all-gather per (mesh, dtype).

    ``full_tensor()`` costs one collective per tensor (~1.5 ms each on gloo: 0.3 s per step
    for 50 layers), so DTensors on a 1-D mesh with a single ``Shard(d)`` placement (FSDP2's
    layout) are padded to the ``⌈n/W⌉`` rows of a ``torch.chunk`` shard, concatenated and
    gathered together; other layouts fall back to ``full_tensor()``.
    """
    result: list[Tensor | None] = [None] * len(tensors)
    batches: dict[tuple[Any, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.device_mesh.ndim == 1 and type(tensor.placements[0]) is Shard:
            batches.setdefault((tensor.device_mesh, tensor.dtype), []).append(index)
        else:
            full = tensor.full_tensor()
            # A view (of the local tensor itself, for replicated layouts) must not be updated in place.
            result[index] = full.clone() if full._is_view() or _shares_storage(full, tensor) else full
    for (mesh, _), indices in batches.items():
        world = mesh.size()
        padded = []
        for index in indices:
            local, dim = tensors[index].to_local(), tensors[index].placements[0].dim
            rows = -(-tensors[index].shape[dim] // world)
            missing = list(local.shape)
            missing[dim] = rows - local.shape[dim]
            padded.append(torch.cat([local, local.new_zeros(missing)], dim).reshape(-1))
        flat = all_gather_flat(torch.cat(padded), world, mesh.get_group()).view(world, -1)
        offset = 0
        for index, piece in zip(indices, padded, strict=True):
            tensor, dim = tensors[index], tensors[index].placements[0].dim
            shape = list(tensor.shape)
            shape[dim] = -(-shape[dim] // world)
            chunks = flat[:, offset : offset + piece.numel()].reshape(world, *shape).unbind(0)
            full = torch.cat(chunks, dim)
            if full.shape[dim] != tensor.shape[dim]:  # drop the padding rows of the last shards
                full = full.narrow(dim, 0, tensor.shape[dim]).clone(memory_format=torch.contiguous_format)
            result[index] = full
            offset += piece.numel()
    return result


def _shares_storage(full: Tensor, tensor: DTensor) -> bool:
    return full.untyped_storage().data_ptr() == tensor.to_local().untyped_storage().data_ptr()


def _scatter(param: DTensor, full: Tensor) -> None:
    """Copy this rank's slice of ``full`` (shape ``param.shape``) into ``param``'s local shard."""
    shape, offset = compute_local_shape_and_global_offset(
        full.shape, param.device_mesh, param.placements
    )
    index = tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))
    with torch.no_grad():
        param.to_local().copy_(full[index])


def swap_optimizer(optimizer: torch.optim.Optimizer, mapping: Mapping[int, Tensor]) -> None:
    """Swap ``param_groups`` entries (lists kept, edited in place) and ``state`` keys."""
    for group in optimizer.param_groups:
        group["params"][:] = [mapping.get(id(p), p) for p in group["params"]]
    state = optimizer.state
    for key in [key for key in state if id(key) in mapping]:
        state[mapping[id(key)]] = state.pop(key)
