"""SANIA: the preconditioned Polyak step (Abdukhakimov, Xiang, Kamzolov, Gower & Takáč 2023).

"Polyak-type Optimization Framework Leads to Scale Invariant Stochastic Algorithms",
arXiv:2312.17369; its linear-model special case is PSPS (arXiv:2310.02093). The step size
comes from the loss value instead of a learning rate: ``w_{t+1}`` is the point of the
``f*`` level set of a model of the mini-batch loss that is closest to ``w_t`` in the metric of
an SPD diagonal preconditioner ``B_t``.

Algorithm (one ``step(closure)``; ``f`` the closure's loss, ``g = ∇f``)::

    B_t            updated with g first (see preconditioners below)
    s = B_t⁻¹ g    per parameter (coordinates where B_t = 0 give s = 0)
    G = ⟨g, s⟩     summed over *all* parameter groups together
    Δ = max(f − f*, 0)
    model="quadratic" (SANIA):  τ = 1 − √(1 − 2Δ/G) if 2Δ ≤ G else τ = 1
    model="linear"    (PSPS):   τ = Δ / G
    w ← w − lr · τ · s         (lr per group, a multiplier; 1 by default)

The step is skipped (τ = 0) when ``G <= min_gnorm`` or ``Δ = 0``. With ``B = I`` and the
linear model this is the stochastic Polyak step SPS (Loizou et al. 2021).

Preconditioners (``B_t`` is diagonal; state shapes equal the parameter's):

* ``"adagrad_sqr"``: ``a_t = a_{t−1} + g ⊙ g``, ``B_t = max(eps, a_t)``;
* ``"adam_sqr"``: ``v_t = β₂ v_{t−1} + (1 − β₂) g ⊙ g``, ``B_t = max(eps, v_t / (1 − β₂ᵗ))``
  (no first moment);
* ``"hutchinson"``: ``D_1`` = mean of ``hutch_init_iters`` samples ``z ⊙ ∇²f z`` (Rademacher
  ``z``) at the first step, then ``D_t = β D_{t−1} + (1 − β) z ⊙ ∇²f z`` with one probe per
  step, ``β = hutch_beta``; ``B_t = max(|D_t|, hutch_alpha)``;
* ``"identity"``: ``B = I``.

``sqrt=True`` replaces the SQR statistic by its square root (AdaGrad/Adam-style scaling
``max(eps, √a_t)``): not scale invariant, kept as the paper's control. With ``eps = 0`` the SQR
variants are invariant to a feature rescaling ``X → X V`` (``B → V² B``, ``G`` unchanged).

Closure contract (``step`` raises without a closure). The closure returns the mini-batch loss
at the current parameters (a scalar tensor or float); the gradient is found as follows:

1. the closure ran ``backward()`` (some ``.grad`` was created or changed while it ran): the
   ``.grad`` tensors are used — the ``torch.optim.LBFGS`` idiom;
2. otherwise, if no parameter has a ``.grad`` and the loss is graph-attached, SANIA
   differentiates the loss itself (``torch.autograd.grad``; ``.grad`` is left untouched);
3. otherwise the ``.grad`` already present (the loop's own ``backward()``) is used.

The Hutchinson preconditioner needs gradients *with a graph*: either let SANIA differentiate
(case 2: the closure returns the loss and does not call ``backward``, ``zero_grad()`` before
``step``), or call ``loss.backward(create_graph=True)`` (SANIA detaches those ``.grad``
afterwards to free the graph). Plain ``.grad`` without graph raises a ``RuntimeError``.

Diagnostics of the last step (Python floats, ``None`` before the first step): ``last_tau``
(τ), ``last_curvature`` (G), ``last_delta`` (Δ). They are never written into ``group["lr"]``.
State per parameter: ``step`` (int64), ``sum_sq`` / ``exp_avg_sq`` / ``hutch_diag`` (the
statistic of its group's preconditioner; float32 for bf16/fp16 parameters) and
``nonfinite_skips`` (int64 count of steps skipped for a non-finite loss, gradient or
curvature; the state is left as it was and a ``NumericalWarning`` is issued). The two
counters are allocated when a parameter joins the optimizer, so
``torch.distributed.checkpoint`` never needs to call ``step()`` (which SANIA cannot run
without a closure) to materialise the state; the statistic waits for a first gradient.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from secondorder.optimizers.base import ParamsT, SecondOrderOptimizer, check_lr, group_lr
from secondorder.optimizers.validation import check_choice, check_int, check_real
from secondorder.precond.curvature_products import (
    gradients_with_graph,
    hutchinson_probe,
    probe_generator,
    running_average,
)

PRECONDITIONERS = ("adagrad_sqr", "adam_sqr", "hutchinson", "identity")
MODELS = ("quadratic", "linear")
_STAT_KEY = {"adagrad_sqr": "sum_sq", "adam_sqr": "exp_avg_sq", "hutchinson": "hutch_diag"}
_GLOBAL_KEYS = ("model", "f_star", "min_gnorm")


def polyak_tau(delta: float, curvature: float, model: str) -> float:
    """The SANIA/PSPS step multiplier τ from ``Δ = max(f − f*, 0)`` and ``G = gᵀB⁻¹g > 0``.

    Quadratic model: the smaller root of ``½τ²G − τG + Δ = 0``, written
    ``r / (1 + √(1 − r))`` with ``r = 2Δ/G`` (equal to ``1 − √(1 − r)`` without its
    cancellation), or 1 when ``r > 1``. Linear model: ``Δ / G``.
    """
    if model == "linear":
        return delta / curvature
    ratio = 2.0 * delta / curvature
    if ratio > 1.0:
        return 1.0
    return ratio / (1.0 + math.sqrt(1.0 - ratio))


def _state_dtype(param: Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


class SANIA(SecondOrderOptimizer):
    """Scale-invariant preconditioned Polyak step (see the module docstring for the algorithm).

    The defaults are the published method. It needs a loss that can approach ``f_star``: on a
    language model (loss far above 0) τ saturates at 1 and, with the coordinates at the
    ``eps`` floor, the step is SGD at learning rate ``lr / eps`` (measured best ``lr`` 0.1 on
    the benchmark byte transformer, still behind AdamW; README, "SANIA").

    Args:
        params: parameters or parameter groups (as in ``torch.optim``).
        lr: multiplier of the Polyak step (>= 0; 1 is the method as published).
        preconditioner: ``"adagrad_sqr"``, ``"adam_sqr"``, ``"hutchinson"`` or ``"identity"``
            (may differ between groups).
        model: ``"quadratic"`` (SANIA) or ``"linear"`` (PSPS); the same in every group.
        eps: floor of the SQR preconditioners (>= 0; 0 gives exact scale invariance).
        beta2: decay of Adam-SQR's second moment, in ``[0, 1)``.
        sqrt: use ``√`` of the SQR statistic (non-invariant AdaGrad/Adam-style control).
        f_star: the optimal mini-batch loss (0 under interpolation); same in every group.
        hutch_init_iters: probes averaged at the first step (>= 1).
        hutch_beta: decay of the Hutchinson running average, in ``[0, 1)``.
        hutch_alpha: floor of ``|D_t|`` (> 0).
        min_gnorm: skip the step when ``G <= min_gnorm`` (>= 0); same in every group.
        seed: seed of the Hutchinson probes (probes depend on seed, parameter position, step).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        *,
        preconditioner: str = "adagrad_sqr",
        model: str = "quadratic",
        eps: float = 0.1,
        beta2: float = 0.999,
        sqrt: bool = False,
        f_star: float = 0.0,
        hutch_init_iters: int = 100,
        hutch_beta: float = 0.999,
        hutch_alpha: float = 0.1,
        min_gnorm: float = 1e-13,
        seed: int = 0,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            preconditioner=preconditioner,
            model=model,
            eps=eps,
            beta2=beta2,
            sqrt=sqrt,
            f_star=f_star,
            hutch_init_iters=hutch_init_iters,
            hutch_beta=hutch_beta,
            hutch_alpha=hutch_alpha,
            min_gnorm=min_gnorm,
            seed=seed,
        )
        self.last_tau: float | None = None
        self.last_curvature: float | None = None
        self.last_delta: float | None = None
        super().__init__(params, defaults, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)

    closure_required = True
    supports_maximize = False
    _closure_contract = "returns the mini-batch loss (SANIA's step size comes from its value)"

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_choice("preconditioner", group["preconditioner"], PRECONDITIONERS)
        check_choice("model", group["model"], MODELS)
        check_real("eps", group["eps"], low=0.0)
        check_real("beta2", group["beta2"], low=0.0, high=1.0, high_inclusive=False)
        if not isinstance(group["sqrt"], bool):
            raise TypeError(f"Invalid sqrt: {group['sqrt']!r} (expected a bool)")
        check_real("f_star", group["f_star"])
        check_int("hutch_init_iters", group["hutch_init_iters"], low=1)
        check_real("hutch_beta", group["hutch_beta"], low=0.0, high=1.0, high_inclusive=False)
        check_real("hutch_alpha", group["hutch_alpha"], low=0.0, low_inclusive=False)
        check_real("min_gnorm", group["min_gnorm"], low=0.0)
        check_int("seed", group["seed"], low=0)
        reference = self.param_groups[0] if self.param_groups else group
        for key in _GLOBAL_KEYS:
            if group[key] != reference[key]:
                raise ValueError(
                    f"Invalid {key}: {group[key]!r} differs from the first group's "
                    f"{reference[key]!r}; the Polyak step is global, so {key} must be shared"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated; ``model``, ``f_star``, ``min_gnorm`` must match the others)
        and allocate its parameters' state."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for param in group["params"]:
            self._init_state(param, group, statistic=False)

    def _init_state(self, param: Tensor, group: dict[str, Any], statistic: bool = True) -> None:
        """Allocate what is missing: the counters, and (``statistic``) the preconditioner's
        statistic, which waits for the parameter's first gradient (a group may also switch
        preconditioner between steps)."""
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64)
        key = _STAT_KEY.get(group["preconditioner"])
        if statistic and key is not None and key not in state:
            state[key] = torch.zeros_like(
                param, dtype=_state_dtype(param), memory_format=torch.preserve_format
            )

    # ------------------------------------------------------------------ gradients
    def _gradients(
        self, loss: Any, params: list[Tensor], before: list, need_graph: list[bool]
    ) -> list[Tensor | None]:
        """Return one gradient (or ``None``) per parameter following the closure contract."""
        # A gradient created, replaced or modified in place while the closure ran means the
        # closure called backward. The weak references keep no memory alive during the closure.
        ran_backward = any(
            param.grad is not None
            and (ref is None or ref() is not param.grad or param.grad._version != version)
            for param, (ref, version) in zip(params, before, strict=True)
        )
        trainable = [p for p in params if p.requires_grad]
        if (
            not ran_backward
            and all(p.grad is None for p in trainable)
            and isinstance(loss, Tensor)
            and loss.requires_grad
        ):
            graph = any(need_graph)
            with torch.enable_grad():
                if graph:
                    grads = gradients_with_graph(loss, trainable)
                else:
                    grads = list(torch.autograd.grad(loss, trainable, allow_unused=True))
            by_param = {id(p): g for p, g in zip(trainable, grads, strict=True)}
            return [by_param.get(id(p)) for p in params]
        grads = [p.grad for p in params]
        for grad, graph in zip(grads, need_graph, strict=True):
            if graph and grad is not None and not grad.requires_grad:
                raise RuntimeError(
                    "SANIA(preconditioner='hutchinson') needs gradients with a graph: return "
                    "the loss from the closure without calling backward (SANIA differentiates "
                    "it), or call loss.backward(create_graph=True)"
                )
        return grads

    # ------------------------------------------------------------------ step
    def _closure_step(self, closure: Callable[[], Any]) -> Any:
        """One SANIA step.

        Args:
            closure: re-evaluates the mini-batch loss at the current parameters and returns it
                (see the module docstring for how gradients are found). Required.

        Returns:
            The closure's loss, detached from its graph when it is a tensor (so that the graph,
            which the Hutchinson variant keeps for second derivatives, is freed).
        """
        params = [p for group in self.param_groups for p in group["params"]]
        groups = [group for group in self.param_groups for _ in group["params"]]
        before = [
            (None, 0) if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params
        ]
        loss = self._evaluate_closure(closure)
        if loss is None or (isinstance(loss, Tensor) and loss.numel() != 1):
            raise ValueError(
                "Invalid closure: it must return the mini-batch loss as a scalar, got "
                f"{None if loss is None else tuple(loss.shape)}"
            )
        need_graph = [group["preconditioner"] == "hutchinson" for group in groups]
        grads = self._gradients(loss, params, before, need_graph)
        result = loss.detach() if isinstance(loss, Tensor) else loss

        active = [i for i, g in enumerate(grads) if g is not None]
        if not active:
            return result
        for i in active:
            self._init_state(params[i], groups[i])
        hutch_samples = self._hutchinson_samples(params, groups, grads, active)
        for i in active:  # free graphs kept alive through .grad (backward(create_graph=True))
            if params[i].grad is not None and params[i].grad.requires_grad:
                params[i].grad = params[i].grad.detach()

        acc_dtype = (
            torch.float64
            if any(params[i].dtype == torch.float64 for i in active)
            else torch.float32
        )
        acc_device = grads[active[0]].device
        curvature = torch.zeros((), dtype=acc_dtype, device=acc_device)
        directions: dict[int, Tensor] = {}
        candidates: dict[int, Tensor] = {}
        for i in active:
            param, group, state = params[i], groups[i], self.state[params[i]]
            grad = grads[i].detach().to(_state_dtype(param))
            statistic = self._updated_statistic(state, group, grad, hutch_samples.get(i))
            if statistic is None:
                direction = grad
            else:
                candidates[i] = statistic
                floor = self._floor(state, group, statistic)
                direction = grad / floor
                if group["preconditioner"] != "hutchinson" and group["eps"] == 0.0:
                    direction = direction.masked_fill_(floor == 0, 0.0)  # where g = 0 so far
            directions[i] = direction
            curvature += torch.dot(grad.flatten(), direction.flatten()).to(acc_device, acc_dtype)
        loss_value = (
            loss.detach().to(device=acc_device, dtype=acc_dtype)
            if isinstance(loss, Tensor)
            else None
        )
        if loss_value is None:
            curvature_f, loss_f = float(curvature), float(loss)
        else:
            curvature_f, loss_f = torch.stack([curvature, loss_value.reshape(())]).tolist()

        if not (math.isfinite(curvature_f) and math.isfinite(loss_f)):
            self._skip_unit(self.state[params[active[0]]], "skipped a step whose loss, gradient or "
                            "curvature G is not finite")
            self.last_tau, self.last_curvature, self.last_delta = 0.0, curvature_f, None
            return result

        first = self.param_groups[0]
        delta = max(loss_f - first["f_star"], 0.0)
        if curvature_f <= first["min_gnorm"] or delta == 0.0:
            tau = 0.0
        else:
            tau = polyak_tau(delta, curvature_f, first["model"])
        self.last_tau, self.last_curvature, self.last_delta = tau, curvature_f, delta

        for i in active:
            param, group, state = params[i], groups[i], self.state[params[i]]
            state["step"] += 1
            if i in candidates:
                state[_STAT_KEY[group["preconditioner"]]].copy_(candidates[i])
            scale = group_lr(group) * tau
            if scale != 0.0:
                param.add_(directions[i].to(param.dtype), alpha=-scale)
        return result

    # ------------------------------------------------------------------ preconditioners
    def _hutchinson_samples(
        self,
        params: list[Tensor],
        groups: list[dict],
        grads: list[Tensor | None],
        active: list[int],
    ) -> dict[int, Tensor]:
        """Average ``z ⊙ Hz`` per Hutchinson parameter: ``hutch_init_iters`` probes at its first
        step, one probe afterwards. Probes span all Hutchinson parameters jointly."""
        indices = [i for i in active if groups[i]["preconditioner"] == "hutchinson"]
        if not indices:
            return {}
        counts = {
            i: groups[i]["hutch_init_iters"] if int(self.state[params[i]]["step"]) == 0 else 1
            for i in indices
        }
        generators = [
            probe_generator(
                groups[i]["seed"], i, int(self.state[params[i]]["step"]), params[i].device
            )
            for i in indices
        ]
        sub_params = [params[i] for i in indices]
        sub_grads = [grads[i] for i in indices]
        sums = {i: torch.zeros_like(params[i], dtype=_state_dtype(params[i])) for i in indices}
        for probe in range(max(counts.values())):
            samples = hutchinson_probe(sub_grads, sub_params, generators)
            for i, sample in zip(indices, samples, strict=True):
                if probe < counts[i]:
                    sums[i] += sample.detach().to(sums[i].dtype)
        return {i: sums[i] / counts[i] for i in indices}

    @staticmethod
    def _updated_statistic(
        state: dict, group: dict, grad: Tensor, hutch_sample: Tensor | None
    ) -> Tensor | None:
        """The preconditioner statistic after this step's update (out of place), or ``None``
        for the identity."""
        kind = group["preconditioner"]
        if kind == "adagrad_sqr":
            return torch.addcmul(state["sum_sq"], grad, grad)
        if kind == "adam_sqr":
            beta2 = group["beta2"]
            return torch.addcmul(state["exp_avg_sq"] * beta2, grad, grad, value=1.0 - beta2)
        if kind == "hutchinson":
            if int(state["step"]) == 0:
                return hutch_sample
            return running_average(state["hutch_diag"], hutch_sample, group["hutch_beta"])
        return None

    @staticmethod
    def _floor(state: dict, group: dict, statistic: Tensor) -> Tensor:
        """The diagonal of ``B_t`` from the updated statistic (same shape as the parameter)."""
        kind = group["preconditioner"]
        if kind == "hutchinson":
            return statistic.abs().clamp(min=group["hutch_alpha"])
        if kind == "adam_sqr":
            step = int(state["step"]) + 1
            statistic = statistic / (1.0 - group["beta2"] ** step)
        if group["sqrt"]:
            statistic = statistic.sqrt()
        return statistic.clamp(min=group["eps"])
