"""Losses of network outputs with their output-space gradient and Hessian.

A Gauss-Newton method needs, for the batch outputs ``f ∈ ℝ^{b×c}``, the mean loss
``L = (1/b) Σ_n ℓ_n(f_n)``, the per-example output gradients ``g_f[n] = ∂ℓ_n/∂f_n`` and the
per-example output Hessians ``Q_n = ∂²ℓ_n/∂f_n²`` (reference/gauss_newton.md §4). The built-in
losses follow ``torch.nn.functional``'s default ``reduction="mean"`` exactly, so the value is the
number a PyTorch user already logs:

===================  ==============================================  =========================
name                 ``L`` (torch equivalent)                        ``g_f``, ``Q``
===================  ==============================================  =========================
``"mse"``            ``F.mse_loss(f, y)`` (mean over ``b·c``)         ``2(f − y)/c``, ``(2/c) I``
``"bce"``            ``F.binary_cross_entropy_with_logits(f, y)``     ``(σ(f) − y)/c``,
                     (mean over ``b·c``; ``f`` are logits)            ``diag(σ(1 − σ))/c``
``"cross_entropy"``  ``F.cross_entropy(f, y)``: ``y`` class indices   ``p − y``,
                     ``(b,)`` or probabilities ``(b, c)``             ``diag(p) − p pᵀ``
===================  ==============================================  =========================

(``c`` is the number of outputs per example after flattening; ``Q`` of ``"mse"`` is the
"scaling pitfall" of reference/gauss_newton.md §4: ``F.mse_loss`` has no ½ and averages over
outputs too.) A user loss is a :class:`CallableOutputLoss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OutputLoss", "CallableOutputLoss", "make_output_loss", "BUILTIN_LOSSES"]

BUILTIN_LOSSES = ("mse", "bce", "cross_entropy")


class OutputLoss:
    """A built-in loss (module table). ``name`` is one of :data:`BUILTIN_LOSSES`."""

    def __init__(self, name: str) -> None:
        if name not in BUILTIN_LOSSES:
            raise ValueError(
                f"Invalid loss: {name!r} (expected one of {BUILTIN_LOSSES} or a callable)"
            )
        self.name = name

    def flatten(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(outputs (b, c), targets)`` in the layout the formulas use.

        ``outputs`` of shape ``(b,)`` count as ``c = 1``; trailing dims are flattened. Targets of
        ``"mse"``/``"bce"`` must have as many entries as the outputs.
        """
        if outputs.dim() == 0:
            raise ValueError("Invalid outputs: expected a batch dimension, got a scalar")
        flat = outputs.reshape(outputs.shape[0], -1)
        if self.name == "cross_entropy":
            if outputs.dim() != 2:
                raise ValueError(
                    "Invalid outputs: cross_entropy expects (b, classes), "
                    f"got {tuple(outputs.shape)}"
                )
            if targets.shape not in (outputs.shape[:1], outputs.shape):
                raise ValueError(
                    f"Invalid targets: shape {tuple(targets.shape)} "
                    f"for outputs {tuple(outputs.shape)}"
                )
            return flat, targets
        if targets.numel() != flat.numel():
            raise ValueError(
                f"Invalid targets: {targets.numel()} entries "
                f"for outputs of shape {tuple(outputs.shape)}"
            )
        return flat, targets.reshape(flat.shape).to(flat.dtype)

    def value(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mean loss ``L`` (a 0-d tensor), differentiable in ``outputs``."""
        flat, targets = self.flatten(outputs, targets)
        if self.name == "mse":
            return F.mse_loss(flat, targets)
        if self.name == "bce":
            return F.binary_cross_entropy_with_logits(flat, targets)
        return F.cross_entropy(flat, targets)

    def derivatives(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(L, g_f, Q)`` at ``outputs`` (detached).

        Returns:
            ``L`` 0-d; ``g_f`` ``(b, c)``; ``Q`` ``(b, c)`` (diagonals) for ``"mse"``/``"bce"``
            or ``(b, c, c)`` for ``"cross_entropy"``.
        """
        flat, targets = self.flatten(outputs.detach(), targets)
        c = flat.shape[1]
        loss = self.value(flat, targets)
        if self.name == "mse":
            return loss, 2.0 * (flat - targets) / c, torch.full_like(flat, 2.0 / c)
        if self.name == "bce":
            prob = torch.sigmoid(flat)
            return loss, (prob - targets) / c, prob * (1 - prob) / c
        prob = torch.softmax(flat, dim=1)
        if targets.dim() == 1:
            target_prob = F.one_hot(targets.long(), c).to(prob.dtype)
        else:
            target_prob = targets.to(prob.dtype)
        hessian = torch.diag_embed(prob) - prob.unsqueeze(-1) * prob.unsqueeze(-2)
        return loss, prob - target_prob, hessian


class CallableOutputLoss:
    """A user loss ``loss(outputs (b, c), targets) -> per-example losses (b,)``.

    ``L`` is the mean of the per-example losses. ``g_f`` comes from autograd. ``Q`` comes from
    ``hessian(outputs, targets)`` when given (``(b, c)`` diagonal or ``(b, c, c)`` PSD blocks),
    otherwise from ``torch.func.vmap(torch.func.hessian(...))`` applied to one example at a time
    (the loss must then work on a batch of one and be vmappable). ``Q`` must be positive
    semidefinite: a convex loss in the outputs.
    """

    name = "callable"

    def __init__(
        self,
        loss: Callable[[Tensor, Tensor], Tensor],
        hessian: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if not callable(loss):
            raise TypeError(f"Invalid loss: {loss!r} is not callable")
        if hessian is not None and not callable(hessian):
            raise TypeError(f"Invalid loss_hessian: {hessian!r} is not callable")
        self.loss = loss
        self.hessian = hessian

    def flatten(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs as ``(b, c)``; targets untouched."""
        if outputs.dim() == 0:
            raise ValueError("Invalid outputs: expected a batch dimension, got a scalar")
        return outputs.reshape(outputs.shape[0], -1), targets

    def _per_example(self, flat: Tensor, targets: Tensor) -> Tensor:
        losses = self.loss(flat, targets)
        if losses.shape != flat.shape[:1]:
            raise ValueError(
                f"Invalid loss: must return per-example losses of shape {tuple(flat.shape[:1])}, "
                f"got {tuple(losses.shape)}"
            )
        return losses

    def value(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mean of the per-example losses (0-d)."""
        flat, targets = self.flatten(outputs, targets)
        return self._per_example(flat, targets).mean()

    def derivatives(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(L, g_f (b, c), Q (b, c) or (b, c, c))``; see the class docstring."""
        flat, targets = self.flatten(outputs.detach(), targets)
        with torch.enable_grad():
            leaf = flat.clone().requires_grad_(True)
            losses = self._per_example(leaf, targets)
            (grad,) = torch.autograd.grad(losses.sum(), leaf)
        if self.hessian is not None:
            hessian = self.hessian(flat, targets)
            expected = (flat.shape, flat.shape + flat.shape[1:])
            if tuple(hessian.shape) not in [tuple(s) for s in expected]:
                raise ValueError(
                    f"Invalid loss_hessian: expected shape {tuple(flat.shape)} or "
                    f"{tuple(flat.shape) + (flat.shape[1],)}, got {tuple(hessian.shape)}"
                )
        else:

            def one(output: Tensor, target: Tensor) -> Tensor:
                return self.loss(output.unsqueeze(0), target.unsqueeze(0))[0]

            hessian = torch.func.vmap(torch.func.hessian(one))(flat, targets)
        return losses.detach().mean(), grad, hessian.detach()


def make_output_loss(
    loss: str | Callable[[Tensor, Tensor], Tensor],
    hessian: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> OutputLoss | CallableOutputLoss:
    """Build the loss object from a name of :data:`BUILTIN_LOSSES` or a callable."""
    if isinstance(loss, str):
        if hessian is not None:
            raise ValueError("Invalid loss_hessian: only a callable loss takes an output Hessian")
        return OutputLoss(loss)
    return CallableOutputLoss(loss, hessian)
