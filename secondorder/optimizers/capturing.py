"""Shared plumbing of the optimizers that read layer statistics (EK-FAC, AdaFisher).

:class:`CapturingOptimizer` owns a :class:`~secondorder.precond.capture.LayerCapture` built from
the optimizer's parameters (identity-matched to layers), rebuilds it when a param group is
added, switches recording on only for steps whose schedule needs statistics (recomputed after
``load_state_dict``), and provides the pieces both update rules share: the Adam-style fallback
for parameters outside tracked layers, bias-corrected momentum and the two weight-decay forms.

Gradient scale detection (AMP, unusual accumulation): on a statistics step the capture's
reconstruction of a layer's batch gradient, ``Σ_n Σ_t g aᵀ``, is compared with the layer's
``.grad``. If they differ by an exact power of two ``2^k`` (what a ``GradScaler`` whose loss
scale was not divided out produces), the recorded ``g`` is divided by ``2^k``. Any other
mismatch (gradient clipping, weight tying outside the layer) is left alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from secondorder.distributed.distributor import Distributor, resolve_distributor
from secondorder.distributed.ownership import LayerOwnership
from secondorder.optimizers.base import SecondOrderOptimizer
from secondorder.precond.capture import CapturedLayer, LayerCapture, LayerStats
from secondorder.precond.diagonal import diagonal_direction, update_second_moment
from secondorder.precond.kfac import statistics_dtype
from secondorder.precond.linalg import bias_correction


class CapturingOptimizer(SecondOrderOptimizer):
    """Base class: a model, its capture, and the shared update pieces (module docstring).

    Subclasses set :attr:`capture_kinds`, call :meth:`_init_capture` at the end of
    ``__init__`` and implement :meth:`_stats_due` (whether a layer whose weight has taken
    ``t − 1`` steps needs statistics at its ``t``-th step).
    """

    capture_kinds: tuple[str, ...] = ("linear", "conv2d", "embedding")

    def _init_capture(self, model: nn.Module | None, loss_reduction: str,
                      distributor: Distributor | bool | None = None) -> None:
        if model is None:
            raise TypeError(
                f"Invalid model: {type(self).__name__} reads layer inputs; pass model=... "
                "(or the module itself as the first argument)"
            )
        self._model = model
        self._loss_reduction = loss_reduction
        self.capture: LayerCapture | None = None
        # Block = layer: each rank owns some layers (secondorder.distributed.ownership).
        self.distributor = resolve_distributor(distributor)
        self._ownership = LayerOwnership(
            self, self.distributor, lambda: self.capture.layers, capture=lambda: self.capture
        )
        self._build_capture()

    def _build_capture(self) -> None:
        if self.capture is not None:
            self.capture.remove()
        params = [p for group in self.param_groups for p in group["params"]]
        self.capture = LayerCapture(
            self._model, params, loss_reduction=self._loss_reduction, kinds=self.capture_kinds
        )
        self._refresh_recording()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group``; newly added layer weights get tracked."""
        super().add_param_group(param_group)
        if getattr(self, "capture", None) is not None:
            self._build_capture()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as :class:`SecondOrderOptimizer` does, then re-derive when to record."""
        super().load_state_dict(state_dict)
        self._refresh_recording()

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

    def _pop_statistics(self) -> dict[CapturedLayer, LayerStats]:
        """The window's statistics (empty unless recorded), corrected for a gradient scale."""
        if not self.capture.has_records():
            self.capture.clear()
            return {}
        stats = self._ownership.gather_stats(self.capture.pop())
        for layer, layer_stats in stats.items():
            exponent = _power_of_two_mismatch(layer, layer_stats, self._loss_reduction)
            if exponent:
                layer_stats.output_grads = layer_stats.output_grads / 2.0**exponent
        return stats

    # ------------------------------------------------------------------ shared update pieces
    @staticmethod
    def _init_param_state(state: dict[str, Any], param: Tensor, second_moment: bool) -> None:
        """``step`` (int64), ``exp_avg`` (fp32 for half params) and optionally ``exp_avg_sq``."""
        dtype = statistics_dtype(param.dtype)
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64, device=param.device)
            state["exp_avg"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        if second_moment and "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros(param.shape, dtype=dtype, device=param.device)

    @staticmethod
    def _adam_direction(
        state: dict[str, Any], grad: Tensor, group: dict[str, Any], step: int
    ) -> Tensor:
        """The fallback: Adam's ``m̂ / (√v̂ + ε)`` (updates ``exp_avg`` and ``exp_avg_sq``)."""
        beta1, beta2 = group["betas"]
        update_second_moment("adam", state["exp_avg_sq"], grad, beta2)
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        filtered = state["exp_avg"] / bias_correction(beta1, step)
        return diagonal_direction(
            "adam", state["exp_avg_sq"], filtered, step=step, beta2=beta2, epsilon=group["eps"]
        )

    @staticmethod
    def _momentum(state: dict[str, Any], direction: Tensor, beta1: float, step: int) -> Tensor:
        """``m ← β₁m + (1−β₁)d``; returns ``m / (1 − β₁^t)``."""
        state["exp_avg"].mul_(beta1).add_(direction, alpha=1 - beta1)
        return state["exp_avg"] / bias_correction(beta1, step)

    @staticmethod
    def _apply(param: Tensor, update: Tensor, group: dict[str, Any], decoupled: bool) -> None:
        """``W ← W(1 − lr·wd)`` when ``decoupled``, then ``W ← W − lr·update`` (in param dtype)."""
        lr = group["lr"]
        if decoupled and group["weight_decay"] != 0:
            param.mul_(1 - lr * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-lr)


def _power_of_two_mismatch(layer: CapturedLayer, stats: LayerStats, loss_reduction: str) -> int:
    """``k`` with captured gradient = ``2^k``·``.grad`` (0 if not a power of two).

    Uses the bias when it has a gradient (``Σ_{n,t} g``: cheap), else the weight of a
    Kronecker layer (``Σ_{n,t} g aᵀ``: one weight-gradient's worth of work).
    """
    bias = layer.bias
    g = stats.output_grads
    if bias is not None and bias.grad is not None:
        dtype = statistics_dtype(bias.grad.dtype)
        total = g.to(dtype).reshape(g.shape[0] * g.shape[1], -1).sum(0)
        reference = bias.grad.to(dtype).reshape(-1)
    elif layer.kind in ("linear", "conv2d", "embedding") and layer.weight.grad is not None:
        grad = layer.weight.grad
        dtype = statistics_dtype(grad.dtype)
        if layer.kind == "embedding":
            rows = stats.inputs.reshape(-1)
            flat = g.reshape(rows.shape[0], -1).to(dtype)
            valid = rows >= 0
            total = torch.zeros(grad.shape, dtype=dtype, device=grad.device)
            total = total.index_add_(0, rows[valid], flat[valid])
            reference = grad.to(dtype)
        else:
            a, g = stats.inputs.to(dtype), g.to(dtype)
            if layer.groups == 1:
                a, g = a.unsqueeze(2), g.unsqueeze(2)
            total = torch.einsum("ntgo,ntgi->goi", g, a)
            reference = layer.gradient_matrix(grad.to(dtype), None)
    else:
        return 0
    denominator = float((reference * reference).sum())
    if not math.isfinite(denominator) or denominator == 0.0:
        return 0
    ratio = float((total * reference).sum()) / denominator
    if loss_reduction == "mean":
        ratio /= max(stats.num_examples, 1)
    if not math.isfinite(ratio) or ratio <= 0:
        return 0
    exponent = round(math.log2(ratio))
    return exponent if exponent != 0 and abs(math.log2(ratio) - exponent) < 1e-3 else 0
