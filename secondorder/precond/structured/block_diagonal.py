"""Block-diagonal factors: ``b × b`` dense blocks along the diagonal plus one remainder block of
size ``d mod b`` at the bottom right; ``Π̂`` copies the diagonal blocks of ``X``
(singd's ``block30diagonal`` is ``b = 30``; reference/singd.md §7)."""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor

from .base import StructuredMatrix


class BlockDiagonalMatrix(StructuredMatrix):
    """Block-diagonal ``d × d`` matrix with ``n_b = d // b`` full blocks and a remainder ``r``.

    ``data`` = the ``n_b`` blocks (row-major, ``(n_b, b, b)``) followed by the ``(r, r)``
    remainder block: ``n_b·b² + r²`` values. Use :func:`block_diagonal_class` for a block size
    other than the default 30.
    """

    name = "block30diagonal"
    BLOCK_SIZE: ClassVar[int] = 30

    @classmethod
    def _split(cls, dim: int) -> tuple[int, int]:
        """``(number of full blocks, remainder size)``."""
        return dim // cls.BLOCK_SIZE, dim % cls.BLOCK_SIZE

    @classmethod
    def numel(cls, dim: int) -> int:
        blocks, rest = cls._split(dim)
        return blocks * cls.BLOCK_SIZE**2 + rest * rest

    @property
    def blocks(self) -> Tensor:
        """``(n_b, b, b)`` view of the full blocks."""
        count, _ = self._split(self.dim)
        b = self.BLOCK_SIZE
        return self.data[: count * b * b].view(count, b, b)

    @property
    def last(self) -> Tensor:
        """``(r, r)`` view of the remainder block."""
        count, rest = self._split(self.dim)
        return self.data[count * self.BLOCK_SIZE**2 :].view(rest, rest)

    @classmethod
    def _pack(cls, blocks: Tensor, last: Tensor, dim: int) -> BlockDiagonalMatrix:
        return cls(torch.cat([blocks.reshape(-1), last.reshape(-1)]), dim)

    @classmethod
    def from_dense(cls, sym: Tensor) -> BlockDiagonalMatrix:
        dim = cls._check_square(sym)
        count, _ = cls._split(dim)
        b = cls.BLOCK_SIZE
        head = count * b
        blocks = (
            sym[:head, :head].reshape(count, b, count, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        )
        return cls._pack(blocks, sym[head:, head:], dim)

    @classmethod
    def from_gram(cls, S: Tensor) -> BlockDiagonalMatrix:
        """Diagonal blocks of ``S Sᵀ`` by batched products: O(d b n)."""
        dim = S.shape[0]
        count, _ = cls._split(dim)
        head = count * cls.BLOCK_SIZE
        top = S[:head].reshape(count, cls.BLOCK_SIZE, S.shape[1])
        rest = S[head:]
        return cls._pack(top @ top.transpose(1, 2), rest @ rest.T, dim)

    def to_dense(self) -> Tensor:
        dense = self.data.new_zeros(self.dim, self.dim)
        b = self.BLOCK_SIZE
        for index, block in enumerate(self.blocks):
            dense[index * b : (index + 1) * b, index * b : (index + 1) * b] = block
        head = self.blocks.shape[0] * b
        dense[head:, head:] = self.last
        return dense

    def _apply(self, X: Tensor, transpose: bool) -> Tensor:
        self._check_rows(X)
        blocks, last = self.blocks, self.last
        if transpose:
            blocks, last = blocks.transpose(1, 2), last.T
        head = blocks.shape[0] * self.BLOCK_SIZE
        top = (blocks @ X[:head].reshape(blocks.shape[0], self.BLOCK_SIZE, X.shape[1])).reshape(
            head, X.shape[1]
        )
        return torch.cat([top, last @ X[head:]], dim=0)

    def matmul(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=False)

    def tmatmul(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=True)

    def compose(self, other: StructuredMatrix) -> BlockDiagonalMatrix:
        self._check_same(other)
        return self._pack(self.blocks @ other.blocks, self.last @ other.last, self.dim)

    def inner(self, X: Tensor | None = None) -> BlockDiagonalMatrix:
        if X is None:
            blocks, last = self.blocks, self.last
            return self._pack(blocks.transpose(1, 2) @ blocks, last.T @ last, self.dim)
        return self.from_gram(self.tmatmul(X))

    def average_trace(self) -> Tensor:
        total = self.blocks.diagonal(dim1=1, dim2=2).sum() + self.last.diagonal().sum()
        return total / self.dim

    def diag_add_(self, value: float) -> BlockDiagonalMatrix:
        self.blocks.diagonal(dim1=1, dim2=2).add_(value)
        self.last.diagonal().add_(value)
        return self


@functools.cache
def block_diagonal_class(block_size: int) -> type[BlockDiagonalMatrix]:
    """The block-diagonal structure with ``block_size × block_size`` blocks (name
    ``f"block{block_size}diagonal"``); one class per size, cached."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"Invalid block_size: {block_size!r} (expected an int >= 1)")
    if block_size == BlockDiagonalMatrix.BLOCK_SIZE:
        return BlockDiagonalMatrix
    return type(
        f"Block{block_size}DiagonalMatrix",
        (BlockDiagonalMatrix,),
        {"BLOCK_SIZE": block_size, "name": f"block{block_size}diagonal", "__module__": __name__},
    )
