"""Training with the Hugging Face ``transformers.Trainer`` (transformers >= 5).

:class:`SecondOrderTrainer` is a drop-in ``Trainer`` subclass that makes every optimizer of
the suite work inside the Trainer's loop (gradient accumulation, ``max_grad_norm`` clipping,
LR schedules, checkpoint save and resume)::

    from secondorder import EKFAC, SANIA
    from secondorder.integrations.huggingface import SecondOrderTrainer

    # the Trainer builds the optimizer; model= is supplied for the capture optimizers
    trainer = SecondOrderTrainer(model=model, args=args, train_dataset=train,
                                 optimizer_cls_and_kwargs=(EKFAC, {"lr": 1e-3}))
    # or build it yourself
    trainer = SecondOrderTrainer(model=model, args=args, train_dataset=train,
                                 optimizers=(SANIA(model.parameters()), None))
    trainer.train()

What it adds to ``Trainer``:

* **Capture optimizers** (EKFAC, AdaFisher/AdaFisherW, SINGD, ExactGaussNewton) read layer
  inputs, so they need ``model=``. With ``optimizer_cls_and_kwargs`` the Trainer calls
  ``cls(param_groups, **kwargs)``; this subclass passes ``model=`` too (the Trainer's own
  weight-decay groups are kept: ``TrainingArguments.weight_decay`` sets the decay, as for
  AdamW).
* **SANIA** takes its step size from the loss value, so it needs ``step(closure)``; the
  Trainer calls ``optimizer.step()``. Here the closure returns the loss of the whole
  accumulation window (the sum of the micro-batch losses as the Trainer scaled them for
  accumulation, i.e. exactly the loss whose gradient the accumulated ``.grad`` is) and SANIA
  uses the ``.grad`` the Trainer's backward passes left, after clipping. SANIA's Hutchinson
  preconditioner needs gradients with a graph, which the Trainer's ``backward`` does not keep:
  use the SQR preconditioners here.
* **ExactGaussNewton** owns the forward passes and never reads ``.grad``: for it the Trainer's
  forward/backward is replaced by one ``step(closure)`` per accumulation window, where the
  closure runs the model on every micro-batch of the window and returns the concatenated
  ``(outputs, targets)`` (``gauss_newton_outputs``; the default suits ``(batch, classes)``
  logits, :func:`causal_lm_outputs` flattens a language model's next-token predictions).
  The closure is called several times per step; dropout masks are kept identical across
  those calls by re-seeding the RNG inside a fork (one seed drawn per step from the global
  generator, so checkpoints and resumes stay exact). ``max_grad_norm`` has no gradient to
  clip. The logged training loss is the window's loss before the step.
"""

from __future__ import annotations

import inspect
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from secondorder.optimizers.capturing import CapturingOptimizer
from secondorder.optimizers.gauss_newton import ExactGaussNewton
from secondorder.optimizers.sania import SANIA
from secondorder.optimizers.singd import SINGD

__all__ = ["SecondOrderTrainer", "causal_lm_outputs", "classification_outputs", "needs_model"]

OutputsFn = Callable[[nn.Module, dict[str, Any]], tuple[Tensor, Tensor]]


