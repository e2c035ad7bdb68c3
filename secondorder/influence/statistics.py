"""The maths of the fitting stages and of the preconditioner, on captured rows.

The formulas are :mod:`secondorder.precond.kfac`'s (the same code ``secondorder.EKFAC`` runs,
so factors fitted here and factors accumulated by the optimizer agree). For one tracked layer
and one group (``groups`` is 1 except for grouped convolutions) the per-example gradient matrix
is ``G_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` (``d_out × d_in'``, bias column last) and the curvature block,
in the row-major order of ``G_n``, is approximated by

* ``kfac``:     ``S ⊗ A`` with ``A = Σ ā āᵀ / M``, ``S = Σ g gᵀ / M`` (``M`` = counted positions);
* ``ekfac``:    ``(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ`` with ``Λ = Σ_n (Q_Sᵀ G_n Q_A)^{⊙2} / N``
  (George et al. 2018): the best diagonal in the Kronecker eigenbasis;
* ``diagonal``: ``diag(vec Λ)`` with ``Λ = Σ_n G_n^{⊙2} / N`` (identity basis);
* ``identity``: the identity (no preconditioning: "TracIn at the last checkpoint").

(``S`` is ``G`` in :mod:`secondorder.precond.kfac`.) Stages keep **sums and counts**, normalised
only when used, so data partitions and ranks aggregate by addition. The damped inverse is

    P(V) = Q_S [ (Q_Sᵀ V Q_A) ⊘ (Λ + λ) ] Q_Aᵀ ,   λ explicit or 0.1 × mean(Λ) per layer

(Grosse et al. 2023's heuristic; ``Λ = λ_S λ_Aᵀ`` for ``kfac``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from secondorder.influence.collect import LayerRows
from secondorder.precond import kfac
from secondorder.precond.linalg import EigenFailure, NumericalWarning

__all__ = [
    "STRATEGIES",
    "HEURISTIC_DAMPING_SCALE",
    "per_example_gradients",
    "covariance_sums",
    "lambda_sums",
    "eigendecompose",
    "LayerPreconditioner",
]

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
HEURISTIC_DAMPING_SCALE = 0.1
_CHUNK_ELEMENTS = 1 << 24  # bound on the elements of one temporary of the correction


def per_example_gradients(rows: LayerRows, dtype: torch.dtype | None = None) -> Tensor:
    """``G_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` per example and group: ``(N, groups, d_out, d_in')``."""
    dtype = dtype or rows.stats.output_grads.dtype
    if rows.layer.kind != "embedding" and rows.stats.inputs.shape[1] == 1:
        a, g = rows.grouped(dtype)
        return g[:, 0, :, :, None] * a[:, 0, :, None, :]
    return kfac.per_example_gradients(rows.layer, rows.stats, dtype)


def covariance_sums(rows: LayerRows, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Unnormalised Kronecker factors of one pass, ``M`` × :func:`kfac.kronecker_factors`.

    Returns:
        ``(Σ ā āᵀ (groups, d_in', d_in'), Σ g gᵀ (groups, d_out, d_out))``; for an embedding
        the first is the diagonal, token counts ``(1, V)``.
    """
    activation, gradient = kfac.kronecker_factors(rows.layer, rows.stats, dtype)
    count = max(rows.stats.num_positions, 1)
    return activation * count, gradient * count


def lambda_sums(
    rows: LayerRows,
    dtype: torch.dtype,
    gradient_basis: Tensor | None,
    activation_basis: Tensor | None,
) -> Tensor:
    """``Σ_n (Q_Sᵀ G_n Q_A)^{⊙2}`` over the examples of one pass: ``(groups, d_out, d_in')``.

    ``None`` bases are the identity (the ``diagonal`` strategy; an embedding's input basis).
    """
    layer = rows.layer
    if gradient_basis is not None and activation_basis is not None:
        a, g = rows.grouped(dtype)
        _, positions, groups, d_out = g.shape
        d_in = a.shape[-1]
        # rotating T rows costs T·(d_out² + d_in'²) per example, rotating the formed gradient
        # d_out·d_in'·(d_out + d_in'): wide conv layers with many locations prefer the latter
        if positions * (d_out * d_out + d_in * d_in) > d_out * d_in * (d_out + d_in):
            basis_s = gradient_basis.to(dtype).transpose(-1, -2)
            basis_a = activation_basis.to(dtype)
            chunk = max(1, _CHUNK_ELEMENTS // max(groups * d_out * max(d_in, positions), 1))
            total = torch.zeros(groups, d_out, d_in, dtype=dtype, device=g.device)
            for start in range(0, g.shape[0], chunk):
                matrices = torch.einsum(
                    "ntgo,ntgi->ngoi", g[start : start + chunk], a[start : start + chunk]
                )
                total += ((basis_s @ matrices @ basis_a) ** 2).sum(0)
            return total
    if gradient_basis is None:
        eye = torch.eye(layer.out_features, dtype=dtype, device=rows.stats.output_grads.device)
        gradient_basis = eye.expand(layer.groups, -1, -1)
    correction = kfac.eigenvalue_correction(
        layer,
        rows.stats,
        gradient_basis.to(dtype),
        None if activation_basis is None else activation_basis.to(dtype),
    )
    return correction * max(rows.stats.num_examples, 1)


def eigendecompose(activation: Tensor, gradient: Tensor, name: str) -> dict[str, Tensor]:
    """Eigenpairs of the normalised factors, computed in float64, stored in their dtype.

    Args:
        activation: ``A`` ``(groups, d_in', d_in')`` or an embedding's diagonal ``(1, V)``.
        gradient: ``S`` ``(groups, d_out, d_out)``.
        name: the layer, for the warning.

    Returns:
        ``activation_eigenvalues``, ``gradient_eigenvalues``, ``gradient_eigenvectors`` and
        (except for a diagonal ``A``) ``activation_eigenvectors``. A failed ``eigh``
        (non-finite statistics) falls back to the identity basis with the factor's diagonal
        as eigenvalues and warns :class:`NumericalWarning`.
    """
    dtype = gradient.dtype
    try:
        basis = kfac.KroneckerEigenbasis.from_factors(activation.double(), gradient.double())
        result = {
            "gradient_eigenvalues": basis.gradient_eigenvalues,
            "gradient_eigenvectors": basis.gradient_basis,
            "activation_eigenvalues": basis.activation_eigenvalues,
        }
        if basis.activation_basis is not None:
            result["activation_eigenvectors"] = basis.activation_basis
    except EigenFailure as error:
        warnings.warn(
            f"influence: eigendecomposition of layer {name!r} failed ({error}); "
            "using the identity basis",
            NumericalWarning,
            stacklevel=2,
        )

        def fallback(matrix: Tensor) -> tuple[Tensor, Tensor]:
            diagonal = matrix.diagonal(dim1=-2, dim2=-1)
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype).expand_as(matrix).clone()
            return torch.nan_to_num(diagonal, nan=0.0, posinf=0.0, neginf=0.0), eye

        result = {}
        result["gradient_eigenvalues"], result["gradient_eigenvectors"] = fallback(gradient)
        if activation.dim() == 2:
            result["activation_eigenvalues"] = torch.nan_to_num(
                activation, nan=0.0, posinf=0.0, neginf=0.0
            )
        else:
            result["activation_eigenvalues"], result["activation_eigenvectors"] = fallback(
                activation
            )
    return {key: value.to(dtype) for key, value in result.items()}


class LayerPreconditioner:
    """The damped inverse of one layer's curvature block (module docstring).

    Args:
        strategy: one of :data:`STRATEGIES`.
        tensors: the layer's fitted tensors: ``gradient_eigenvectors`` ``(groups, d_out, d_out)``,
            ``activation_eigenvectors`` ``(groups, d_in', d_in')`` (absent = identity, e.g. an
            embedding) and both eigenvalue tensors for ``kfac``/``ekfac``; ``lambda``
            ``(groups, d_out, d_in')``, a **mean** over examples, for ``diagonal``/``ekfac``.
        damping: ``λ ≥ 0``, or ``None`` for ``0.1 × mean(Λ)``.

    Attributes:
        damping: the damping actually used (float; 0 for ``identity``).
    """

    def __init__(self, strategy: str, tensors: Mapping[str, Tensor], damping: float | None) -> None:
        self.strategy = strategy
        self.basis: kfac.KroneckerEigenbasis | None = None
        self.inverse: Tensor | None = None
        self.damping = 0.0
        if strategy == "identity":
            return
        if strategy in ("kfac", "ekfac"):
            self.basis = kfac.KroneckerEigenbasis(
                gradient_basis=tensors["gradient_eigenvectors"],
                gradient_eigenvalues=tensors["gradient_eigenvalues"],
                activation_basis=tensors.get("activation_eigenvectors"),
                activation_eigenvalues=tensors["activation_eigenvalues"],
                correction=tensors["lambda"] if strategy == "ekfac" else None,
            )
            if (
                strategy == "kfac"
            ):  # λ_S λ_Aᵀ (kronfluence does not clamp rounding negatives either)
                values_s = tensors["gradient_eigenvalues"].double()
                values_a = tensors["activation_eigenvalues"].double()
                denominator = values_s.unsqueeze(-1) * values_a.unsqueeze(-2)
            else:
                denominator = tensors["lambda"].double()
        else:
            denominator = tensors["lambda"].double()
        if damping is None:
            damping = HEURISTIC_DAMPING_SCALE * float(denominator.mean())
        self.damping = float(damping)
        self.inverse = 1.0 / (denominator + self.damping)  # float64, like kronfluence

    def apply(self, vectors: Tensor) -> Tensor:
        """Precondition a batch of gradient matrices.

        Args:
            vectors: ``(Q, groups, d_out, d_in')``.

        Returns:
            ``P(V)``, same shape and dtype.
        """
        if self.strategy == "identity":
            return vectors
        inverse = self.inverse.to(dtype=vectors.dtype, device=vectors.device)
        if self.basis is None:
            return vectors * inverse
        basis = kfac.KroneckerEigenbasis(
            gradient_basis=self.basis.gradient_basis.to(dtype=vectors.dtype, device=vectors.device),
            gradient_eigenvalues=self.basis.gradient_eigenvalues,
            activation_basis=None
            if self.basis.activation_basis is None
            else self.basis.activation_basis.to(dtype=vectors.dtype, device=vectors.device),
            activation_eigenvalues=self.basis.activation_eigenvalues,
        )
        return basis.unproject(basis.project(vectors) * inverse)

    def dense(self) -> Tensor:
        """The dense matrix of :meth:`apply` per group, ``(groups, d_out·d_in', d_out·d_in')``,
        in the row-major order of ``G`` (for tests on small layers)."""
        if self.inverse is None:
            raise ValueError(
                "Invalid strategy: 'identity' has no stored shape; its matrix is the identity"
            )
        groups, d_out, d_in = self.inverse.shape
        eye = (
            torch.eye(d_out * d_in, dtype=torch.float64)
            .reshape(-1, 1, d_out, d_in)
            .expand(-1, groups, -1, -1)
        )
        columns = self.apply(eye.contiguous())  # (d_out·d_in, groups, d_out, d_in)
        return columns.flatten(2).permute(1, 2, 0)
