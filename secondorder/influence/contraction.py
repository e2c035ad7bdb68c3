"""Contracting preconditioned query gradients with training rows: the scoring inner loop.

For one layer, group and query ``q`` the preconditioned query gradient of a K-FAC / EK-FAC
strategy is ``P_q = Q_S M_q Q_Aᵀ`` with ``M_q = (Q_Sᵀ V_q Q_A) ⊘ (Λ + λ)``, and a training
example's gradient is ``G_n = Σ_t g_{nt} ā_{nt}ᵀ``. Because the bases are orthogonal::

    ⟨P_q, G_n⟩ = ⟨M_q, Q_Sᵀ G_n Q_A⟩ = Σ_t (Q_Sᵀ g_{nt})ᵀ M_q (Q_Aᵀ ā_{nt})

so the score can be taken in either basis (Grosse et al. 2023, §3.2, precondition once per
query batch, contract many training examples):

* **original basis**: unproject every ``M_q`` once (``Q·d_out·d_in'·(d_out + d_in')``) and
  contract it with the plain training gradients;
* **eigenbasis**: keep ``M_q`` and rotate the training side instead, either its rows
  (``T·(d_out² + d_in'²)`` per example, cheap for ``T = 1`` rows such as an MLP's or an
  LM head's, where ``V_q`` and ``G_n`` are rank one) or its gradient matrix
  (``d_out·d_in'·(d_out + d_in')`` per example).

:class:`PreparedQuery` keeps ``M_q`` and picks, at the first training batch (when the number of
training positions is known), the cheaper of the two for the whole pass; the query side is
projected from its rows or its matrix, whichever is cheaper. The query projection never
materialises ``P_q`` in the eigenbasis mode, which removes the two dense basis products per
query that dominate scoring for wide layers. The scores are the same up to rounding.

Pairwise scores contract the materialised per-example gradients of one training batch
(``(N, groups·d_out·d_in')``, one matmul with all queries); per-token scores contract rows,
``Σ_t g_tᵀ P_q ā_t``. With ``rank`` the query matrices are kept as a rank-``k`` SVD ``L Rᵀ``
(in the basis the pass uses; memory ``k·(d_out + d_in')`` per query instead of ``d_out·d_in'``). Per training batch
the cheaper of two contractions is taken: through the factors and the rows
(``N·T·k·(d_out + d_in')`` per query, no ``d_out × d_in'`` matrix: single-position layers) or
by decompressing the batch's queries and one dense product (``d_out·d_in'·(k + N)`` per
query: layers with many positions, such as a language model's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from secondorder.influence.collect import LayerRows
from secondorder.influence.statistics import LayerPreconditioner, per_example_gradients
from secondorder.precond.linalg import randomized_low_rank

__all__ = ["PreparedQuery", "low_rank_factors"]


def low_rank_factors(
    matrices: Tensor, rank: int, *, full_svd: bool = False, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Rank-``k`` factorisation ``M ≈ L Rᵀ`` of a batch of matrices by SVD.

    Args:
        matrices: ``(..., m, n)``.
        rank: ``k``; clipped to ``min(m, n)``.
        full_svd: exact ``torch.linalg.svd`` instead of the randomised one
            (Halko et al. 2011, :func:`secondorder.precond.linalg.randomized_low_rank`).
        generator: randomness of the randomised SVD (a CPU generator; the randomised SVD
            runs on the CPU and its factors are moved back to ``matrices.device``).

    Returns:
        ``(L (..., m, k) = U·diag(s), R (..., n, k) = V)``.
    """
    rank = min(rank, matrices.shape[-1], matrices.shape[-2])
    if full_svd or rank == min(matrices.shape[-2:]):
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        return u[..., :rank] * s[..., None, :rank], vh[..., :rank, :].transpose(-1, -2)
    batch_shape = matrices.shape[:-2]
    flat = matrices.reshape(-1, *matrices.shape[-2:])
    lefts, rights = [], []
    for matrix in flat.cpu():  # the generator is a CPU one; the matrices are small
        u, s, v = randomized_low_rank(matrix, rank, generator=generator, power_iterations=4)
        lefts.append(u * s)
        rights.append(v)
    return (
        torch.stack(lefts).reshape(*batch_shape, -1, rank).to(matrices.device),
        torch.stack(rights).reshape(*batch_shape, -1, rank).to(matrices.device),
    )


