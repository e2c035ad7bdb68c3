"""The inverse-free factor update of INGD / SINGD and its IKFAC variant (pure maths).

Per layer the preconditioner is ``(C Cᵀ) ⊗ (K Kᵀ)`` with ``K`` (``d_in' × d_in'``, input side,
bias as last column) and ``C`` (``d_out × d_out``) structured (:mod:`.base`). With
``H_K = Π̂(Kᵀ U K)``, ``H_C = Π̂(Cᵀ G C)`` (``U``, ``G`` the layer's input and output-gradient
second moments) Lin, Dangel et al. 2024 (SINGD, Fig. 3; reference/singd.md §4–§6) update::

    INGD:   m_K ← α₁ m_K + s ( tr̄(H_C)·H_K + λ·tr̄(Π̂(CᵀC))·Π̂(KᵀK) − I )
    IKFAC:  m_K ←          s ( H_K + λ·Π̂(KᵀK) − I )                        (α₁ = 0)
    K ← K − β₁ K m_K                               (first-order truncation of K·exp(−β₁ m_K))

and symmetrically for ``C`` (``tr̄(H_K)``, ``tr̄(Π̂(KᵀK))``), with ``s = ½`` (``½(1 − α₁)`` and
``β₁ ← β₁ / max(1, max|m|)`` under ``normalize_lr_cov``). No inverse, root or decomposition
is ever taken, so every factor dtype (bf16 included) works. IKFAC makes ``K Kᵀ`` track
``(EMA(U) + λI)⁻¹`` to first order in ``β₁`` (the SINGD paper's theorem; tests pin it).

The natural gradient of a gradient matrix ``Ĝ`` (``d_out × d_in'``) is ``C Cᵀ Ĝ K Kᵀ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from secondorder.precond.capture import loss_average_scale
from secondorder.precond.linalg import all_finite as tensors_finite

from .base import StructuredMatrix


@dataclass
class FactorUpdate:
    """Hyperparameters of one factor update (all plain Python numbers).

    ``damping`` λ, ``alpha1`` α₁ (Riemannian momentum; ignored when ``kfac_like``),
    ``lr_cov`` β₁, ``kfac_like`` (IKFAC), ``normalize_lr_cov``.
    """

    damping: float
    alpha1: float
    lr_cov: float
    kfac_like: bool = False
    normalize_lr_cov: bool = False


def scaled_rows(
    inputs: Tensor,
    output_grads: Tensor,
    *,
    num_examples: int,
    num_positions: int,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> tuple[Tensor, Tensor]:
    """Rows ``A`` (R, d_in') and ``B`` (R, d_out) with ``U = AᵀA``, ``G = BᵀB`` (singd's scaling).

    Args:
        inputs: ``a`` of shape ``(N, T, d_in')`` (ones column last for a bias).
        output_grads: ``g`` of shape ``(N, T, d_out)``, scaled so that ``Σ_t g aᵀ`` is the
            gradient of example ``n``'s loss (:class:`secondorder.precond.capture.LayerStats`).
        num_examples: ``N``; ``num_positions``: the ``N·T`` real positions.
        approx: ``"expand"`` (positions become rows, ``R = N·T``) or ``"reduce"`` (``a``
            averaged and ``g`` summed over positions, ``R = N``); Eschenhagen et al. 2023.
        loss_average: ``"batch"`` (loss = mean over the N examples: ``G = (1/N) Σ g gᵀ``),
            ``"batch+sequence"`` (mean over the ``N·T`` positions: ``G = (N·T/N²) Σ g gᵀ``)
            or ``None`` (sum: ``G = Σ g gᵀ``). ``U`` is always the mean over rows.

    Matches singd 0.0.5's ``process_input`` / ``process_grad_output`` (reference/singd.md §10).
    """
    if approx == "expand":
        a = inputs.reshape(-1, inputs.shape[-1])
        g = output_grads.reshape(-1, output_grads.shape[-1])
    elif approx == "reduce":
        a = inputs.mean(1)
        g = output_grads.sum(1)
    else:
        raise ValueError(f"Invalid kfac_approx: {approx!r} (expected 'expand' or 'reduce')")
    g_scale = loss_average_scale(loss_average, num_examples, num_positions)
    return a / math.sqrt(a.shape[0]), g * math.sqrt(g_scale)


def momentum_increment(
    H: StructuredMatrix,
    self_gram: StructuredMatrix,
    other_H_trace: Tensor | float,
    other_gram_trace: Tensor | float,
    hyper: FactorUpdate,
) -> StructuredMatrix:
    """``s (c_H·H + λ c_G·Π̂(XᵀX) − I)`` for one factor ``X`` (without the α₁ term).

    ``c_H = tr̄`` of the other factor's ``H`` and ``c_G = tr̄(Π̂)`` of the other factor's Gram
    matrix in INGD mode; both 1 under ``kfac_like``. Consumes ``H`` (scaled in place and
    returned); ``self_gram`` is left unchanged.
    """
    scale = 0.5 * ((1.0 - hyper.alpha1) if hyper.normalize_lr_cov and not hyper.kfac_like else 1.0)
    coeff_H = 1.0 if hyper.kfac_like else other_H_trace
    coeff_G = hyper.damping * (1.0 if hyper.kfac_like else other_gram_trace)
    increment = H.mul_(coeff_H)
    increment.data.add_(self_gram.data * coeff_G)
    return increment.diag_add_(-1.0).mul_(scale)


def factor_steps(
    K: StructuredMatrix,
    C: StructuredMatrix,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    hyper: FactorUpdate,
    m_K: StructuredMatrix | None = None,
    m_C: StructuredMatrix | None = None,
) -> tuple[StructuredMatrix, StructuredMatrix, StructuredMatrix, StructuredMatrix]:
    """One SINGD factor step (module docstring) as ``(new m_K, new m_C, ΔK, ΔC)`` with the
    new factors ``K − ΔK``, ``C − ΔC`` (``ΔK = β₁ K m_K``).

    ``m_K``/``m_C`` are the previous momenta (``None`` = zero). ``H_K`` and ``H_C`` are
    consumed (overwritten); ``K``, ``C`` and the old momenta are left unchanged, so the caller
    can check the results before it writes them into its state.
    """
    KtK, CtC = K.inner(), C.inner()
    traces = H_K.average_trace(), H_C.average_trace(), KtK.average_trace(), CtC.average_trace()
    new_m_K = momentum_increment(H_K, KtK, traces[1], traces[3], hyper)
    new_m_C = momentum_increment(H_C, CtC, traces[0], traces[2], hyper)
    alpha1 = 0.0 if hyper.kfac_like else hyper.alpha1
    if alpha1 != 0.0:
        if m_K is not None:
            new_m_K.add_(m_K, alpha=alpha1)
        if m_C is not None:
            new_m_C.add_(m_C, alpha=alpha1)
    beta_K = beta_C = hyper.lr_cov
    if hyper.normalize_lr_cov:
        beta_K = beta_K / max(1.0, float(new_m_K.max_abs()))
        beta_C = beta_C / max(1.0, float(new_m_C.max_abs()))
    return new_m_K, new_m_C, (K @ new_m_K).mul_(beta_K), (C @ new_m_C).mul_(beta_C)


def update_factors(
    K: StructuredMatrix,
    C: StructuredMatrix,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    hyper: FactorUpdate,
    m_K: StructuredMatrix | None = None,
    m_C: StructuredMatrix | None = None,
) -> tuple[StructuredMatrix, StructuredMatrix, StructuredMatrix, StructuredMatrix]:
    """:func:`factor_steps` applied out of place: returns new ``(K, C, m_K, m_C)``."""
    new_m_K, new_m_C, step_K, step_C = factor_steps(K, C, H_K, H_C, hyper, m_K, m_C)
    return K - step_K, C - step_C, new_m_K, new_m_C


def natural_gradient(K: StructuredMatrix, C: StructuredMatrix, grad_matrix: Tensor) -> Tensor:
    """``C Cᵀ Ĝ K Kᵀ`` for ``Ĝ`` of shape ``(d_out, d_in')``, computed in the factors' dtype
    (``K``'s for the right product, ``C``'s for the left) and returned in ``Ĝ``'s dtype."""
    right = K.gram_matmul(grad_matrix.T.to(K.dtype)).T
    return C.gram_matmul(right.to(C.dtype)).to(grad_matrix.dtype)


def all_finite(*matrices: StructuredMatrix) -> bool:
    """Whether every stored value is finite (:func:`secondorder.precond.linalg.all_finite` on
    the matrices' stored values)."""
    return tensors_finite(*(m.data for m in matrices))
