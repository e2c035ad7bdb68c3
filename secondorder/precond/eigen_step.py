"""EK-FAC's step inside the Kronecker eigenbasis: damping rule, power and a cheap correction.

With ``X = Q_Gᵀ Ḡ Q_A`` the batch gradient in the layer's eigenbasis and ``Λ`` the corrected
eigenvalues (``(groups, d_out, d_in')``), the direction in the eigenbasis is::

    X ⊘ (Λ + λ_eff)^p                                  (then rotated back: Q_G · Q_Aᵀ)
    λ_eff = λ                 damping="absolute"   (George et al. 2018; the paper's form)
    λ_eff = λ · mean(Λ)       damping="relative"   (Grosse et al. 2023's heuristic, λ = 0.1)

``p = 1`` is the natural-gradient step of the paper. Measured on issue 14's transformer, ``Λ``
spans more than seven decades and its per-layer median sits 3-4 decades under its mean:
with an absolute ``λ`` the step is ``X/λ`` on > 99 % of the coordinates (heavy-ball SGD at
``lr/λ``, so ``lr`` hardly matters) and with a smaller ``λ`` it is dominated by the noise
directions with the smallest ``Λ``. The relative rule makes the damping independent of how
the loss is reduced (mean over examples or over examples × tokens scales ``Λ`` by ``T²``).

Correction estimators (``Λ``'s per-step input, George et al. 2018 §3 and their reference
code's ``ra`` option)::

    per_example:  mean_n (Q_Gᵀ G_n Q_A)^{⊙2}          the paper; needs every example's G_n
    batch:        N · X^{⊙2}                           the running-average proxy: free, since X
                                                       is computed for the step anyway

``E[N·X²] = E_n[(QᵀG_nQ)²]`` when the per-example gradients' mean is small against their
spread (the noise-dominated regime of mini-batch training); it over-estimates by
``(N−1)·mean²`` otherwise.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["DAMPING_RULES", "CORRECTION_ESTIMATORS", "effective_damping", "eigenbasis_direction",
           "fold_batch_correction", "rescale_restart"]

DAMPING_RULES = ("absolute", "relative")
CORRECTION_ESTIMATORS = ("batch", "per_example")


def effective_damping(correction: Tensor, damping: float, rule: str) -> Tensor | float:
    """``λ_eff``: ``damping`` (absolute) or ``damping·mean(Λ)`` per group (a tensor, no sync).

    Args:
        correction: ``Λ`` ``(groups, d_out, d_in')``.
        damping: ``λ > 0``.
        rule: ``"absolute"`` or ``"relative"``.

    Returns:
        A float, or ``(groups, 1, 1)`` for the relative rule (a floor of 1e-30 keeps an
        all-zero ``Λ`` finite).
    """
    if rule == "absolute":
        return damping
    return (correction.mean(dim=(-2, -1), keepdim=True) * damping).clamp_min(1e-30)


def eigenbasis_direction(
    projected: Tensor, correction: Tensor, damping: float, rule: str, power: float
) -> Tensor:
    """``X ⊘ (Λ + λ_eff)^p`` (module docstring); ``projected`` ``(…, groups, d_out, d_in')``."""
    denominator = correction + effective_damping(correction, damping, rule)
    if power != 1.0:
        denominator = denominator.pow(power)
    return projected / denominator


def fold_batch_correction(
    correction: Tensor, projected: Tensor, num_examples: int, decay: float
) -> None:
    """``Λ ← ρΛ + (1−ρ)·N·X^{⊙2}`` in place (the ``batch`` estimator)."""
    correction.mul_(decay).addcmul_(projected, projected, value=(1 - decay) * num_examples)


def rescale_restart(kfac_eigenvalues: Tensor, previous: Tensor | None) -> Tensor:
    """Restart ``Λ`` after a basis refresh from K-FAC's ``λ_G λ_Aᵀ`` at the previous scale.

    K-FAC's factors are means over positions, while ``Λ`` is a per-example (whole-sequence)
    second moment, so for ``T`` tokens ``λ_G λ_Aᵀ`` is about ``T``× smaller than the ``Λ``
    it replaces (measured 350-5,600× on issue 14's transformer). Matching the mean keeps the
    shape of K-FAC's spectrum and the scale already learnt. ``previous=None``: unchanged.
    """
    if previous is None:
        return kfac_eigenvalues
    new_mean = kfac_eigenvalues.mean(dim=(-2, -1), keepdim=True)
    old_mean = previous.mean(dim=(-2, -1), keepdim=True)
    return kfac_eigenvalues * (old_mean / new_mean.clamp_min(1e-30))
