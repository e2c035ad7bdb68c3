"""A block-diagonal input-side Kronecker factor for wide layers (EK-FAC's ``max_factor_dim``).

A layer whose input width ``d_in'`` is large (a classifier on a wide feature vector) holds most
of K-FAC's state and work in ``A`` (``d_in'²`` numbers and a ``d_in'³`` eigendecomposition).
Keeping only ``A``'s diagonal blocks over contiguous column ranges ``c_1, …, c_k``::

    A ≈ blockdiag(A_1, …, A_k),   A_j = (1/M) Σ_{n,t} ā[c_j] ā[c_j]ᵀ
    Q_A = blockdiag(Q_{A_1}, …, Q_{A_k}),   λ_A = concat(λ_{A_1}, …, λ_{A_k})

is the same approximation Shampoo's ``max_preconditioner_dim`` makes (the Fisher's
cross-covariances between the blocks' inputs are dropped), and everything else in EK-FAC stays
as it is: ``Q_A`` is still orthogonal, so ``X = Q_Gᵀ Ḡ Q_A`` is computed block by block
(``X[:, c_j] = (Q_Gᵀ Ḡ)[:, c_j] Q_{A_j}``), and the correction ``Λ`` and the damping keep their
whole-layer ``(groups, d_out, d_in')`` form. State and work of ``A`` fall from ``d_in'²`` and
``d_in'³`` to ``Σ_j |c_j|²`` and ``Σ_j |c_j|³`` (about ``1/k`` and ``1/k²``).

Blocks (:func:`factor_blocks`): ``k = ⌈d_in'/max_dim⌉`` contiguous ranges of sizes differing by
at most one (the ones column, last, in the last block), so no block exceeds ``max_dim``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from secondorder.precond.capture import LayerStats
from secondorder.precond.capture_layers import CapturedLayer
from secondorder.precond.kfac import KroneckerEigenbasis

__all__ = ["BlockedEigenbasis", "factor_blocks", "blocked_activation_factors", "rotate_columns"]


def factor_blocks(size: int, max_dim: int | float | None) -> list[tuple[int, int]] | None:
    """Contiguous ``[start, stop)`` column ranges cutting ``size`` into ``⌈size/max_dim⌉``
    nearly equal blocks; ``None`` when one block would do (``max_dim`` ``None`` or ≥ ``size``)."""
    if max_dim is None or size <= max_dim:
        return None
    count = math.ceil(size / max_dim)
    base, extra = divmod(size, count)
    bounds, start = [], 0
    for index in range(count):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def blocked_activation_factors(
    layer: CapturedLayer, stats: LayerStats, blocks: list[tuple[int, int]], dtype: torch.dtype
) -> list[Tensor]:
    """``A_j = (1/M) Σ ā[c_j] ā[c_j]ᵀ`` of one window, each ``(1, |c_j|, |c_j|)``.

    ``layer`` is a dense layer with one group (``stats.inputs`` ``(N, T, d_in')``); ``M`` is
    ``stats.num_positions``, as in :func:`~secondorder.precond.kfac.kronecker_factors`.
    """
    if layer.family != "dense" or layer.groups != 1:
        raise ValueError(f"Invalid layer: {layer.name!r} ({layer.kind}) has no blockable input factor")
    rows = stats.inputs.to(dtype).reshape(-1, stats.inputs.shape[-1])
    count = max(stats.num_positions, 1)
    return [(rows[:, start:stop].transpose(0, 1) @ rows[:, start:stop] / count).unsqueeze(0)
            for start, stop in blocks]


def rotate_columns(matrix: Tensor, bases: list[Tensor], blocks: list[tuple[int, int]],
                   transpose: bool = False) -> Tensor:
    """``matrix @ blockdiag(bases)`` (``transpose``: ``@ blockdiag(bases)ᵀ``) over the last dim.

    Args:
        matrix: ``(..., d_in')``.
        bases: per block ``(1, |c_j|, |c_j|)`` (or ``(|c_j|, |c_j|)``).
        blocks: the column ranges ``c_j``.
    """
    pieces = []
    for basis, (start, stop) in zip(bases, blocks, strict=True):
        square = basis.reshape(stop - start, stop - start)
        pieces.append(matrix[..., start:stop] @ (square.transpose(0, 1) if transpose else square))
    return torch.cat(pieces, dim=-1)


@dataclass
class BlockedEigenbasis(KroneckerEigenbasis):
    """A :class:`~secondorder.precond.kfac.KroneckerEigenbasis` whose ``Q_A`` is
    ``blockdiag(activation_blocks)`` over the column ranges ``blocks`` (one group).

    ``activation_basis`` is ``None`` here (the blocks replace it); :meth:`dense` gives the
    plain equivalent with ``Q_A`` assembled (``d_in'²`` numbers: influence queries, tests).
    """

    activation_blocks: tuple[Tensor, ...] = ()
    blocks: tuple[tuple[int, int], ...] = ()

    def project(self, matrix: Tensor) -> Tensor:
        """``Q_Gᵀ M Q_A``, ``matrix`` ``(…, 1, d_out, d_in')``."""
        return rotate_columns(self.gradient_basis.transpose(-1, -2) @ matrix,
                              list(self.activation_blocks), list(self.blocks))

    def unproject(self, matrix: Tensor) -> Tensor:
        """``Q_G M Q_Aᵀ``."""
        return rotate_columns(self.gradient_basis @ matrix, list(self.activation_blocks),
                              list(self.blocks), transpose=True)

    def dense_activation_basis(self) -> Tensor:
        """``Q_A = blockdiag(Q_{A_1}, …)`` as ``(1, d_in', d_in')``."""
        return torch.block_diag(*(b.reshape(b.shape[-1], b.shape[-1]) for b in self.activation_blocks)).unsqueeze(0)

    def dense(self) -> KroneckerEigenbasis:
        """The same basis as a plain :class:`KroneckerEigenbasis` (``Q_A`` assembled)."""
        return KroneckerEigenbasis(self.gradient_basis, self.gradient_eigenvalues,
                                   self.dense_activation_basis(), self.activation_eigenvalues,
                                   self.correction)

    def dense_basis(self) -> Tensor:
        return self.dense().dense_basis()

    def state_dict(self) -> dict[str, Tensor]:
        return self.dense().state_dict()
