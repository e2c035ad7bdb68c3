"""FSDP2 (``fully_shard``) parameters in :class:`~secondorder.optimizers.shampoo.Shampoo`.

FSDP2 parameters are DTensors, each rank holding a shard (a range of rows). Shampoo's
``fsdp_mode`` says what is preconditioned:

* ``"lossless"`` (default): whole parameters, so the same optimizer as in one process. Each
  FSDP2 parameter is owned by one rank (its blocks' summed costs and sizes balanced,
  :func:`parameter_owners`), which alone receives it whole with its gradient, preconditions it
  as single-process Shampoo does and sends every rank its rows of the new values
  (:func:`~secondorder.distributed.full_view.owner_view`; per step about ``3/W`` of the model
  moves to each rank, and full copies exist of owned parameters only). Equal to single-process
  / DDP Shampoo (float64: bitwise at 2 ranks, within 1e-12 at 4, tested); state is plain,
  full-size, on the owner, under DDP's keys (``"block_3"``), so DCP checkpoints reshard to any
  world size. Without a multi-rank ``distributor`` the FSDP2 mesh's group is used. Other
  layouts than ``Shard(0)`` on one 1-D mesh fall back to a full view (the whole model gathered
  on every rank).
* ``"local_shard"``: each rank preconditions its local shard, cut into blocks like any tensor of
  that shape, with no communication: Shampoo with every parameter also split at the shard
  boundaries (equal to single-process Shampoo whose ``max_preconditioner_dim`` cuts there,
  tested; like distributed_shampoo's default FSDP2 mode). State keys name the shard
  (``"shard@8,0:8x6_block_0"``), so checkpoints resume at the same shard boundaries only
  (others are refused with a clear error).

The functions here take the optimizer and use its ``param_groups``, ``distributor``,
``fsdp_mode`` and ``_block_costs(param, group)`` (a list of ``(cost, state size)`` per block);
they keep their caches on it (``_parameter_owner_cache``, ``_whole_on_owner``) and reset its
``_block_signature`` when the distributor changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from secondorder.distributed.full_view import dtensor_params, full_view, mesh_distributor, owner_view, row_layout
from secondorder.distributed.sharding import is_sharded, shard_key_prefix

__all__ = ["FSDP_MODES", "fsdp_step", "parameter_owners", "shard_prefixes"]

FSDP_MODES = ("lossless", "local_shard")


def fsdp_step(optimizer: torch.optim.Optimizer, blocks_step: Callable[[], None]) -> None:
    """Run ``blocks_step`` (the step over the param groups' blocks) for ``optimizer``'s mode.

    Without DTensor parameters, or in the ``"local_shard"`` mode, ``blocks_step`` runs as is.
    In the ``"lossless"`` mode it runs inside an owner view: each rank sees the parameters it
    owns whole (other ranks' parameters have their gradients hidden, so they are skipped, and
    are scattered by their owners afterwards); collective.
    """
    sharded = dtensor_params(optimizer) if getattr(optimizer, "fsdp_mode", "lossless") == "lossless" else []
    if not sharded:
        blocks_step()
        return
    distributor = mesh_distributor(optimizer.distributor, sharded)
    if distributor is not optimizer.distributor:
        optimizer.distributor, optimizer._block_signature = distributor, None
    rows = row_layout(sharded, optimizer.distributor)
    if rows is None:  # not FSDP2's layout: every rank sees every parameter whole
        with full_view(optimizer, optimizer.distributor):
            blocks_step()
        return
    with owner_view(optimizer, optimizer.distributor, sharded, parameter_owners(optimizer, sharded), rows,
                    hide_others=True) as whole:
        optimizer._whole_on_owner = {id(full) for full in whole.values()}
        try:
            blocks_step()
        finally:
            optimizer._whole_on_owner = set()


def shard_prefixes(optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """``{id(param): state-key prefix}`` of the parameters each rank steps alone, not distributed
    further: FSDP2 local shards (prefix naming the shard) and, inside the lossless mode's owner
    view, the whole parameters owned here (prefix ``""``: DDP's keys)."""
    whole = getattr(optimizer, "_whole_on_owner", set())
    return {id(p): "" if id(p) in whole else shard_key_prefix(p)
            for group in optimizer.param_groups for p in group["params"]
            if id(p) in whole or is_sharded(p)}


def parameter_owners(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[int]:
    """Lossless FSDP2: one owner per whole parameter, balancing its blocks' summed costs and
    state sizes (:func:`~secondorder.distributed.distributor.assign_owners`); cached until the
    parameters, their blocking or the world size change."""
    group_of: dict[int, dict[str, Any]] = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    key = tuple((id(p), group_of[id(p)]["max_preconditioner_dim"]) for p in params)
    distributor = optimizer.distributor
    cached = getattr(optimizer, "_parameter_owner_cache", None)
    if cached is None or cached[0] != key or cached[1] != distributor.world_size:
        totals = [optimizer._block_costs(p, group_of[id(p)]) for p in params]
        owners = distributor.assign([sum(c for c, _ in blocks) for blocks in totals],
                                    [sum(s for _, s in blocks) for blocks in totals])
        optimizer._parameter_owner_cache = (key, distributor.world_size, owners)
    return optimizer._parameter_owner_cache[2]