def classification_outputs(model: nn.Module, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``(logits (b, c), labels (b,))`` of a sequence-classification (or regression) model."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    return model(**inputs).logits, labels


def causal_lm_outputs(model: nn.Module, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Next-token ``(logits (n, vocab), labels (n,))`` of a causal LM, one row per predicted
    token (positions labelled ``-100`` dropped), i.e. the examples of the Trainer's token-mean
    cross-entropy. Exact Gauss-Newton's batch-space solve is ``(n·vocab)²``: keep ``n`` small."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs).logits[:, :-1]
    labels = labels[:, 1:]
    keep = labels.reshape(-1) != -100
    return logits.reshape(-1, logits.shape[-1])[keep], labels.reshape(-1)[keep]


def _has_argument(optimizer_cls: type, name: str) -> bool:
    """Whether ``optimizer_cls.__init__`` names ``name`` (its own or, through ``**kwargs``,
    a base class's)."""
    for klass in optimizer_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        if name in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


def needs_model(optimizer_cls: Any) -> bool:
    """Whether ``optimizer_cls`` is one of the suite's optimizers that read layer inputs and
    so take ``model=`` (EKFAC, AdaFisher/AdaFisherW, SINGD, ExactGaussNewton)."""
    return isinstance(optimizer_cls, type) and issubclass(
        optimizer_cls, (CapturingOptimizer, SINGD, ExactGaussNewton)
    )


class SecondOrderTrainer(Trainer):
    """``transformers.Trainer`` that runs every optimizer of the suite (module docstring).

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        gauss_newton_outputs: ``(model, inputs) -> (outputs (b, c), targets)`` for
            ExactGaussNewton (default :func:`classification_outputs`); the targets are what
            the optimizer's ``loss=`` expects. Unused by the other optimizers.
    """

    def __init__(self, *args: Any, gauss_newton_outputs: OutputsFn = classification_outputs,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not callable(gauss_newton_outputs):
            raise TypeError(f"Invalid gauss_newton_outputs: {gauss_newton_outputs!r} is not callable")
        self.gauss_newton_outputs = gauss_newton_outputs
        self._window_loss: Tensor | None = None  # SANIA: accumulated micro-batch losses
        self._window_inputs: list[dict[str, Any]] = []  # ExactGaussNewton: the window's batches
        self._stepped_in_training_step = False

    # ------------------------------------------------------------------ optimizer creation
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with ``model=`` for capture optimizers and the closure glue.

        Built from ``optimizer_cls_and_kwargs``, the suite's optimizers get the Trainer's two
        weight-decay groups when they have a ``weight_decay`` argument, else one group (SANIA
        and ExactGaussNewton refuse unknown group keys; a nonzero
        ``TrainingArguments.weight_decay`` is then ignored with a warning).
        """
        opt_model = self.model if model is None else model
        if self.optimizer is None and self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
            extra = {"model": opt_model} if needs_model(optimizer_cls) and "model" not in kwargs else {}
            if extra or not _has_argument(optimizer_cls, "weight_decay"):
                groups = self._param_groups(opt_model, optimizer_cls)
                self.optimizer = optimizer_cls(groups, **extra, **kwargs)
        optimizer = super().create_optimizer(model)
        inner = getattr(optimizer, "optimizer", optimizer)  # SageMaker wraps; plain elsewhere
        if isinstance(inner, (SANIA, ExactGaussNewton)) and not getattr(inner, "_trainer_step", False):
            _supply_closure(inner, self)
        return optimizer

    def _param_groups(self, model: nn.Module, optimizer_cls: type) -> list[dict[str, Any]]:
        """The Trainer's two groups (decayed weights; biases and norms) or, for an optimizer
        without weight decay, one group."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not _has_argument(optimizer_cls, "weight_decay"):
            if self.args.weight_decay:
                warnings.warn(
                    f"{optimizer_cls.__name__} has no weight decay: TrainingArguments.weight_decay="
                    f"{self.args.weight_decay} is ignored", UserWarning, stacklevel=3)
            return [{"params": [p for _, p in named]}]
        decay = set(self.get_decay_parameter_names(model))
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        return [group for group in groups if group["params"]]

    # ------------------------------------------------------------------ training step
    def _closure_optimizer(self) -> torch.optim.Optimizer | None:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return inner if isinstance(inner, (SANIA, ExactGaussNewton)) else None

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """The Trainer's step; SANIA also sums the window's loss, ExactGaussNewton steps here."""
        optimizer = self._closure_optimizer()
        if isinstance(optimizer, ExactGaussNewton):
            return self._gauss_newton_step(model, inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if isinstance(optimizer, SANIA):
            self._window_loss = loss if self._window_loss is None else self._window_loss + loss
        return loss

    def _gauss_newton_step(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        model.train()
        self._window_inputs.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:  # not the window's last micro-batch yet
            return torch.zeros((), device=self.args.device)
        batches, self._window_inputs = self._window_inputs, []
        seed = int(torch.randint(0, 2**62, ()))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []

        def closure() -> tuple[Tensor, Tensor]:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)  # same dropout masks at every call of this step
                with self.compute_loss_context_manager():
                    pairs = [self.gauss_newton_outputs(model, batch) for batch in batches]
            outputs = torch.cat([o for o, _ in pairs]) if len(pairs) > 1 else pairs[0][0]
            targets = torch.cat([t for _, t in pairs]) if len(pairs) > 1 else pairs[0][1]
            return outputs, targets

        # The optimizer itself (accelerate's wrapper does not return the loss); this is the
        # window's last micro-batch, where the wrapper would step too.
        loss = self._closure_optimizer().step(closure)
        self._stepped_in_training_step = True
        if loss is None:
            return torch.zeros((), device=self.args.device)
        return torch.as_tensor(loss, dtype=torch.float32).detach().to(self.args.device)

    def _take_window_closure(self, optimizer: torch.optim.Optimizer) -> Callable[[], Any] | None:
        """What ``optimizer.step()`` (no closure) should run at the end of a window."""
        if isinstance(optimizer, ExactGaussNewton):
            return None
        loss, self._window_loss = self._window_loss, None
        return None if loss is None else (lambda: loss)


def _supply_closure(optimizer: torch.optim.Optimizer, trainer: SecondOrderTrainer) -> None:
    """Make ``optimizer.step()`` (the Trainer's call) run ``step(closure)`` with the window's
    closure. Installed as a bound method on the instance (as torch's LR schedulers and
    accelerate do), so ``state_dict`` and ``isinstance`` are untouched."""
    class_step = optimizer.step
    trainer_ref = weakref.ref(trainer)

    def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        owner = trainer_ref()
        if closure is None and owner is not None:
            if owner._stepped_in_training_step:  # ExactGaussNewton already stepped this window
                owner._stepped_in_training_step = False
                return None
            closure = owner._take_window_closure(self)
        return class_step(closure)

    optimizer.step = types.MethodType(step, optimizer)
    optimizer._trainer_step = True
