"""Cutting parameters into preconditioner blocks.

Shampoo-family optimizers precondition *blocks*: a parameter is first reshaped by merging
small dimensions (so a ``(32, 16)`` matrix is one 512-vector rather than two tiny factors)
and then split along every dimension larger than ``max_preconditioner_dim`` (so no factor
is larger than ``b x b``). The rules follow distributed_shampoo (Shi et al. 2023, §3.2;
``merge_small_dims`` / ``multi_dim_split``), so the same inputs give the same blocks:

1. a shape with a 0 dim becomes ``(0,)``; size-1 dims are dropped (all ones or 0-d → ``(1,)``);
2. walking from the last dim to the first, the next dim is merged into the current one while
   the product stays ``<= b`` and more than ``target_order`` dims would otherwise remain;
3. every dim is cut into chunks of ``b`` (the last chunk smaller, no padding); blocks come in
   row-major order over the chunk grid.

Blocks are views of the parameter, so writing into a block writes the parameter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def merge_small_dims(shape: Sequence[int], max_dim: float, target_order: float = 1) -> tuple[int, ...]:
    """Merge adjacent dims right to left while the product stays ``<= max_dim``.

    Args:
        shape: the parameter's shape.
        max_dim: ``b``, the largest allowed merged dim (``math.inf`` allowed).
        target_order: never merge below this many dims (``math.inf`` disables merging).

    Returns:
        The merged shape, e.g. ``(64, 64, 3, 3) -> (64, 576)`` with ``b = 1024``.
    """
    if any(d == 0 for d in shape):
        return (0,)
    if math.isinf(target_order):
        return tuple(shape) if len(shape) else (1,)
    dims = [d for d in shape if d != 1]
    if not dims:
        return (1,)
    merged: list[int] = [dims[-1]]
    for remaining, dim in zip(range(len(dims) - 1, 0, -1), reversed(dims[:-1])):
        # ``remaining`` dims (this one included) are still to be placed.
        if len(merged) + remaining > target_order and merged[-1] * dim <= max_dim:
            merged[-1] *= dim
        else:
            merged.append(dim)
    return tuple(reversed(merged))


def split_sizes(dim: int, max_dim: float) -> list[int]:
    """Chunk sizes of one dim cut into pieces of ``max_dim`` (last one smaller)."""
    if math.isinf(max_dim) or dim <= max_dim:
        return [dim]
    max_dim = int(max_dim)
    return [max_dim] * (dim // max_dim) + ([dim % max_dim] if dim % max_dim else [])


@dataclass(frozen=True)
class BlockLayout:
    """How one parameter is cut into blocks.

    Attributes:
        merged_shape: the parameter's shape after :func:`merge_small_dims`.
        offsets: per block, the start index along every merged dim.
        shapes: per block, its shape (order = ``len(merged_shape)``).
    """

    merged_shape: tuple[int, ...]
    offsets: tuple[tuple[int, ...], ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def for_shape(cls, shape: Sequence[int], max_dim: float, target_order: float = 1) -> BlockLayout:
        """Build the layout of a parameter of ``shape``."""
        merged = merge_small_dims(shape, max_dim, target_order)
        sizes_per_dim = [split_sizes(d, max_dim) for d in merged]
        starts_per_dim = [list(itertools.accumulate([0] + sizes[:-1])) for sizes in sizes_per_dim]
        offsets, shapes = [], []
        for combo in itertools.product(*[range(len(sizes)) for sizes in sizes_per_dim]):
            offsets.append(tuple(starts_per_dim[k][i] for k, i in enumerate(combo)))
            shapes.append(tuple(sizes_per_dim[k][i] for k, i in enumerate(combo)))
        return cls(merged, tuple(offsets), tuple(shapes))

    def __len__(self) -> int:
        return len(self.shapes)

    def blocks(self, tensor: Tensor) -> list[Tensor]:
        """Views of ``tensor`` (the parameter's shape) cut into the layout's blocks.

        A non-contiguous ``tensor`` is reshaped with a copy (fine for gradients, which are
        only read; parameters are contiguous).
        """
        merged = tensor.reshape(self.merged_shape)
        views = []
        for offset, shape in zip(self.offsets, self.shapes):
            view = merged
            for dim, (start, size) in enumerate(zip(offset, shape)):
                if size != merged.shape[dim]:
                    view = view.narrow(dim, start, size)
            views.append(view)
        return views

    def assemble(self, blocks: Sequence[Tensor], like: Tensor) -> Tensor:
        """Inverse of :meth:`blocks`: a tensor shaped like ``like`` from per-block tensors."""
        out = torch.empty(self.merged_shape, dtype=blocks[0].dtype, device=like.device)
        for view, block in zip(self.blocks(out), blocks):
            view.copy_(block)
        return out.reshape(like.shape)
