"""Training with Lightning (``lightning`` 2.x).

**Shampoo, SOAP mode, EKFAC, AdaFisher/AdaFisherW, SINGD** need nothing: Lightning's automatic
optimization calls ``optimizer.step(closure)`` and they run the closure (forward, backward)
before stepping; gradient accumulation, ``gradient_clip_val`` and ``bf16-mixed`` work as for
AdamW. The capture optimizers need the module: build them with ``model=self`` (or the
wrapped network) in ``configure_optimizers``.

**SANIA and ExactGaussNewton** need a closure that automatic optimization cannot give them
under accumulation (SANIA would get the last micro-batch's loss while ``.grad`` holds the whole
window's gradient) or at all (ExactGaussNewton's closure returns ``(outputs, targets)``, not a
loss). :class:`ClosureOptimizerModule` is the manual-optimization recipe: subclass it, define
``training_loss(batch)`` (SANIA, and any other optimizer) and/or
``gauss_newton_outputs(batch)`` (ExactGaussNewton), return the optimizer from
``configure_optimizers``; accumulation and clipping are its own arguments (Lightning refuses
``accumulate_grad_batches`` and ``gradient_clip_val`` under manual optimization).
:class:`ClosureOptimizerCheck` is a callback that refuses ExactGaussNewton under automatic
optimization and warns about SANIA with ``accumulate_grad_batches > 1`` there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from secondorder.optimizers.gauss_newton import ExactGaussNewton
from secondorder.optimizers.sania import SANIA

__all__ = ["ClosureOptimizerCheck", "ClosureOptimizerModule"]


class ClosureOptimizerModule(L.LightningModule):
    """Manual optimization for the closure optimizers (module docstring).

    Per accumulation window of ``accumulate_grad_batches`` batches (the last window of an epoch
    may be shorter):

    * ExactGaussNewton: one ``step(closure)``, the closure running ``gauss_newton_outputs`` on
      every batch of the window and concatenating them (dropout masks identical across the
      step's calls: the RNG is re-seeded in a fork); no backward, nothing to clip;
    * any other optimizer (SANIA): ``manual_backward(training_loss(batch) / n)`` per batch, then
      clipping of the gradient norm at ``gradient_clip_val`` and ``step(closure)`` with the
      closure returning the window's loss (the sum of those scaled losses, whose gradient
      ``.grad`` holds).

    Then ``zero_grad``, and the LR schedulers from ``configure_optimizers`` step once per
    window. ``train_loss`` (the window's loss before the step) is logged.

    Args:
        accumulate_grad_batches: batches per optimizer step (>= 1).
        gradient_clip_val: clip the total gradient 2-norm to this value (None: no clipping).
    """

    def __init__(self, accumulate_grad_batches: int = 1, gradient_clip_val: float | None = None) -> None:
        super().__init__()
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int) \
                or accumulate_grad_batches < 1:
            raise ValueError(f"Invalid accumulate_grad_batches: {accumulate_grad_batches!r} (expected an int >= 1)")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"Invalid gradient_clip_val: {gradient_clip_val!r} (expected > 0 or None)")
        self.automatic_optimization = False
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self._window_loss: Tensor | None = None
        self._window_batches: list[Any] = []

    # ------------------------------------------------------------------ to define
    def training_loss(self, batch: Any) -> Tensor:
        """The mean loss of ``batch`` (scalar with graph). Needed for all but ExactGaussNewton."""
        raise NotImplementedError(f"{type(self).__name__} must define training_loss(batch)")

    def gauss_newton_outputs(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(outputs (b, c), targets)`` of ``batch`` for ExactGaussNewton's ``loss=``."""
        raise NotImplementedError(f"{type(self).__name__} must define gauss_newton_outputs(batch)")

    # ------------------------------------------------------------------ the recipe
    def _window_ends(self, batch_idx: int) -> bool:
        return (batch_idx + 1) % self.accumulate_grad_batches == 0 \
            or (batch_idx + 1) == self.trainer.num_training_batches

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        optimizer = self.optimizers()
        if isinstance(optimizer.optimizer, ExactGaussNewton):
            self._window_batches.append(batch)
            if not self._window_ends(batch_idx):
                return None
            batches, self._window_batches = self._window_batches, []
            loss = optimizer.step(closure=self._gauss_newton_closure(batches))
        else:
            scaled = self.training_loss(batch) / self.accumulate_grad_batches
            self.manual_backward(scaled)
            total = scaled.detach() if self._window_loss is None else self._window_loss + scaled.detach()
            self._window_loss = total
            if not self._window_ends(batch_idx):
                return None
            self._window_loss = None
            if self.gradient_clip_val is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val,
                                    gradient_clip_algorithm="norm")
            optimizer.step(closure=lambda: total)
            loss = total
        optimizer.zero_grad()
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if scheduler is not None:
                scheduler.step()
        if loss is not None:
            loss = torch.as_tensor(loss, dtype=torch.float32).detach()
            self.log("train_loss", loss, prog_bar=True)
        return loss

    def _gauss_newton_closure(self, batches: list[Any]) -> Callable[[], tuple[Tensor, Tensor]]:
        seed = int(torch.randint(0, 2**62, ()))
        devices = [self.device] if self.device.type == "cuda" else []

        def closure() -> tuple[Tensor, Tensor]:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)  # same dropout masks at every call of this step
                pairs = [self.gauss_newton_outputs(batch) for batch in batches]
            if len(pairs) == 1:
                return pairs[0]
            return torch.cat([o for o, _ in pairs]), torch.cat([t for _, t in pairs])

        return closure


class ClosureOptimizerCheck(L.Callback):
    """Refuses the automatic-optimization setups that would go silently wrong.

    * ExactGaussNewton under automatic optimization: ``TypeError`` (its closure must return
      ``(outputs, targets)``; use :class:`ClosureOptimizerModule`);
    * SANIA with ``accumulate_grad_batches > 1`` under automatic optimization: a
      ``UserWarning`` (its Polyak step would use the last micro-batch's loss with the whole
      window's gradient).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            return
        for optimizer in trainer.optimizers:
            optimizer = getattr(optimizer, "optimizer", optimizer)
            if isinstance(optimizer, ExactGaussNewton):
                raise TypeError(
                    "Invalid optimizer: ExactGaussNewton needs a closure returning (outputs, "
                    "targets), which automatic optimization does not give; subclass "
                    "secondorder.integrations.lightning.ClosureOptimizerModule"
                )
            if isinstance(optimizer, SANIA) and trainer.accumulate_grad_batches > 1:
                warnings.warn(
                    "SANIA under automatic optimization with accumulate_grad_batches="
                    f"{trainer.accumulate_grad_batches} gets the last micro-batch's loss with the "
                    "accumulated gradient; use secondorder.integrations.lightning."
                    "ClosureOptimizerModule for the window's loss",
                    UserWarning,
                    stacklevel=2,
                )
