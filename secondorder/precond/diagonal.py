"""Diagonal (elementwise) second-moment preconditioners.

They serve as Shampoo's grafting methods (Agarwal et al. 2020, "Disentangling Adaptive
Gradient Methods from Learning Rates"), as the diagonal fallback for parameters that a
layer-based optimizer cannot precondition, and for 1-D parameters. Every tensor here has the
shape of the block it preconditions.

=========  ===================================  =====================================
kind       second-moment update ``V``            direction ``D(g)``
=========  ===================================  =====================================
sgd        none                                  ``g``
adagrad    ``V += g ⊙ g``                        ``g / (sqrt(V) + ε)``
rmsprop    ``V = β V + (1 − β) g ⊙ g``           ``g / (sqrt(V) + ε)``
adam       as rmsprop                            ``g / (sqrt(V) / sqrt(1 − β^t) + ε)``
=========  ===================================  =====================================

The Adam form divides ``sqrt(V)`` by ``sqrt(1 − β^t)`` (torch.optim.Adam's operation order),
so the suite's degenerate limits equal torch.optim to float32 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder.precond.linalg import keep_where

DIAGONAL_KINDS = ("sgd", "adagrad", "rmsprop", "adam")


def needs_second_moment(kind: str) -> bool:
    """Whether ``kind`` keeps a second-moment tensor ``V``."""
    return kind != "sgd"


def update_second_moment(kind: str, second_moment: Tensor, grad: Tensor, beta2: float) -> None:
    """Fold ``grad ⊙ grad`` into ``second_moment`` in place (see the module table).

    Args:
        kind: one of :data:`DIAGONAL_KINDS`.
        second_moment: ``V``, same shape as ``grad``.
        grad: the (raw) gradient block.
        beta2: EMA rate for rmsprop/adam (ignored for adagrad).
    """
    if kind == "adagrad":
        second_moment.addcmul_(grad, grad)
    elif kind in ("rmsprop", "adam"):
        second_moment.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def diagonal_direction(
    kind: str, second_moment: Tensor | None, grad: Tensor, *, step: int, beta2: float, epsilon: float
) -> Tensor:
    """The diagonal method's search direction for ``grad`` (see the module table).

    Args:
        kind: one of :data:`DIAGONAL_KINDS`.
        second_moment: ``V`` (unused for sgd).
        grad: the (filtered) gradient to precondition, same shape as ``V``.
        step: ``t >= 1``, for Adam's bias correction.
        beta2: Adam's ``β``.
        epsilon: added to the denominator.

    Returns:
        A new tensor shaped like ``grad``.
    """
    if kind == "sgd":
        return grad.clone()
    denominator = second_moment.sqrt()
    if kind == "adam":
        denominator.div_(math.sqrt(1 - beta2**step))
    return grad / denominator.add_(epsilon)


def update_second_moments(
    kind: str, second_moments: list[Tensor], grads: list[Tensor], beta2: float, keep: Tensor | None = None
) -> None:
    """:func:`update_second_moment` for many blocks at once (``torch._foreach_*`` kernels).

    Same arithmetic as the single-tensor form, so results are bit-identical to it.
    ``keep`` (optional bool tensor ``(len(grads),)``, from
    :func:`~secondorder.precond.linalg.finite_or_zero`): where False that ``V`` is left exactly
    as it is, with no host synchronisation (the grad must then be zeros).
    """
    if not second_moments or kind == "sgd":
        return
    if kind == "adagrad":
        torch._foreach_addcmul_(second_moments, grads, grads)  # a zero grad adds nothing
        return
    if keep is None:
        torch._foreach_mul_(second_moments, beta2)
    else:
        decays = keep_where(keep, beta2, 1.0, second_moments[0].dtype)
        torch._foreach_mul_(second_moments, list(decays.unbind()))
    torch._foreach_addcmul_(second_moments, grads, grads, value=1 - beta2)


def diagonal_directions(
    kind: str, second_moments: list[Tensor] | None, grads: list[Tensor], *, steps: list[int], beta2: float,
    epsilon: float,
) -> list[Tensor]:
    """:func:`diagonal_direction` for many blocks at once; ``steps`` holds each block's ``t``."""
    if not grads:
        return []
    if kind == "sgd":
        return [grad.clone() for grad in grads]
    denominators = torch._foreach_sqrt(second_moments)
    if kind == "adam":
        torch._foreach_div_(denominators, [math.sqrt(1 - beta2**step) for step in steps])
    torch._foreach_add_(denominators, epsilon)
    return torch._foreach_div(grads, denominators)
