"""Start SINGD's factors at the scale of the first statistics (``init_scale="auto"``).

INGD moves ``K`` multiplicatively, ``K ← K(I − β₁ m_K)`` with ``m_K ≈ ½(tr̄(H_C)·H_K − I)``, so
from ``K₀ = I`` it needs about ``2·ln(c)/β₁`` factor updates to reach a fixed point ``c``
times larger or smaller. The fixed point's scale is that of ``U^{-1/2}`` (and ``G^{-1/2}``),
which moves with how the loss is reduced: for a mean over examples × 128 tokens read with
``loss_average="batch"`` (issue 14) ``G`` is ~10⁴× smaller than the identity, so at
``lr_cov = 1e-2`` and ``T = 10`` the factors were still ≈ 1.2·I after 100 steps and SINGD ran
as SGD. Starting from::

    K₀ = (tr̄(U) + √λ)^{-1/2} · I,      C₀ = (tr̄(G) + √λ)^{-1/2} · I

(``tr̄`` = trace / dimension, ``λ`` = damping split evenly between the factors as in K-FAC's
π-damping) puts ``tr̄(H_K)`` and ``tr̄(H_C)`` near 1 at the first update, so the factor
updates only have to learn the *shape* of the preconditioner, whatever the loss scaling.
"""

from __future__ import annotations

import math

from torch import Tensor

from .base import StructuredMatrix

__all__ = ["scale_to_statistics"]


def scale_to_statistics(
    K: StructuredMatrix, C: StructuredMatrix, rows_K: Tensor, rows_C: Tensor, damping: float
) -> None:
    """Multiply ``K`` and ``C`` in place by the module docstring's scalars.

    Args:
        K, C: the layer's factors (any structure: scaling the data scales the matrix).
        rows_K: ``(R, d_K)`` with ``U = rows_Kᵀ rows_K``; ``rows_C``: ``(R', d_C)`` for ``G``.
        damping: ``λ ≥ 0``.
    """
    root = math.sqrt(damping)
    for factor, rows in ((K, rows_K), (C, rows_C)):
        mean_eigenvalue = float((rows.float() ** 2).sum()) / rows.shape[-1]
        if not math.isfinite(mean_eigenvalue):
            continue
        scale = (mean_eigenvalue + root) ** -0.5 if mean_eigenvalue + root > 0 else 1.0
        factor.data.mul_(scale)
