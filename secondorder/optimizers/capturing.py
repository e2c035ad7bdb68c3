"""The step shared by the optimizers that read layer statistics (EK-FAC, AdaFisher, SINGD).

:class:`CapturingOptimizer` owns a :class:`~secondorder.precond.capture.LayerCapture` built from
the optimizer's parameters (identity-matched to layers), rebuilds it when a param group is
added, and switches recording on only for steps whose schedule needs statistics. Its ``_step``
is the whole step of a layer optimizer; a subclass writes only its update rule,
``_layer_directions``:

1. **statistics**: the window's captured ``a, g`` (gathered to the layers' owners), rescaled by
   :func:`statistics_scale` so that they reproduce the ``.grad`` the optimizer is given;
2. **finite check**: a layer (weight and bias together) whose gradients or statistics are not
   finite is skipped whole, state untouched (counted, warned once); so is a fallback parameter;
3. **the rule**: ``_layer_directions`` folds statistics on the optimizer's own schedule and
   returns a direction per parameter (``None``: use the Adam fallback for it);
4. **momentum** (``momentum_rule``): ``"ema"`` (``m ← β₁m + (1−β₁)d``, bias-corrected, EK-FAC),
   ``"heavy_ball"`` (``b ← μb + d``, SINGD) or ``"none"`` (the rule already averaged: AdaFisher);
5. **weight decay** (``group["weight_decay_type"]``): ``"l2"`` (added to the gradient before the
   rule, see :meth:`prepared_gradient`), ``"direction"`` (``d + wd·W`` before momentum, SINGD's
   form) or ``"decoupled"`` (``W ← W(1 − lr·wd)``, AdamW's form);
6. **apply**: ``W ← W − lr·u`` with each parameter's own group's ``lr`` (a layer's weight and bias
   may sit in different groups: the layer's preconditioner follows the weight's group).

Parameters outside tracked layers train with Adam's ``m̂/(√v̂ + ε)`` at the group's ``betas`` and
``eps`` (the fallback); a weight matrix that falls back is named in a warning at construction.

Gradient scale (:func:`statistics_scale`): mixed-precision loss scaling, gradient clipping and
unusual accumulation all make the captured ``g`` disagree with ``.grad`` by one factor ``c``. On a
statistics step the capture's reconstruction of a layer's batch gradient, ``Σ_n Σ_t g aᵀ``
(``/N`` for a mean loss), is compared with ``.grad`` on up to three cheap layers; the median ratio,
snapped to the exact power of two when it is one, divides the recorded ``g``. The statistics thus
always belong to the gradient that is stepped on. ``grad_scaler=`` (the ``GradScaler`` in use)
instead divides by the scaler's scale only, for statistics of the unclipped gradient.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from secondorder.distributed.distributor import Distributor
from secondorder.distributed.ownership import LayerOwnership
from secondorder.optimizers.base import (
    SecondOrderOptimizer,
    check_lr,
    decoupled_decay_,
    group_lr,
    heavy_ball_,
    work_dtype,
)
from secondorder.optimizers.validation import check_betas, check_choice, check_real
from secondorder.precond.capture import CapturedLayer, LayerCapture, LayerStats
from secondorder.precond.diagonal import diagonal_direction, update_second_moment
from secondorder.precond.kfac import batch_gradient
from secondorder.precond.linalg import bias_correction


class CapturingOptimizer(SecondOrderOptimizer):
    """Base class of the layer optimizers (module docstring).

    Subclasses set :attr:`capture_kinds` and :attr:`momentum_rule`, call :meth:`_init_capture`
    at the end of ``__init__`` and implement :meth:`_stats_due` and :meth:`_layer_directions`.
    """

    capture_kinds: tuple[str, ...] = ("linear", "conv2d", "embedding")
    capture_transposed_ties = True  # model an embedding tied to a head through both uses
    momentum_rule = "ema"
    _runtime_attributes = ("capture", "distributor", "_ownership")

    # ------------------------------------------------------------------ set-up
    def _init_capture(self, model: nn.Module | None, loss_reduction: str,
                      distributor: Distributor | bool | None = None,
                      grad_scaler: torch.amp.GradScaler | None = None) -> None:
        if model is None:
            raise TypeError(
                f"Invalid model: {type(self).__name__} reads layer inputs; pass model=... "
                "(or the module itself as the first argument)"
            )
        self._model = model
        self._loss_reduction = loss_reduction
        self.grad_scaler = grad_scaler
        self.capture: LayerCapture | None = None
        self._use_distributor(distributor)
        self._ownership = self._make_ownership()
        self._build_capture()
        own = {id(p) for p in model.parameters()}
        if not any(id(p) in own for group in self.param_groups for p in group["params"]):
            self.capture.remove()
            raise ValueError(
                f"Invalid model: none of {type(self).__name__}'s parameters belongs to model= "
                "(was the model copied after the parameters were taken?)"
            )
        self._warn_fallback_weights()

    def _make_ownership(self) -> LayerOwnership:
        # Block = layer: each rank owns some layers (secondorder.distributed.ownership).
        return LayerOwnership(self, self.distributor, lambda: self.capture.layers, capture=lambda: self.capture)

    def _rebuild_runtime(self) -> None:
        super()._rebuild_runtime()
        self.capture = None
        self._ownership = self._make_ownership()
        self._build_capture()

    def _build_capture(self) -> None:
        if self.capture is not None:
            self.capture.remove()
        params = [p for group in self.param_groups for p in group["params"]]
        self.capture = LayerCapture(self._model, params, loss_reduction=self._loss_reduction,
                                    kinds=self.capture_kinds, transposed_ties=self.capture_transposed_ties)
        self._refresh_recording()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group`` (validated); newly added layer weights get tracked."""
        super().add_param_group(param_group)
        if getattr(self, "capture", None) is not None:
            self._build_capture()

    def _after_load(self) -> None:
        self.capture.clear()
        self._refresh_recording()

    def _validate_common(self, group: dict[str, Any]) -> None:
        """Checks of the keys every layer optimizer shares (lr, betas, eps, weight decay)."""
        check_lr(group["lr"])
        group["betas"] = check_betas("betas", group["betas"])
        check_real("eps", group["eps"], low=0.0, low_inclusive=False)
        check_real("weight_decay", group["weight_decay"], low=0.0)
        check_choice("weight_decay_type", group["weight_decay_type"], self.weight_decay_types)

    weight_decay_types: tuple[str, ...] = ("decoupled", "l2")

    # ------------------------------------------------------------------ what is preconditioned
    def _named(self) -> dict[int, str]:
        return {id(p): name for name, p in self._model.named_parameters()}

    def _fallback_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in self.capture.fallback_params(group["params"])]

    def _warn_fallback_weights(self) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        matrices = self.capture.untracked_matrices(params)
        names = self._named()
        matrices += [(f"<a {tuple(p.shape)} weight>", "not a parameter of model=")
                     for p in self._fallback_params() if p.dim() >= 2 and p.requires_grad and id(p) not in names]
        if matrices:
            listed = "; ".join(f"{name} ({reason})" for name, reason in matrices[:8])
            warnings.warn(
                f"{type(self).__name__}: {len(matrices)} weight matrices are outside the layers it "
                f"preconditions and train with the Adam fallback: {listed}"
                f"{' …' if len(matrices) > 8 else ''}. See optimizer.describe().", UserWarning, stacklevel=4)

    def describe(self) -> str:
        """Which layers are preconditioned (by kind) and which parameters fall back, and why."""
        names = self._named()
        kinds: dict[str, int] = {}
        for layer in self.capture.layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        reasons = {name: info.get("reason") for name, info in self.capture.describe().items()}
        fallback = []
        for param in self._fallback_params():
            name = names.get(id(param), f"<unnamed {tuple(param.shape)}>")
            fallback.append(f"{name} ({reasons[name]})" if reasons.get(name) else name)
        tracked = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"
        return (f"{type(self).__name__}: preconditioned layers: {tracked}; "
                f"Adam fallback ({len(fallback)} parameters): {', '.join(fallback) or 'none'}")

    # ------------------------------------------------------------------ schedules
    def _stats_due(self, group: dict[str, Any], step: int) -> bool:
        raise NotImplementedError

    def _refresh_recording(self) -> None:
        """Record during the next forward/backward iff some layer's next step needs stats."""
        groups = self._groups_by_param()
        due = False
        for layer in self._ownership.owned_layers(self.capture.layers):
            state = self.state.get(layer.weight, {})
            next_step = int(state["step"]) + 1 if "step" in state else 1
            due = due or self._stats_due(groups[id(layer.weight)], next_step)
        self.capture.enabled = self._ownership.agree(due)

    def _groups_by_param(self) -> dict[int, dict[str, Any]]:
        return {id(p): group for group in self.param_groups for p in group["params"]}

    def _skip_scaled_step(self) -> None:
        self.capture.clear()  # statistics of a step the scaler skipped belong to no step

    # ------------------------------------------------------------------ the step
    def _step(self) -> None:
        with self._ownership.owned_step():  # hide other ranks' layers; share owners' results
            groups = self._groups_by_param()
            stats = self._pop_statistics(groups)
            layers = [layer for layer in self.capture.layers
                      if any(p is not None and p.grad is not None for p in (layer.weight, layer.bias))]
            fallback = [p for p in self._fallback_params() if p.grad is not None]
            units = [[p.grad for p in (layer.weight, layer.bias) if p is not None and p.grad is not None]
                     + ([stats[layer].inputs, stats[layer].output_grads] if layer in stats else [])
                     for layer in layers] + [[p.grad] for p in fallback]
            finite = self._finite_units(units)
            layers_ok, fallback_ok = finite[:len(layers)], finite[len(layers):]
            for layer in (layer for layer, ok in zip(layers, layers_ok) if not ok):
                self._skip_unit(self.state[layer.weight], "skipped a layer whose gradient or statistics are not finite")
            for param in (param for param, ok in zip(fallback, fallback_ok) if not ok):
                self._skip_unit(self.state[param], "skipped a parameter whose gradient is not finite")
            jobs = [layer for layer, ok in zip(layers, layers_ok) if ok]
            updates: list[tuple[Tensor, Tensor | None]] = self._layer_directions(jobs, stats, groups)
            updates += [(param, None) for param, ok in zip(fallback, fallback_ok) if ok]
            for param, direction in updates:
                group = groups[id(param)]
                if direction is None:
                    self._apply(param, self._adam_direction(param, group), group, fallback=True)
                else:
                    self._apply(param, self._momentum(param, group, direction), group)
        self._refresh_recording()

    def _layer_directions(self, layers: list[CapturedLayer], stats: dict[CapturedLayer, LayerStats],
                          groups: dict[int, dict[str, Any]]) -> list[tuple[Tensor, Tensor | None]]:
        """The optimizer's rule: ``(param, direction or None for the fallback)`` per parameter of
        ``layers`` that has a gradient (statistics on schedule, inverses, preconditioning)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ statistics
    def _pop_statistics(self, groups: dict[int, dict[str, Any]]) -> dict[CapturedLayer, LayerStats]:
        """The window's statistics (empty unless recorded), rescaled to the stepped gradient."""
        if not self.capture.has_records():
            self.capture.clear()
            return {}
        stats = self._ownership.gather_stats(self.capture.pop())
        if self.grad_scaler is not None:
            scale = float(self.grad_scaler.get_scale()) if self.grad_scaler.is_enabled() else 1.0
        else:
            scale = statistics_scale(stats, self._loss_reduction, groups)
        if scale != 1.0:
            for layer_stats in stats.values():
                layer_stats.output_grads = layer_stats.output_grads / scale
        return stats

    # ------------------------------------------------------------------ shared update pieces
    def prepared_gradient(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        """``param.grad`` in the work dtype, ``+ wd·W`` for ``weight_decay_type="l2"``."""
        grad = param.grad.to(work_dtype(param.dtype))
        if group["weight_decay_type"] == "l2" and group["weight_decay"] != 0:
            grad = grad.add(param.to(grad.dtype), alpha=group["weight_decay"])
        return grad

    def gradient_matrix(self, layer: CapturedLayer, groups: dict[int, dict[str, Any]], dtype: torch.dtype) -> Tensor:
        """The layer's ``Ḡ`` ``(groups, d_out, d_in')`` in ``dtype`` (zeros where a member has no
        gradient), each member with its own group's L2 decay."""
        parts = []
        for param in (layer.weight, layer.bias):
            if param is None:
                parts.append(None)
            elif param.grad is None:
                parts.append(torch.zeros_like(param, dtype=dtype))
            else:
                parts.append(self.prepared_gradient(param, groups[id(param)]).to(dtype))
        return layer.gradient_matrix(parts[0], parts[1] if layer.has_bias else None)

    def _param_state(self, param: Tensor) -> dict[str, Any]:
        state = self.state[param]
        if "step" not in state:  # on the CPU, as torch.optim's: reading it waits for no device
            state["step"] = torch.zeros((), dtype=torch.int64)
        return state

    def _adam_direction(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        """The fallback: Adam's ``m̂ / (√v̂ + ε)`` (advances the parameter's step counter)."""
        state = self._param_state(param)
        dtype = work_dtype(param.dtype)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        state["step"].add_(1)
        step = int(state["step"])
        grad = self.prepared_gradient(param, group)
        beta1, beta2 = group["betas"]
        update_second_moment("adam", state["exp_avg_sq"], grad, beta2)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        filtered = state["exp_avg"] / bias_correction(beta1, step)
        return diagonal_direction("adam", state["exp_avg_sq"], filtered, step=step, beta2=beta2,
                                  epsilon=group["eps"])

    def _momentum(self, param: Tensor, group: dict[str, Any], direction: Tensor) -> Tensor:
        """Direction-form decay, then the class's momentum rule (module docstring, 4–5)."""
        state = self._param_state(param)
        state["step"].add_(1)
        dtype = work_dtype(param.dtype)
        direction = direction.to(dtype)
        if group["weight_decay_type"] == "direction" and group["weight_decay"] != 0:
            direction = direction.add(param.to(dtype), alpha=group["weight_decay"])
        if self.momentum_rule == "ema":
            beta1 = group["betas"][0]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
            state["exp_avg"].lerp_(direction, 1 - beta1)
            return state["exp_avg"] / bias_correction(beta1, int(state["step"]))
        if self.momentum_rule == "heavy_ball" and group["momentum"] != 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
            return heavy_ball_([state["momentum_buffer"]], [direction], group["momentum"])[0]
        return direction

    @staticmethod
    def _apply(param: Tensor, update: Tensor, group: dict[str, Any], fallback: bool = False) -> None:
        """``W ← W(1 − lr·wd)`` for decoupled decay (also the fallback's form of direction decay),
        then ``W ← W − lr·update`` (in the parameter's dtype)."""
        if group["weight_decay_type"] == "decoupled" or (fallback and group["weight_decay_type"] == "direction"):
            decoupled_decay_(param, group)
        param.add_(update.to(param.dtype), alpha=-group_lr(group))


def statistics_scale(stats: dict[CapturedLayer, LayerStats], loss_reduction: str,
                     groups: dict[int, dict[str, Any]]) -> float:
    """The factor ``c`` with captured ``g`` = ``c``·(what reproduces ``.grad``) (module docstring).

    Measured on up to three layers with the cheapest reconstruction (a bias: ``Σ g``; else a
    Kronecker weight: ``Σ g aᵀ``); the median ratio, snapped to ``2^k`` within ``1e-3`` in
    ``log₂`` (GradScaler's scales), else used as measured. 1 when nothing can be measured.
    """
    candidates = sorted(
        (layer for layer in stats if _measurable(layer)),
        key=lambda layer: (layer.bias is None or layer.bias.grad is None, layer.weight.numel()),
    )[:3]
    ratios = []
    for layer in candidates:
        ratio = _gradient_ratio(layer, stats[layer], loss_reduction)
        if groups.get(id(layer.weight), {}).get("maximize"):
            ratio = -ratio  # the gradients were negated for this step; the capture was not
        if math.isfinite(ratio) and ratio > 0:
            ratios.append(ratio)
    if not ratios:
        return 1.0
    ratio = statistics.median(ratios)
    exponent = round(math.log2(ratio))
    if abs(math.log2(ratio) - exponent) < 1e-3:
        return 2.0**exponent
    return ratio


def _measurable(layer: CapturedLayer) -> bool:
    if layer.bias is not None and layer.bias.grad is not None:
        return True
    return layer.family != "elementwise" and layer.weight.grad is not None


def _gradient_ratio(layer: CapturedLayer, stats: LayerStats, loss_reduction: str) -> float:
    """``⟨G_captured, G⟩ / ⟨G, G⟩`` for one layer (float64; NaN when undefined).

    The bias alone when it has a gradient (``Σ g`` over the rows that carry the bias: cheap),
    else the weight's matrix rebuilt by :func:`~secondorder.precond.kfac.batch_gradient`.
    """
    bias = layer.bias
    if bias is not None and bias.grad is not None:
        g = stats.output_grads.double()
        if layer.has_bias:  # rows of a tied weight's other uses carry 0 in the bias column
            g = g * stats.inputs[..., -1:].double()
        total = g.reshape(-1, bias.numel()).sum(0)
        reference = bias.grad.double().reshape(-1)
    else:
        total = batch_gradient(layer, stats).double()
        reference = layer.gradient_matrix(layer.weight.grad.double(), None)
        if layer.has_bias:  # the bias column (its gradient is absent here) is left out of both
            total, reference = total[..., :-1], reference[..., :-1]
    numerator, denominator = torch.stack([(total * reference).sum(), (reference * reference).sum()]).tolist()
    if not math.isfinite(denominator) or denominator == 0.0:
        return math.nan
    ratio = numerator / denominator
    if loss_reduction == "mean":
        ratio /= max(stats.num_examples, 1)
    return ratio
