"""Kronecker eigenbasis + diagonal correction: the one object behind EK-FAC, SOAP and influence.

A Kronecker-factored curvature ``F ≈ F_0 ⊗ F_1 ⊗ …`` (one factor per tensor dimension) has the
eigenbasis ``Q = Q_0 ⊗ Q_1 ⊗ …``. George et al. (2018, "Fast Approximate Natural Gradient
Descent in a Kronecker-factored Eigenbasis") keep that basis but replace the Kronecker
eigenvalues by a per-coordinate *correction* ``Λ = E[(Qᵀ g)²]``, the best diagonal in that
basis. The same shape of computation serves

* EK-FAC (power 1, damping λ): ``P g = Q ((Qᵀ g) / (Λ + λ))``;
* eigenvalue-corrected Shampoo / SOAP (Vyas et al. 2024; power 1/2, ε outside the root):
  ``P g = Q ((Qᵀ g) / (sqrt(Λ / c₂) + ε))`` — Adam run in Shampoo's eigenbasis;
* influence queries (``secondorder.influence``), which reuse EK-FAC's ``Q`` and ``Λ``.

Tensors here are blocks of order ``o`` with one basis per dimension (``None`` = identity
basis on that dimension). For a linear layer's weight ``(d_out, d_in)`` the bases are
``[Q_G (d_out, d_out), Q_A (d_in, d_in)]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from secondorder.precond.linalg import apply_kronecker


def project_to_eigenbasis(tensor: Tensor, bases: Sequence[Tensor | None]) -> Tensor:
    """Rotate ``tensor`` into the Kronecker eigenbasis: ``Q_0ᵀ G Q_1`` for a matrix.

    Args:
        tensor: ``(d_0, …, d_{o-1})``.
        bases: ``o`` orthogonal ``(d_k, d_k)`` matrices (columns are eigenvectors) or ``None``.

    Returns:
        Same shape as ``tensor``.
    """
    return apply_kronecker(tensor, bases)


def project_from_eigenbasis(tensor: Tensor, bases: Sequence[Tensor | None]) -> Tensor:
    """Inverse of :func:`project_to_eigenbasis`: ``Q_0 G' Q_1ᵀ`` for a matrix. Shapes as there."""
    return apply_kronecker(tensor, [None if basis is None else basis.transpose(0, 1) for basis in bases])


def precondition_in_eigenbasis(gradient: Tensor, bases: Sequence[Tensor | None], denominator: Tensor) -> Tensor:
    """``Q ((Qᵀ g) / denominator)``: divide coordinate-wise in the eigenbasis.

    Args:
        gradient: ``(d_0, …, d_{o-1})``.
        bases: as in :func:`project_to_eigenbasis`.
        denominator: positive, broadcastable to ``gradient`` (e.g. ``Λ + λ`` for EK-FAC,
            ``sqrt(Λ/c₂) + ε`` for SOAP).

    Returns:
        The preconditioned gradient, same shape as ``gradient``.
    """
    return project_from_eigenbasis(project_to_eigenbasis(gradient, bases) / denominator, bases)
