"""Flat-buffer collectives the distributors are built on.

Every collective here moves *one* flat buffer per call, laid out by owner: rank ``r``'s slice
holds, in global block order, the blocks ``r`` owns. Slices are padded to the largest one so
that ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (equal slices) apply.

torch 2.13 renamed ``all_gather_into_tensor`` → ``all_gather_single`` and
``reduce_scatter_tensor`` → ``reduce_scatter_single`` (the old names warn); older releases
only have the old names. The two shims below pick whichever exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(local: Tensor, world_size: int, group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate every rank's 1-D ``local`` (same length ``n`` on all ranks).

    Returns:
        ``(world_size * n,)``: rank ``r``'s input at ``[r*n, (r+1)*n)`` (``local`` itself
        at world size 1, where no collective runs).
    """
    if world_size == 1:
        return local
    output = torch.empty(world_size * local.numel(), dtype=local.dtype, device=local.device)
    _ALL_GATHER(output, local, group=group)
    return output


def reduce_scatter_flat(full: Tensor, world_size: int, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``full`` (``(world_size * n,)``, equal on all ranks) over ranks; keep slice ``rank``.

    Returns:
        ``(n,)``: ``Σ_ranks full[rank*n : (rank+1)*n]`` (``full`` itself at world size 1).
    """
    if world_size == 1:
        return full
    output = torch.empty(full.numel() // world_size, dtype=full.dtype, device=full.device)
    _REDUCE_SCATTER(output, full, op=dist.ReduceOp.SUM, group=group)
    return output


@dataclass(frozen=True)
class OwnerLayout:
    """Where each block lives in an owner-ordered flat buffer.

    Attributes:
        slice_size: elements per rank slice (the largest rank's total; others padded).
        offsets: per block, its start inside its owner's slice (``-1`` for absent blocks).
        numels: per block, its element count (0 for absent blocks).
        owners: per block, its owner rank.
    """

    slice_size: int
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    owners: tuple[int, ...]

    @classmethod
    def build(
        cls,
        owners: Sequence[int],
        numels: Sequence[int | None],
        world_size: int,
        header: bool = False,
    ) -> OwnerLayout:
        """Lay out blocks of ``numels`` (None = absent) by owner, in global order.

        With ``header=True`` every present block also gets one leading flag element, placed
        before the block's data (``offsets`` point at the flag).
        """
        fill = [0] * world_size
        offsets, sizes = [], []
        for owner, numel in zip(owners, numels, strict=False):
            if numel is None:
                offsets.append(-1)
                sizes.append(0)
                continue
            offsets.append(fill[owner])
            sizes.append(int(numel))
            fill[owner] += int(numel) + (1 if header else 0)
        return cls(max(fill) if fill else 0, tuple(offsets), tuple(sizes), tuple(owners))


def numel_of(shape: Sequence[int] | None) -> int | None:
    """Element count of ``shape`` (None passes through)."""
    return None if shape is None else math.prod(shape)
