"""Learning-rate grafting onto Adam's per-layer step norm (Agarwal et al. 2020).

"Disentangling Adaptive Gradient Methods from Learning Rates" (Agarwal, Anil, Hazan, Koren,
Zhang; arXiv 2002.11803): take the *direction* of one method and the *step length* of
another. Here the direction ``P`` is a curvature method's preconditioned gradient (EK-FAC,
AdaFisher, SINGD) and the length is Adam's for the same layer::

    v ← β₂ v + (1 − β₂) ḡ ⊙ ḡ                         (per parameter of the layer)
    D = ḡ / (√(v / (1 − β₂ᵗ)) + ε)                     Adam's direction without momentum
    P ← P · ‖D‖_F / (‖P‖_F + 1e-16)                   norms over the layer's weight and bias

Why the curvature optimizers use it by default (issue 14): their preconditioners carry the
scale of the curvature statistics, which moves by orders of magnitude with how the loss is
reduced (mean over examples or over examples × tokens), with damping, and with a
normalisation (AdaFisher's min-max). At ``lr = 1e-3`` one method then takes SGD-sized steps
and another diverges, so "the default lr" means nothing across workloads. Grafting keeps the
curvature's direction (what these methods claim to improve) and makes ``lr`` mean what it
means for Adam, per layer, so the defaults carry over from AdamW. Momentum is applied by the
caller *after* grafting, so the momentum-filtered step has Adam's scale as well.

``"adam_cap"`` keeps the method's own step length but shrinks a layer's step to Adam's norm
where it is longer (``P ← P · min(1, ‖D‖_F / ‖P‖_F)``): a trust region for methods whose
own step is right most of the time but can blow up, e.g. an inverse Kronecker factor whose
statistics vanish late in training (SINGD's default, issue 14).

``norm_beta > 0`` grafts to *averaged* norms (``smoothed_norm_ratio``): the step is
``P · N̄_D / N̄_P`` with ``N̄`` exponential averages of ``‖D‖`` and ``‖P‖`` over the layer's
steps, so the long-run step length is Adam's while the method keeps its own step-to-step
variation: a second-order direction is short where the rotated gradient is noise and long
where it is consistent, which per-step grafting throws away (Shampoo's SOAP mode, issue 15).

Everything stays on the device: the scale is a 0-d tensor (no host synchronisation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from secondorder.precond.linalg import keep_where

__all__ = ["GRAFT_KINDS", "adam_graft", "graft_state_keys", "smoothed_norm_ratio"]

GRAFT_KINDS = ("adam", "adam_cap", "none")
"""``"adam"``: rescale to Adam's per-layer norm; ``"adam_cap"``: the method's own step length,
at most Adam's per-layer norm; ``"none"``: the method's own step length."""

_SECOND_MOMENT = "graft_exp_avg_sq"
_STEP = "graft_step"
_NORM_AVERAGES = ("graft_norm_avg", "direction_norm_avg")


def graft_state_keys() -> tuple[str, str]:
    """The per-parameter state entries the graft adds (second moment, step count)."""
    return _SECOND_MOMENT, _STEP


def adam_graft(
    states: list[dict],
    grads: list[Tensor],
    directions: list[Tensor],
    *,
    beta2: float,
    eps: float,
    numerators: list[Tensor] | None = None,
    kind: str = "adam",
    limit: float = 1.0,
) -> list[Tensor]:
    """Rescale one layer's ``directions`` to the Frobenius norm of Adam's direction.

    Args:
        states: per parameter of the layer, its optimizer state dict (gets
            ``graft_exp_avg_sq`` shaped like the gradient and an int64 0-d ``graft_step``).
        grads: the raw gradients ``ḡ`` (weight, then bias), any float dtype.
        directions: the method's directions ``P`` for the same parameters (same shapes).
        numerators: what Adam's direction divides (default ``grads``); a method that applies
            momentum before preconditioning (AdaFisher) passes its ``m̂`` so that both norms
            are of momentum-filtered steps, ``‖m̂ ⊘ (√v̂ + ε)‖``.
        beta2: Adam's second-moment rate ``β₂ ∈ [0, 1)``.
        eps: Adam's ``ε > 0``.
        kind: ``"adam"`` (set the norm to ``c·‖D‖``) or ``"adam_cap"`` (at most ``c·‖D‖``).
        limit: ``c > 0``; a caller whose momentum is a heavy-ball sum ``buf ← α·buf + d``
            passes ``1 − α`` so that the sum, not each ``d``, has Adam's size.

    Returns:
        ``P · r`` for each parameter (new tensors, dtype of ``directions``), with
        ``r = c·‖D‖/(‖P‖ + 1e-16)`` (``"adam"``) or ``min(1, r)`` (``"adam_cap"``).
    """
    adam_sq = []
    direction_sq = []
    numerators = grads if numerators is None else numerators
    for state, grad, direction, numerator in zip(states, grads, directions, numerators,
                                                  strict=True):
        work = torch.promote_types(direction.dtype, torch.float32)  # fp32 state for half types
        grad = grad.to(work)
        if _SECOND_MOMENT not in state:
            state[_SECOND_MOMENT] = torch.zeros_like(grad)
            state[_STEP] = torch.zeros((), dtype=torch.int64, device=grad.device)
        state[_STEP].add_(1)
        second = state[_SECOND_MOMENT]
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # Bias correction as a tensor: no host synchronisation on accelerators.
        correction = 1 - torch.pow(beta2, state[_STEP].to(second.dtype))
        denominator = (second / correction).sqrt_().add_(eps)
        adam_sq.append(((numerator.to(work) / denominator) ** 2).sum())
        direction_sq.append((direction.to(work) ** 2).sum())
    scale = limit * torch.stack(adam_sq).sum().sqrt() / (torch.stack(direction_sq).sum().sqrt() + 1e-16)
    if kind == "adam_cap":
        scale = scale.clamp(max=1.0)
    elif kind != "adam":
        raise ValueError(f"Invalid kind: {kind!r} (expected 'adam' or 'adam_cap')")
    return [(direction * scale).to(direction.dtype) for direction in directions]



def smoothed_norm_ratio(state: dict, graft_norm: Tensor, direction_norm: Tensor, beta: float,
                        keep: Tensor | None = None) -> Tensor:
    """``N̄_D / (N̄_P + 1e-16)``: the graft's over the direction's norm, each averaged over steps.

    ``N̄ ← β·N̄ + (1 − β)·‖·‖`` (0-d float32 tensors ``graft_norm_avg`` and
    ``direction_norm_avg`` in ``state``, created at the first call; float64 for float64 norms).
    Both averages start at 0 and share ``β``, so their bias corrections cancel in the ratio;
    ``β = 0`` is this step's ratio (classic per-step grafting). Where ``keep`` (0-d bool) is
    False the averages stay as they were.

    Args:
        state: the layer's (block's) state dict.
        graft_norm, direction_norm: 0-d tensors ``‖D‖_F`` and ``‖P‖_F`` of this step.
        beta: averaging rate ``β ∈ [0, 1)``.
        keep: 0-d bool tensor, False on a skipped step (no host read).

    Returns:
        0-d tensor (at least float32) on ``graft_norm``'s device.
    """
    if beta == 0:
        return graft_norm / (direction_norm + 1e-16)
    dtype = torch.promote_types(graft_norm.dtype, torch.float32)
    if _NORM_AVERAGES[0] not in state:
        for key in _NORM_AVERAGES:
            state[key] = torch.zeros((), dtype=dtype, device=graft_norm.device)
    graft_avg, direction_avg = (state[key] for key in _NORM_AVERAGES)
    weight = 1 - beta if keep is None else keep_where(keep, 1 - beta, 0.0, graft_avg.dtype)
    graft_avg.lerp_(graft_norm.to(graft_avg.dtype), weight)
    direction_avg.lerp_(direction_norm.to(graft_avg.dtype), weight)
    return graft_avg / (direction_avg + 1e-16)
