"""Diagonal factors: 𝓛 = diagonal matrices, ``Π̂(X) = diag(X)`` (Adam-like, fully decoupled;
reference/singd.md §7)."""

from __future__ import annotations

from torch import Tensor

from .base import StructuredMatrix


class DiagonalMatrix(StructuredMatrix):
    """A diagonal ``d × d`` matrix; ``data`` is its diagonal (``d`` values)."""

    name = "diagonal"

    @classmethod
    def numel(cls, dim: int) -> int:
        return dim

    @classmethod
    def from_dense(cls, sym: Tensor) -> DiagonalMatrix:
        dim = cls._check_square(sym)
        return cls(sym.diagonal().clone(), dim)

    @classmethod
    def from_gram(cls, S: Tensor) -> DiagonalMatrix:
        """``diag(S Sᵀ)`` = row sums of ``S²``: O(d n)."""
        return cls((S * S).sum(1), S.shape[0])

    def to_dense(self) -> Tensor:
        return self.data.diag()

    def matmul(self, X: Tensor) -> Tensor:
        self._check_rows(X)
        return self.data.unsqueeze(1) * X

    tmatmul = matmul

    def gram_matmul(self, X: Tensor) -> Tensor:
        """``diag(M)² X`` in one pass."""
        self._check_rows(X)
        return (self.data * self.data).unsqueeze(1) * X

    def compose(self, other: StructuredMatrix) -> DiagonalMatrix:
        self._check_same(other)
        return DiagonalMatrix(self.data * other.data, self.dim)

    def inner(self, X: Tensor | None = None) -> DiagonalMatrix:
        """``diag(M)² · diag(X Xᵀ)``: O(d n)."""
        squared = self.data * self.data
        if X is None:
            return DiagonalMatrix(squared, self.dim)
        self._check_rows(X)
        return DiagonalMatrix(squared * (X * X).sum(1), self.dim)

    def average_trace(self) -> Tensor:
        return self.data.mean()

    def diag_add_(self, value: float) -> DiagonalMatrix:
        self.data.add_(value)
        return self
