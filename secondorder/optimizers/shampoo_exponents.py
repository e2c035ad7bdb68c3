"""Shampoo's root exponents: what ``inverse_exponent_override`` means in each mode.

Root mode (distributed_shampoo's ``RootInvShampooPreconditionerConfig``): one exponent per
tensor dim, ``1/(2·order)`` by default, 0 switching that dim's factor off. SOAP mode
(``EigenvalueCorrectedShampooPreconditionerConfig``): 0 on a dim skips its eigenbasis, and the
one positive value is the power of the corrected eigenvalues ``Λ`` (½ by default).
"""

from __future__ import annotations

from typing import Any

from secondorder.optimizers.validation import check_int, check_real

__all__ = ["block_exponents", "check_exponent_override", "soap_exponent"]


def block_exponents(order: int, override: dict[int, Any] | None, eigenvalue_corrected: bool) -> list[float]:
    """Root power per dim: ``1/(2·order)`` (½ for the SOAP denominator), or the override."""
    default = 0.5 if eigenvalue_corrected else 1.0 / (2 * max(order, 1))
    exponents = [default] * order
    if override and order in override:
        value = override[order]
        if isinstance(value, dict):
            for dim, exponent in value.items():
                exponents[dim] = float(exponent)
        else:
            exponents = [float(value)] * order
    return exponents


def soap_exponent(exponents: list[float]) -> float:
    """SOAP mode: the one positive exponent of a block's dims (the power of ``Λ/c₂``), ½ if none."""
    positive = {e for e in exponents if e > 0}
    if len(positive) > 1:
        raise ValueError(f"Invalid inverse_exponent_override: SOAP mode takes one exponent of Λ per order "
                         f"(0 on a dim skips its basis), got {sorted(positive)}")
    return positive.pop() if positive else 0.5


def check_exponent_override(override: Any, eigenvalue_correction: bool = False) -> None:
    if override is None:
        return
    if not isinstance(override, dict):
        raise TypeError(f"Invalid inverse_exponent_override: {override!r} (expected a dict)")
    for order, value in override.items():
        check_int("inverse_exponent_override order", order, low=1)
        values = value.values() if isinstance(value, dict) else [value]
        for exponent in values:
            check_real("inverse_exponent_override exponent", exponent, low=0.0)
        if isinstance(value, dict):
            for dim in value:
                check_int("inverse_exponent_override dim", dim, low=0)
                if dim >= order:
                    raise ValueError(f"Invalid inverse_exponent_override dim: {dim} (an order-{order} block "
                                     f"has dims 0..{order - 1})")
        if eigenvalue_correction:
            soap_exponent(list(values))