def _rotate(rows: Tensor, basis: Tensor | None) -> Tensor:
    """``rows (N, T, groups, d) @ basis (groups, d, d)`` per group (identity when ``None``)."""
    if basis is None:
        return rows
    if basis.shape[0] == 1:
        return rows @ basis[0]
    return torch.einsum("ntgd,gde->ntge", rows, basis)


def _outer_sum(g: Tensor, a: Tensor) -> Tensor:
    """``Σ_t g_t a_tᵀ`` per example and group: ``(N, groups, d_out, d_in')``."""
    if g.shape[1] == 1:
        return g[:, 0, :, :, None] * a[:, 0, :, None, :]
    return torch.einsum("ntgo,ntgi->ngoi", g, a)


_CHUNK_ELEMENTS = 1 << 24  # bound on the elements of one per-token temporary


def _token_scores(full: Tensor, a: Tensor, g: Tensor) -> Tensor:
    """``Σ_{o,i} g_{nto} P_{qoi} a_{nti}`` → ``(Q, N, T)``: one matmul over the wider side of
    ``P``, an elementwise product over the narrower one, in chunks of queries."""
    queries, groups, d_out, d_in = full.shape
    examples, positions = g.shape[:2]
    if groups != 1:
        return torch.einsum("qgoi,ntgi,ntgo->qnt", full, a, g)
    rows = examples * positions
    a, g, matrices = a.reshape(1, rows, d_in), g.reshape(1, rows, d_out), full[:, 0]
    chunk = max(1, _CHUNK_ELEMENTS // max(rows * min(d_out, d_in), 1))
    parts = []
    for start in range(0, queries, chunk):
        block = matrices[start : start + chunk]
        if d_in <= d_out:
            parts.append(((g @ block) * a).sum(-1))  # (chunk, rows, d_in)
        else:
            parts.append(((a @ block.transpose(-1, -2)) * g).sum(-1))
    return torch.cat(parts).reshape(queries, examples, positions)


class PreparedQuery:
    """One layer's preconditioned query gradients for one query batch (module docstring).

    Args:
        preconditioner: the layer's :class:`LayerPreconditioner`.
        rows: the layer's rows of the query batch's measurement.
        num_train: training examples this rank will contract (for the cost choice).
        rank: low-rank compression (``None`` = exact).
        full_svd, generator: as for :func:`low_rank_factors`.
    """

    def __init__(
        self,
        preconditioner: LayerPreconditioner,
        rows: LayerRows,
        num_train: int,
        rank: int | None = None,
        full_svd: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.preconditioner = preconditioner
        self.num_train = max(num_train, 1)
        self.rank, self.full_svd, self.generator = rank, full_svd, generator
        basis = preconditioner.basis
        self.can_rotate = basis is not None and rows.layer.kind != "embedding"
        self.eigen: bool | None = None  # decided at the first training batch
        self.full: Tensor | None = None
        self.left = self.right = None
        if self.can_rotate:
            a, g = rows.grouped()
            queries, positions, _, d_out = g.shape
            d_in = a.shape[-1]
            dtype = g.dtype
            self.gradient_basis = basis.gradient_basis.to(dtype=dtype, device=g.device)
            self.activation_basis = basis.activation_basis.to(dtype=dtype, device=g.device)
            if self._rows_first(positions, d_out, d_in):
                projected = _outer_sum(
                    _rotate(g, self.gradient_basis), _rotate(a, self.activation_basis)
                )
            else:
                projected = self._project(per_example_gradients(rows))
            inverse = preconditioner.inverse.to(dtype=dtype, device=g.device)
            self.num_queries = queries
            self.matrices = projected * inverse  # M_q, (Q, groups, d_out, d_in')
            if rank is not None:
                # compress now (bounded memory for many queries); rotating the factors later
                # is exact: Q_S (L Rᵀ) Q_Aᵀ = (Q_S L)(Q_A R)ᵀ
                self._finish(self.matrices)
                self.matrices = None
        else:
            self.eigen = False
            self._finish(preconditioner.apply(per_example_gradients(rows)))

    @classmethod
    def stack(cls, parts: list[PreparedQuery]) -> PreparedQuery:
        """One layer's query batches as one (queries concatenated in order), before any
        scoring: a training batch is then contracted with every query in one product per
        layer (one large matmul instead of one small one per query batch, and one query
        decompression per layer and training batch)."""
        if len(parts) == 1:
            return parts[0]
        if any(part.can_rotate and part.eigen is not None for part in parts):
            raise ValueError("Invalid parts: stack prepared queries before scoring them")
        merged = cls.__new__(cls)
        merged.__dict__.update(parts[0].__dict__)
        for field in ("matrices", "full", "left", "right"):
            values = [getattr(part, field) for part in parts]
            if values[0] is not None:
                setattr(merged, field, torch.cat(values))
        if merged.can_rotate:
            merged.num_queries = sum(part.num_queries for part in parts)
        return merged

    @staticmethod
    def _rows_first(positions: int, d_out: int, d_in: int) -> bool:
        """Rotating rows is cheaper than rotating the formed gradient matrix."""
        return positions * (d_out * d_out + d_in * d_in) <= d_out * d_in * (d_out + d_in)

    def _project(self, matrices: Tensor) -> Tensor:
        return self.gradient_basis.transpose(-1, -2) @ matrices @ self.activation_basis

    def _low_rank_rows_cheaper(
        self, examples: int, positions: int, d_out: int, d_in: int
    ) -> bool:
        """Contract the rank-``k`` factors with the rows (``N·T·k·(d_out + d_in')`` per query)
        rather than decompress the queries and take the dense product
        (``d_out·d_in'·(k + N)`` per query, plus forming the ``N`` gradients)."""
        rank = self.left.shape[-1] if self.left is not None else self.rank
        rows = examples * positions * rank * (d_out + d_in)
        dense = d_out * d_in * (rank + examples)
        return rows <= dense

    def _finish(self, matrices: Tensor) -> None:
        if self.rank is None:
            self.full = matrices
        else:
            self.left, self.right = low_rank_factors(
                matrices, self.rank, full_svd=self.full_svd, generator=self.generator
            )

    def _choose(self, positions: int, d_out: int, d_in: int, per_token: bool) -> None:
        """Pick the basis of the whole pass from its cost (module docstring)."""
        queries = self.num_queries
        rotate_rows = positions * (d_out * d_out + d_in * d_in)
        rotate_matrix = d_out * d_in * (d_out + d_in)
        if per_token:
            train_side = rotate_rows  # rows are contracted directly
        else:
            train_side = min(rotate_rows, rotate_matrix)
        unproject = queries * d_out * d_in * (d_out + d_in)
        self.eigen = self.num_train * train_side < unproject
        if self.rank is not None:  # already compressed in the eigenbasis
            if not self.eigen:
                self.left = self.gradient_basis @ self.left
                self.right = self.activation_basis @ self.right
        elif self.eigen:
            self._finish(self.matrices)
        else:
            self._finish(
                self.gradient_basis @ self.matrices @ self.activation_basis.transpose(-1, -2)
            )
        self.matrices = None

    def scores(self, rows: LayerRows, per_token: bool) -> tuple[Tensor, Tensor | None]:
        """``(Q, N)`` scores and, when ``per_token``, ``(Q, N, T)`` against training rows."""
        a, g = rows.grouped()
        _, positions, _, d_out = g.shape
        d_in = a.shape[-1]
        if self.eigen is None:
            self._choose(positions, d_out, d_in, per_token)
        contract_rows = per_token or (
            self.rank is not None and self._low_rank_rows_cheaper(len(g), positions, d_out, d_in)
        )
        if self.eigen and (contract_rows or self._rows_first(positions, d_out, d_in)):
            a, g = _rotate(a, self.activation_basis), _rotate(g, self.gradient_basis)
            gradients = None if contract_rows else _outer_sum(g, a)
        elif self.eigen:
            gradients = self._project(per_example_gradients(rows))
        else:
            gradients = None if contract_rows else per_example_gradients(rows)
        if self.full is None and not contract_rows:
            # decompress this batch's queries: Q·d_out·d_in'·k, amortised over the batch
            full = self.left @ self.right.transpose(-1, -2)
            return full.flatten(1) @ gradients.flatten(1).transpose(0, 1), None
        if self.full is not None:
            if per_token:
                tokens = _token_scores(self.full, a, g)
                return tokens.sum(-1), tokens
            return self.full.flatten(1) @ gradients.flatten(1).transpose(0, 1), None
        grads_left = torch.einsum("ntgo,qgok->qntgk", g, self.left)
        inputs_right = torch.einsum("ntgi,qgik->qntgk", a, self.right)
        tokens = (grads_left * inputs_right).sum(dim=(3, 4))
        return tokens.sum(-1), tokens if per_token else None
