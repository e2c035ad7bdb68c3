"""Dense factors: 𝓛 = all ``d × d`` matrices, ``Π̂(X) = X`` (INGD/IKFAC; reference/singd.md §7)."""

from __future__ import annotations

from torch import Tensor

from .base import StructuredMatrix


class DenseMatrix(StructuredMatrix):
    """An unstructured ``d × d`` matrix stored row-major in ``data`` (``d²`` values).

    ``Π̂`` is the identity on symmetric matrices, so ``from_gram(S) = S Sᵀ`` and
    ``inner(X) = Mᵀ X Xᵀ M``.
    """

    name = "dense"

    @classmethod
    def numel(cls, dim: int) -> int:
        return dim * dim

    @property
    def mat(self) -> Tensor:
        """The ``(d, d)`` view of ``data``."""
        return self.data.view(self.dim, self.dim)

    @classmethod
    def from_dense(cls, sym: Tensor) -> DenseMatrix:
        dim = cls._check_square(sym)
        return cls(sym.reshape(-1).clone(), dim)

    @classmethod
    def from_gram(cls, S: Tensor) -> DenseMatrix:
        return cls((S @ S.T).reshape(-1), S.shape[0])

    def to_dense(self) -> Tensor:
        return self.mat.clone()

    def matmul(self, X: Tensor) -> Tensor:
        self._check_rows(X)
        return self.mat @ X

    def tmatmul(self, X: Tensor) -> Tensor:
        self._check_rows(X)
        return self.mat.T @ X

    def compose(self, other: StructuredMatrix) -> DenseMatrix:
        self._check_same(other)
        return DenseMatrix((self.mat @ other.mat).reshape(-1), self.dim)

    def inner(self, X: Tensor | None = None) -> DenseMatrix:
        if X is None:
            return DenseMatrix.from_gram(self.mat.T)
        self._check_rows(X)
        return DenseMatrix.from_gram(self.mat.T @ X)

    def average_trace(self) -> Tensor:
        return self.mat.diagonal().mean()

    def diag_add_(self, value: float) -> DenseMatrix:
        self.mat.diagonal().add_(value)
        return self
