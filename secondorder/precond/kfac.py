"""K-FAC factors, their eigenbases and the EK-FAC eigenvalue correction, from captured layers.

Maths (reference/ekfac.md; George et al. 2018, "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis"; Grosse & Martens 2016 for convolutions). Per layer and group,
with ``ā`` the input rows (ones column last) and ``g`` the per-example output gradients of
:class:`~secondorder.precond.capture.LayerStats`, ``M`` = number of positions, ``N`` = examples::

    A = (1/M) Σ_{n,t} ā ā ᵀ         (d_in' × d_in')      "expand" convention: tokens and conv
    G = (1/M) Σ_{n,t} g gᵀ           (d_out × d_out)     locations are cases (ekfac.md §3.3)
    A = Q_A diag(λ_A) Q_Aᵀ,   G = Q_G diag(λ_G) Q_Gᵀ
    G_n = Σ_t g_{n,t} ā_{n,t}ᵀ       per-example gradient matrix (d_out × d_in')
    Λ = (1/N) Σ_n (Q_Gᵀ G_n Q_A)^{⊙2}                    the EK-FAC correction (§5)
    K-FAC eigenvalues: λ_G λ_Aᵀ;   preconditioning:  P(M) = Q_G [(Q_Gᵀ M Q_A) ⊘ (Λ + λ)] Q_Aᵀ

Layout: every tensor carries a leading *group* dim (1 except grouped conv), gradient matrices
are ``(groups, d_out, d_in')`` (:mod:`secondorder.precond.capture_layers`). Dense matrices
(:meth:`KroneckerEigenbasis.to_dense`) order coordinates group-major, then row-major over
``(d_out, d_in')``, so one group's K-FAC block is ``kron(G, A)``.

Embedding: ``ā`` is one-hot, so ``A`` is diagonal (token frequencies), stored as a vector
``(1, num_embeddings)`` with the identity as eigenbasis (``activation_basis is None``).

The correction never materialises per-example gradients when ``T = 1``
(``Λ = (1/N) (g̃^{⊙2})ᵀ ã^{⊙2}``, one matmul). With ``T > 1`` it processes examples in chunks
bounded by ``chunk_elements`` and per chunk picks the cheaper of (a) forming the chunk's
per-example matrices ``Q_Gᵀ G_n Q_A`` or (b) expanding the square over position pairs,
``Σ_n Σ_{t,s} (g̃_{nt} ⊙ g̃_{ns})(ã_{nt} ⊙ ã_{ns})ᵀ`` (memory ``∝ T²·(d_out + d_in')`` per example
instead of ``d_out·d_in'``).

:class:`KroneckerEigenbasis` is a plain container with ``state_dict()`` /
``from_state_dict()`` so influence queries can save and reload what an optimizer or a fitting
pass computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from secondorder.precond.capture import LayerStats
from secondorder.precond.capture_layers import CapturedLayer
from secondorder.precond.linalg import stable_eigh

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Upper bound on the elements of one temporary in :func:`eigenvalue_correction`."""


