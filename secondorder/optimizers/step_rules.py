"""Step-size and damping rules of Gauss-Newton-type optimizers, as pure functions.

* :func:`armijo_backtracking` — the stochastic Armijo line search on one batch (Vaswani et al.
  2019, "Painless Stochastic Gradient"), as used by exact Gauss-Newton (Korbit et al. 2024).
* :func:`adapt_damping` — the Levenberg-Marquardt trust-ratio rule for the damping ``λ``.

Both are plain functions over Python floats so that their rules can be tested on their own
(reference/gauss_newton.md §6).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["armijo_backtracking", "adapt_damping"]


def armijo_backtracking(
    evaluate: Callable[[float], float],
    loss: float,
    slope: float,
    initial_scale: float,
    *,
    armijo_c: float = 0.1,
    factor: float = 0.8,
    max_trials: int = 15,
    tolerance: float = 0.0,
) -> tuple[float, float, bool, int]:
    """Backtracking line search with the Armijo rule (Vaswani et al. 2019, on one batch).

    Tries ``s = s₀, s₀·factor, s₀·factor², …`` and accepts the first with
    ``L(s) ≤ L(0) + armijo_c · s · slope + tolerance``. If none of ``max_trials`` is accepted,
    the last tried ``s`` is returned (the reference solvers' rule).

    Args:
        evaluate: ``s ↦ L(w + s·Δ)`` for the candidate displacement ``Δ``.
        loss: ``L(w)``.
        slope: ``∇L(w)ᵀΔ`` (negative for a descent direction).
        initial_scale: ``s₀``.

    Returns:
        ``(s, L(w + sΔ), accepted, trials)``.
    """
    scale, value = initial_scale, math.nan
    for trial in range(1, max_trials + 1):
        value = evaluate(scale)
        if math.isfinite(value) and value <= loss + armijo_c * scale * slope + tolerance:
            return scale, value, True, trial
        if trial < max_trials:
            scale *= factor
    return scale, value, False, max_trials


def adapt_damping(
    damping: float,
    ratio: float | None,
    *,
    rho_low: float = 0.25,
    rho_high: float = 0.75,
    increase: float = 1.01,
    decrease: float = 0.99,
    min_damping: float = 1e-12,
    max_damping: float = 1e12,
) -> float:
    """Levenberg-Marquardt damping rule (reference/gauss_newton.md §6).

    ``ρ = actual / predicted`` decrease: ``ρ < rho_low`` ⇒ ``λ·increase``; ``ρ > rho_high`` ⇒
    ``λ·decrease``; otherwise (or ``ratio`` undefined, ``None``/NaN) unchanged. The result is
    clamped to ``[min_damping, max_damping]``.
    """
    if ratio is None or math.isnan(ratio):
        new = damping
    elif ratio < rho_low:
        new = damping * increase
    elif ratio > rho_high:
        new = damping * decrease
    else:
        new = damping
    return min(max(new, min_damping), max_damping)
