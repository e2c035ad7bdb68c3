"""Hierarchical factors (Lin, Dangel et al. 2024, SINGD §3.2; reference/singd.md §7)::

        ⎡ A  B₁  B₂ ⎤    A  (k₁ × k₁) dense        B = [B₁ B₂]  (k₁ × (d − k₁)) dense
    M = ⎢ 0  c   0  ⎥    c  (m × m) diagonal, m = d − k₁ − k₂
        ⎣ 0  D   E  ⎦    D  (k₂ × m) dense         E  (k₂ × k₂) dense

This generalises block-Heisenberg and rank-k upper-triangular groups. When ``d`` is small the
blocks are filled in the order A, then E, then the diagonal: ``d ≤ k₁`` is all A;
``k₁ < d ≤ k₁ + k₂`` has ``m = 0``. ``Π̂(X)`` for symmetric ``X``: ``A = X₁₁``,
``B = 2 X₁,₂₃``, ``c = diag(X₂₂)``, ``D = 2 X₃₂``, ``E = X₃₃`` (rectangles doubled because each
stands for both triangles). Storage ``k₁² + k₁(d − k₁) + m + k₂ m + k₂²`` values, in the order
A, B, c, D, E. singd's ``hierarchical15_15`` is ``k₁ = k₂ = 15``.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor

from .base import StructuredMatrix


class HierarchicalMatrix(StructuredMatrix):
    """Hierarchical ``d × d`` matrix with ``k₁ = K1``, ``k₂ = K2`` (defaults 15, 15).

    Use :func:`hierarchical_class` for other block sizes.
    """

    name = "hierarchical15_15"
    K1: ClassVar[int] = 15
    K2: ClassVar[int] = 15

    @classmethod
    def block_dims(cls, dim: int) -> tuple[int, int, int]:
        """``(k₁, m, k₂)`` actually used for size ``dim`` (A first, then E, then c)."""
        if dim <= cls.K1:
            return dim, 0, 0
        if dim <= cls.K1 + cls.K2:
            return cls.K1, 0, dim - cls.K1
        return cls.K1, dim - cls.K1 - cls.K2, cls.K2

    @classmethod
    def _sizes(cls, dim: int) -> tuple[int, ...]:
        k1, m, k2 = cls.block_dims(dim)
        return k1 * k1, k1 * (dim - k1), m, k2 * m, k2 * k2

    @classmethod
    def numel(cls, dim: int) -> int:
        return sum(cls._sizes(dim))

    def parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Views ``(A, B, c, D, E)`` into ``data`` with shapes as in the module docstring."""
        k1, m, k2 = self.block_dims(self.dim)
        a, b, c, d, e = self.data.split(self._sizes(self.dim))
        return a.view(k1, k1), b.view(k1, self.dim - k1), c, d.view(k2, m), e.view(k2, k2)

    @classmethod
    def _pack(
        cls, dim: int, A: Tensor, B: Tensor, c: Tensor, D: Tensor, E: Tensor
    ) -> HierarchicalMatrix:
        return cls(
            torch.cat([A.reshape(-1), B.reshape(-1), c.reshape(-1), D.reshape(-1), E.reshape(-1)]),
            dim,
        )

    @classmethod
    def from_dense(cls, sym: Tensor) -> HierarchicalMatrix:
        dim = cls._check_square(sym)
        k1, m, _ = cls.block_dims(dim)
        s = k1 + m
        return cls._pack(
            dim,
            sym[:k1, :k1],
            2 * sym[:k1, k1:],
            sym.diagonal()[k1:s],
            2 * sym[s:, k1:s],
            sym[s:, s:],
        )

    @classmethod
    def from_gram(cls, S: Tensor) -> HierarchicalMatrix:
        """``Π̂(S Sᵀ)`` from the row blocks of ``S``: O(d (k₁ + k₂) n)."""
        dim = S.shape[0]
        k1, m, k2 = cls.block_dims(dim)
        top, mid, bottom = S.split([k1, m, k2])
        return cls._pack(
            dim,
            top @ top.T,
            2 * (top @ S[k1:].T),
            (mid * mid).sum(1),
            2 * (bottom @ mid.T),
            bottom @ bottom.T,
        )

    def to_dense(self) -> Tensor:
        A, B, c, D, E = self.parts()
        k1, m, _ = self.block_dims(self.dim)
        s = k1 + m
        dense = self.data.new_zeros(self.dim, self.dim)
        dense[:k1, :k1] = A
        dense[:k1, k1:] = B
        dense[k1:s, k1:s] = torch.diag(c)
        dense[s:, k1:s] = D
        dense[s:, s:] = E
        return dense

    def matmul(self, X: Tensor) -> Tensor:
        self._check_rows(X)
        A, B, c, D, E = self.parts()
        k1, m, k2 = self.block_dims(self.dim)
        top, mid, bottom = X.split([k1, m, k2])
        return torch.cat([A @ top + B @ X[k1:], c.unsqueeze(1) * mid, D @ mid + E @ bottom])

    def tmatmul(self, X: Tensor) -> Tensor:
        self._check_rows(X)
        A, B, c, D, E = self.parts()
        k1, m, k2 = self.block_dims(self.dim)
        top, mid, bottom = X.split([k1, m, k2])
        B_mid, B_bottom = B.split([m, k2], dim=1)
        return torch.cat(
            [
                A.T @ top,
                B_mid.T @ top + c.unsqueeze(1) * mid + D.T @ bottom,
                B_bottom.T @ top + E.T @ bottom,
            ]
        )

    def compose(self, other: StructuredMatrix) -> HierarchicalMatrix:
        self._check_same(other)
        A, B, c, D, E = self.parts()
        oA, oB, oc, oD, oE = other.parts()
        m = c.shape[0]
        B_mid, B_bottom = B.split([m, E.shape[0]], dim=1)
        oB_mid, oB_bottom = oB.split([m, E.shape[0]], dim=1)
        new_B = torch.cat(
            [A @ oB_mid + B_mid * oc + B_bottom @ oD, A @ oB_bottom + B_bottom @ oE], dim=1
        )
        return self._pack(self.dim, A @ oA, new_B, c * oc, D * oc + E @ oD, E @ oE)

    def inner(self, X: Tensor | None = None) -> HierarchicalMatrix:
        if X is not None:
            return self.from_gram(self.tmatmul(X))
        # Π̂(MᵀM) blockwise: the column blocks of M are [A;0;0], [B₁;c;D], [B₂;0;E].
        A, B, c, D, E = self.parts()
        m = c.shape[0]
        B_mid, B_bottom = B.split([m, E.shape[0]], dim=1)
        return self._pack(
            self.dim,
            A.T @ A,
            2 * (A.T @ B),
            c * c + (B_mid * B_mid).sum(0) + (D * D).sum(0),
            2 * (B_bottom.T @ B_mid + E.T @ D),
            B_bottom.T @ B_bottom + E.T @ E,
        )

    def average_trace(self) -> Tensor:
        A, _, c, _, E = self.parts()
        return (A.diagonal().sum() + c.sum() + E.diagonal().sum()) / self.dim

    def diag_add_(self, value: float) -> HierarchicalMatrix:
        A, _, c, _, E = self.parts()
        A.diagonal().add_(value)
        c.add_(value)
        E.diagonal().add_(value)
        return self


@functools.cache
def hierarchical_class(k1: int, k2: int) -> type[HierarchicalMatrix]:
    """The hierarchical structure with block sizes ``k1``, ``k2`` (name
    ``f"hierarchical{k1}_{k2}"``); one class per pair, cached."""
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 1)")
    if (k1, k2) == (HierarchicalMatrix.K1, HierarchicalMatrix.K2):
        return HierarchicalMatrix
    return type(
        f"Hierarchical{k1}_{k2}Matrix",
        (HierarchicalMatrix,),
        {"K1": k1, "K2": k2, "name": f"hierarchical{k1}_{k2}", "__module__": __name__},
    )
