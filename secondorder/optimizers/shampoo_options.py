"""Shampoo's options: each mode's defaults, group validation, and the root exponents.

``mode_defaults`` resolves the arguments whose default depends on the mode (root or SOAP);
``validate_shampoo_group`` raises ``Invalid <argument>`` errors for one param group.

Exponents: what ``inverse_exponent_override`` means in each mode.

Root mode (distributed_shampoo's ``RootInvShampooPreconditionerConfig``): one exponent per
tensor dim, ``1/(2·order)`` by default, 0 switching that dim's factor off. SOAP mode
(``EigenvalueCorrectedShampooPreconditionerConfig``): 0 on a dim skips its eigenbasis, and the
one positive value is the power of the corrected eigenvalues ``Λ`` (½ by default).
"""

from __future__ import annotations

from typing import Any

import torch

from secondorder.optimizers.base import check_lr
from secondorder.optimizers.validation import check_betas, check_choice, check_int, check_real
from secondorder.precond.diagonal import DIAGONAL_KINDS

__all__ = ["GRAFTING_KINDS", "WEIGHT_DECAY_KINDS", "block_exponents", "check_exponent_override", "mode_defaults",
           "soap_exponent", "validate_shampoo_group"]

GRAFTING_KINDS = ("none",) + DIAGONAL_KINDS
WEIGHT_DECAY_KINDS = ("decoupled", "decoupled_before_momentum", "l2")
FACTOR_DTYPES = (torch.float32, torch.float64)


def mode_defaults(soap: bool, options: dict[str, Any]) -> dict[str, Any]:
    """Fill the ``None`` arguments of ``Shampoo(...)`` with the mode's default (see its docstring).

    SOAP mode (measured with ``benchmarks/defaults_race.py``, issue 15): β₂ 0.99 for the factors,
    ``Λ`` and the graft; the step grafted to 3× Adam's norm averaged over steps (β 0.99); QR
    refreshes every 4 steps; bases from step 1. Root mode keeps distributed_shampoo's classic
    configuration (roots every 10 steps).
    """
    grafting = "adam" if options["grafting"] is None else options["grafting"]
    grafted_soap = soap and grafting != "none"
    resolved = {
        "grafting": grafting,
        "betas": ((0.9, 0.99) if soap else (0.9, 0.999)) if options["betas"] is None else options["betas"],
        "graft_beta2": (0.99 if soap else 0.999) if options["graft_beta2"] is None else options["graft_beta2"],
        "graft_scale": (3.0 if grafted_soap else 1.0) if options["graft_scale"] is None else options["graft_scale"],
        "graft_norm_beta": ((0.99 if grafted_soap else 0.0) if options["graft_norm_beta"] is None
                            else options["graft_norm_beta"]),
        "epsilon": (1e-8 if soap else 1e-12) if options["epsilon"] is None else options["epsilon"],
        "refresh_method": ("qr" if soap else "eigh") if options["refresh_method"] is None
        else options["refresh_method"],
    }
    frequency = options["precondition_frequency"]
    resolved["precondition_frequency"] = (4 if soap else 10) if frequency is None else frequency
    start = options["start_preconditioning_step"]
    if start is None:
        start = 1 if soap else resolved["precondition_frequency"]
    resolved["start_preconditioning_step"] = start
    if isinstance(resolved["betas"], list):
        resolved["betas"] = tuple(resolved["betas"])
    return resolved


def validate_shampoo_group(group: dict[str, Any]) -> None:
    """Raise ``Invalid <argument>`` for a bad value in one of Shampoo's param groups."""
    check_lr(group["lr"])
    group["betas"] = check_betas("betas", group["betas"], allow_one=(False, True))
    check_real("epsilon", group["epsilon"], low=0.0, low_inclusive=False)
    check_real("relative_epsilon", group["relative_epsilon"], low=0.0)
    check_real("weight_decay", group["weight_decay"], low=0.0)
    check_choice("weight_decay_type", group["weight_decay_type"], WEIGHT_DECAY_KINDS)
    check_real("momentum", group["momentum"], low=0.0, high=1.0, high_inclusive=False)
    check_real("dampening", group["dampening"], low=0.0, high=1.0, high_inclusive=False)
    if group["nesterov"] and group["momentum"] == 0:
        raise ValueError("Invalid nesterov: Nesterov momentum needs momentum > 0")
    check_int("precondition_frequency", group["precondition_frequency"], low=1)
    soap = group["eigenvalue_correction"]
    start, frequency = group["start_preconditioning_step"], group["precondition_frequency"]
    check_int("start_preconditioning_step", start, low=1, allow_inf=True)
    # Root mode: distributed_shampoo's rule (a start before f would take roots of factors
    # built from fewer than f gradients). SOAP mode: any start >= 1, bases from step 1
    # being its default (see start_preconditioning_step in the class docstring).
    if not soap and start < frequency:
        raise ValueError(f"Invalid start_preconditioning_step: {start} (root mode needs "
                         f">= precondition_frequency = {frequency}, as distributed_shampoo)")
    check_int("max_preconditioner_dim", group["max_preconditioner_dim"], low=1, allow_inf=True)
    check_choice("grafting", group["grafting"], GRAFTING_KINDS)
    check_real("graft_beta2", group["graft_beta2"], low=0.0, high=1.0)
    check_real("graft_epsilon", group["graft_epsilon"], low=0.0, low_inclusive=False)
    check_real("graft_scale", group["graft_scale"], low=0.0, low_inclusive=False)
    check_real("graft_norm_beta", group["graft_norm_beta"], low=0.0, high=1.0, high_inclusive=False)
    check_choice("factor_dtype", group["factor_dtype"], FACTOR_DTYPES)
    check_choice("refresh_method", group["refresh_method"], ("eigh", "qr") if soap else ("eigh", "newton"))
    check_exponent_override(group["inverse_exponent_override"], soap)
    if not isinstance(group["packed_factors"], bool):
        raise TypeError(f"Invalid packed_factors: {group['packed_factors']!r} (expected a bool)")


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