def _grouped(stats: LayerStats, layer: CapturedLayer, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(a (N, T, groups, d_in'), g (N, T, groups, d_out))`` in ``dtype`` (not embedding)."""
    a, g = stats.inputs.to(dtype), stats.output_grads.to(dtype)
    if layer.groups == 1:
        a, g = a.unsqueeze(2), g.unsqueeze(2)
    return a, g


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype curvature statistics are kept in: float32 for half types, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def kronecker_factors(
    layer: CapturedLayer, stats: LayerStats, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """The K-FAC factors of one window (means over positions).

    Args:
        layer: a linear, conv2d or embedding layer.
        stats: its captured statistics.
        dtype: computation/result dtype (default: :func:`statistics_dtype` of the grads).

    Returns:
        ``(A, G)``: ``A`` ``(groups, d_in', d_in')`` (embedding: the diagonal ``(1, V)``),
        ``G`` ``(groups, d_out, d_out)``.
    """
    dtype = dtype or statistics_dtype(stats.output_grads.dtype)
    count = max(stats.num_positions, 1)
    if layer.family == "embedding":
        g = stats.output_grads.to(dtype).reshape(-1, layer.out_features)
        index = stats.inputs.reshape(-1)
        valid = index >= 0
        counts = torch.zeros(layer.in_features, dtype=dtype, device=g.device)
        counts.index_add_(0, index[valid], torch.ones_like(index[valid], dtype=dtype))
        return (counts / count).unsqueeze(0), (g.transpose(0, 1) @ g / count).unsqueeze(0)
    a, g = _grouped(stats, layer, dtype)
    a = a.reshape(-1, a.shape[2], a.shape[3]).transpose(0, 1)  # (groups, N*T, d_in')
    g = g.reshape(-1, g.shape[2], g.shape[3]).transpose(0, 1)
    return a.transpose(1, 2) @ a / count, g.transpose(1, 2) @ g / count


def per_example_gradients(
    layer: CapturedLayer, stats: LayerStats, dtype: torch.dtype | None = None
) -> Tensor:
    """Materialise ``G_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` for every example (small layers, tests).

    Returns:
        ``(N, groups, d_out, d_in')``.
    """
    dtype = dtype or statistics_dtype(stats.output_grads.dtype)
    if layer.family == "embedding":
        g = stats.output_grads.to(dtype)
        index = stats.inputs
        onehot = torch.zeros(index.shape + (layer.in_features,), dtype=dtype, device=g.device)
        valid = index >= 0
        onehot[valid] = torch.nn.functional.one_hot(index[valid], layer.in_features).to(dtype)
        return torch.einsum("nto,nti->noi", g, onehot).unsqueeze(1)
    a, g = _grouped(stats, layer, dtype)
    return torch.einsum("ntgo,ntgi->ngoi", g, a)


def batch_gradient(layer: CapturedLayer, stats: LayerStats) -> Tensor:
    """``Σ_n G_n = Σ_{n,t} g_{n,t} ā_{n,t}ᵀ``: the window's gradient rebuilt from the rows.

    Equals ``layer.gradient_matrix(weight.grad, bias.grad)`` (times ``1/N`` for a mean loss)
    when nothing else touched ``.grad`` (all uses of a tied weight included); a mismatch by a
    power of two is a loss scale (AMP). Dense and embedding families.

    Returns:
        ``(groups, d_out, d_in')`` in :func:`statistics_dtype` of the gradients.
    """
    dtype = statistics_dtype(stats.output_grads.dtype)
    if layer.family == "embedding":
        g = stats.output_grads.to(dtype).reshape(-1, layer.out_features)
        index = stats.inputs.reshape(-1)
        valid = index >= 0
        total = torch.zeros(layer.in_features, layer.out_features, dtype=dtype, device=g.device)
        total.index_add_(0, index[valid], g[valid])
        return total.transpose(0, 1).unsqueeze(0)
    if layer.family != "dense":
        raise ValueError(f"Invalid layer: kind {layer.kind!r} has no gradient matrix")
    a, g = _grouped(stats, layer, dtype)
    return torch.einsum("ntgo,ntgi->goi", g, a)


def _rotate_rows(rows: Tensor, basis: Tensor | None) -> Tensor:
    """``rows (N, T, groups, d) @ basis (groups, d, d)`` per group (identity when ``None``)."""
    if basis is None:
        return rows
    return torch.einsum("ntgd,gde->ntge", rows, basis)


def eigenvalue_correction(
    layer: CapturedLayer,
    stats: LayerStats,
    gradient_basis: Tensor,
    activation_basis: Tensor | None,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """``Λ = (1/N) Σ_n (Q_Gᵀ G_n Q_A)^{⊙2}`` without materialising all ``G_n`` (module docstring).

    Args:
        gradient_basis: ``Q_G`` ``(groups, d_out, d_out)``.
        activation_basis: ``Q_A`` ``(groups, d_in', d_in')``, or ``None`` for the identity
            (embedding; or the diagonal strategy).
        chunk_elements: memory bound for temporaries (elements).

    Returns:
        ``(groups, d_out, d_in')`` in the dtype of ``gradient_basis``.
    """
    dtype = gradient_basis.dtype
    num_examples = max(stats.num_examples, 1)
    if layer.family == "embedding":
        return _embedding_correction(layer, stats, gradient_basis, num_examples)
    a, g = _grouped(stats, layer, dtype)
    a = _rotate_rows(a, activation_basis)
    g = _rotate_rows(g, gradient_basis)
    n_total, positions, groups, d_out = g.shape
    d_in = a.shape[-1]
    if positions == 1:
        return torch.einsum("ngo,ngi->goi", g[:, 0] ** 2, a[:, 0] ** 2) / num_examples
    pairwise_cost = positions * positions * groups * (d_out + d_in)
    direct_cost = groups * d_out * d_in + positions * groups * (d_out + d_in)
    per_example = min(pairwise_cost, direct_cost)
    chunk = max(1, chunk_elements // max(per_example, 1))
    result = torch.zeros(groups, d_out, d_in, dtype=dtype, device=g.device)
    for start in range(0, n_total, chunk):
        gc, ac = g[start : start + chunk], a[start : start + chunk]
        if direct_cost <= pairwise_cost:
            result += (torch.einsum("ntgo,ntgi->ngoi", gc, ac) ** 2).sum(0)
        else:
            gg = torch.einsum("ntgo,nsgo->ntsgo", gc, gc)
            aa = torch.einsum("ntgi,nsgi->ntsgi", ac, ac)
            result += torch.einsum("ntsgo,ntsgi->goi", gg, aa)
    return result / num_examples


def _embedding_correction(
    layer: CapturedLayer, stats: LayerStats, gradient_basis: Tensor, num_examples: int
) -> Tensor:
    """Correction for an embedding (identity input basis): scatter per (example, token) pairs."""
    dtype = gradient_basis.dtype
    g = stats.output_grads.to(dtype) @ gradient_basis[0]  # (N, T, D) rotated
    index = stats.inputs
    n_index = torch.arange(index.shape[0], device=index.device).unsqueeze(1).expand_as(index)
    valid = index >= 0
    keys = n_index[valid] * layer.in_features + index[valid]
    unique, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(unique.shape[0], g.shape[-1], dtype=dtype, device=g.device)
    sums.index_add_(0, inverse, g[valid])
    result = torch.zeros(layer.out_features, layer.in_features, dtype=dtype, device=g.device)
    result.index_add_(1, unique % layer.in_features, (sums**2).transpose(0, 1))
    return (result / num_examples).unsqueeze(0)


@dataclass
class KroneckerEigenbasis:
    """Eigenbases of one layer's K-FAC factors plus the optional EK-FAC correction.

    Attributes:
        gradient_basis: ``Q_G`` ``(groups, d_out, d_out)`` (columns are eigenvectors).
        gradient_eigenvalues: ``λ_G`` ``(groups, d_out)``.
        activation_basis: ``Q_A`` ``(groups, d_in', d_in')``, ``None`` = identity (embedding).
        activation_eigenvalues: ``λ_A`` ``(groups, d_in')``.
        correction: ``Λ`` ``(groups, d_out, d_in')`` or ``None`` (then K-FAC eigenvalues are used).
    """

    gradient_basis: Tensor
    gradient_eigenvalues: Tensor
    activation_basis: Tensor | None
    activation_eigenvalues: Tensor
    correction: Tensor | None = None

    @classmethod
    def from_factors(
        cls, activation_factor: Tensor, gradient_factor: Tensor
    ) -> KroneckerEigenbasis:
        """Eigendecompose ``A`` (or its diagonal ``(1, V)``) and ``G`` (``stable_eigh``).

        Raises:
            secondorder.precond.linalg.EigenFailure: a factor is not finite or eigh failed.
        """
        g_values, g_vectors = stable_eigh(gradient_factor)
        if activation_factor.dim() == 2:  # diagonal (embedding)
            return cls(g_vectors, g_values, None, activation_factor.clone())
        a_values, a_vectors = stable_eigh(activation_factor)
        return cls(g_vectors, g_values, a_vectors, a_values)

    def kfac_eigenvalues(self) -> Tensor:
        """K-FAC's eigenvalues ``λ_G λ_Aᵀ`` (negatives clamped), ``(groups, d_out, d_in')``."""
        return self.gradient_eigenvalues.clamp(min=0).unsqueeze(
            -1
        ) * self.activation_eigenvalues.clamp(min=0).unsqueeze(-2)

    def eigenvalues(self) -> Tensor:
        """The eigenvalues in use: the correction if present, else :meth:`kfac_eigenvalues`."""
        return self.correction if self.correction is not None else self.kfac_eigenvalues()

    def project(self, matrix: Tensor) -> Tensor:
        """``Q_Gᵀ M Q_A`` per group; ``matrix`` ``(groups, d_out, d_in')``."""
        rotated = self.gradient_basis.transpose(-1, -2) @ matrix
        return rotated if self.activation_basis is None else rotated @ self.activation_basis

    def unproject(self, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`project`: ``Q_G M Q_Aᵀ``."""
        rotated = self.gradient_basis @ matrix
        return (
            rotated
            if self.activation_basis is None
            else rotated @ self.activation_basis.transpose(-1, -2)
        )

    def precondition(self, matrix: Tensor, damping: float) -> Tensor:
        """``(F̂ + λI)⁻¹ vec(M)`` as a matrix: ``Q_G [(Q_Gᵀ M Q_A) ⊘ (Λ + λ)] Q_Aᵀ``.

        Args:
            matrix: ``(groups, d_out, d_in')`` or ``(k, groups, d_out, d_in')`` for ``k`` vectors.
            damping: ``λ > 0`` (Tikhonov damping of the Kronecker product, ekfac.md §6).
        """
        return self.unproject(self.project(matrix) / (self.eigenvalues() + damping))

    def dense_basis(self) -> Tensor:
        """``Q = blockdiag_j(kron(Q_G[j], Q_A[j]))``, ``(P, P)`` (small layers, tests)."""
        blocks = []
        for index in range(self.gradient_basis.shape[0]):
            a_basis = (
                torch.eye(self.activation_eigenvalues.shape[-1], dtype=self.gradient_basis.dtype)
                if self.activation_basis is None
                else self.activation_basis[index]
            )
            blocks.append(torch.kron(self.gradient_basis[index].contiguous(), a_basis.contiguous()))
        return torch.block_diag(*blocks)

    def to_dense(self, damping: float | None = None) -> Tensor:
        """Dense matrix (small layers only; order in the module docstring).

        Args:
            damping: ``None`` → the curvature ``Q diag(Λ) Qᵀ``; a number → the preconditioner
                ``Q diag(1/(Λ + λ)) Qᵀ``, i.e. :meth:`precondition` applied to the identity.
        """
        basis = self.dense_basis()
        values = self.eigenvalues().reshape(-1)
        diagonal = values if damping is None else 1.0 / (values + damping)
        return basis @ torch.diag(diagonal) @ basis.transpose(0, 1)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (``None`` entries omitted); loadable with :meth:`from_state_dict`."""
        names = (
            "gradient_basis",
            "gradient_eigenvalues",
            "activation_basis",
            "activation_eigenvalues",
            "correction",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> KroneckerEigenbasis:
        """Rebuild from :meth:`state_dict` output."""
        return cls(
            gradient_basis=state["gradient_basis"],
            gradient_eigenvalues=state["gradient_eigenvalues"],
            activation_basis=state.get("activation_basis"),
            activation_eigenvalues=state["activation_eigenvalues"],
            correction=state.get("correction"),
        )
