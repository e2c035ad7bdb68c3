"""Full lower- and upper-triangular factors (the Cholesky group; Lin et al. 2023, §3).

``Π̂(X)`` keeps the triangle of a symmetric ``X`` with its off-diagonal entries doubled (each
stands for both triangles) and the diagonal copied. Stored packed: ``d(d+1)/2`` values in
row-major order of ``torch.tril_indices`` / ``torch.triu_indices``. Products go through the
dense triangle (O(d² n)), which is what a triangular matmul costs anyway.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor

from .base import StructuredMatrix


@functools.lru_cache(maxsize=64)
def _indices(dim: int, lower: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, positions of the diagonal in the packed vector)``."""
    rows, cols = (torch.tril_indices if lower else torch.triu_indices)(dim, dim, device=device)
    diagonal = (rows == cols).nonzero().squeeze(1)
    return rows, cols, diagonal


class _TriangularMatrix(StructuredMatrix):
    """Shared code of :class:`LowerTriangularMatrix` and :class:`UpperTriangularMatrix`."""

    LOWER: ClassVar[bool] = True

    @classmethod
    def numel(cls, dim: int) -> int:
        return dim * (dim + 1) // 2

    def _idx(self) -> tuple[Tensor, Tensor, Tensor]:
        return _indices(self.dim, self.LOWER, self.data.device)

    @classmethod
    def _pack_dense(cls, triangle: Tensor) -> _TriangularMatrix:
        """Pack a dense matrix's triangle (entries outside are ignored)."""
        dim = triangle.shape[0]
        rows, cols, _ = _indices(dim, cls.LOWER, triangle.device)
        return cls(triangle[rows, cols], dim)

    @classmethod
    def from_dense(cls, sym: Tensor) -> _TriangularMatrix:
        dim = cls._check_square(sym)
        rows, cols, diagonal = _indices(dim, cls.LOWER, sym.device)
        data = 2 * sym[rows, cols]
        on_diagonal = rows[diagonal]
        data[diagonal] = sym[on_diagonal, on_diagonal]
        return cls(data, dim)

    def to_dense(self) -> Tensor:
        rows, cols, _ = self._idx()
        dense = self.data.new_zeros(self.dim, self.dim)
        dense[rows, cols] = self.data
        return dense

    def matmul(self, X: Tensor) -> Tensor:
        self._check_rows(X)
        return self.to_dense() @ X

    def tmatmul(self, X: Tensor) -> Tensor:
        self._check_rows(X)
        return self.to_dense().T @ X

    def compose(self, other: StructuredMatrix) -> _TriangularMatrix:
        self._check_same(other)
        return self._pack_dense(self.to_dense() @ other.to_dense())

    def average_trace(self) -> Tensor:
        return self.data[self._idx()[2]].mean()

    def diag_add_(self, value: float) -> _TriangularMatrix:
        diagonal = self._idx()[2]
        self.data.index_add_(0, diagonal, self.data.new_full((self.dim,), value))
        return self


class LowerTriangularMatrix(_TriangularMatrix):
    """Lower-triangular ``d × d`` matrix, ``d(d+1)/2`` values (``tril_indices`` order)."""

    name = "tril"
    LOWER = True


class UpperTriangularMatrix(_TriangularMatrix):
    """Upper-triangular ``d × d`` matrix, ``d(d+1)/2`` values (``triu_indices`` order)."""

    name = "triu"
    LOWER = False
