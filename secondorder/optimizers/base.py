"""The drop-in contract, written once: what every optimizer of the suite shares with torch.optim.

:class:`SecondOrderOptimizer` is the base of all eight optimizers. It owns every phase of a step
that is the same for all of them, so that an optimizer file keeps only its preconditioner and its
update rule (``_step`` for gradient-driven optimizers, ``_closure_step`` for the closure-driven
ones). One ``step(closure)``:

0. **autocast off.** The step runs with autocast disabled on every device type, so state dtypes
   never follow an enclosing ``torch.autocast`` (statistics are float32 for half parameters).
1. **closure.** Evaluated under ``torch.enable_grad`` (torch.optim's convention). Closure-driven
   optimizers (``closure_required``) raise a ``RuntimeError`` when called without one while
   non-zero gradients are present, and are a harmless no-op without one and with zero or no
   gradients (what ``torch.distributed.checkpoint`` does to materialise state).
2. **loss scale.** ``GradScaler`` talks to the optimizer through torch's own channel
   (``_step_supports_amp_scaling``: ``found_inf`` and ``grad_scale`` are set for the duration of
   ``step``). A step with ``found_inf`` is skipped without touching any state (the scaler then
   lowers its scale); gradients still carrying the scale are divided by it in place.
3. **maximize.** Gradients are negated in place for the step and restored afterwards (negation is
   exact, so ``.grad`` is bit-identical after the step).
4. **the optimizer's own step** (``_step``), which uses the shared pieces below: one finiteness
   test for all of its units (:meth:`_finite_units`: one fused ``inf``-norm and one host sync),
   :meth:`_skip_unit` (count in ``state["nonfinite_skips"]``, warn once per cause), and
   :func:`group_lr`.

Validation: :meth:`add_param_group` (which torch's ``__init__`` also calls for every group) checks
every hyperparameter of a group with the optimizer's ``_validate_group``, refuses unknown keys,
complex parameters and parameters listed twice. :meth:`load_state_dict` refuses, before anything
is modified, a state saved by another optimizer (its groups have other keys), by a configuration
that gives the state another meaning (``_meaning_keys``: SOAP vs Shampoo, AdaFisher vs
AdaFisherW) or for parameters of other shapes; it keeps every saved tensor's dtype (torch would
cast float32 factors of bf16 parameters and int64 counters to the parameter dtype,
pytorch/pytorch#43706) and runs load-state-dict pre-hooks whose returned dict is what is loaded.

Copies: ``copy.deepcopy`` and ``pickle`` keep the model (deep-copied along with the parameters)
and rebuild runtime objects (layer hooks, distributors) through :meth:`_rebuild_runtime`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from secondorder.distributed.distributor import resolve_distributor
from secondorder.optimizers.validation import check_real
from secondorder.precond.linalg import NumericalWarning

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]

# Keys torch.optim itself may put in a param group.
_TORCH_GROUP_KEYS = ("params", "param_names", "initial_lr", "name")
# Per-parameter state entries that always have the parameter's shape (checked on load).
PARAM_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "momentum_buffer", "sum_sq", "hutch_diag")


def split_model_argument(
    params: ParamsT | nn.Module, model: nn.Module | None, lr: Any = None
) -> tuple[ParamsT, nn.Module | None]:
    """Return ``(params, model)`` from the two ways of passing a model.

    ``Optimizer(model)`` is shorthand for ``Optimizer(model.parameters(), model=model)``. Passing
    a module *and* a different ``model=`` is refused, and so is the old positional form
    ``Optimizer(params, model)`` (``lr`` is then a module).
    """
    if isinstance(lr, nn.Module):
        raise TypeError(
            "Invalid lr: got a module; the model is a keyword argument, pass model=... "
            "(e.g. Optimizer(model.parameters(), model=model) or Optimizer(model))"
        )
    if isinstance(params, nn.Module):
        if model is not None and model is not params:
            raise ValueError("Invalid model: a module was passed as params and a different one as model=")
        return list(params.parameters()), params
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    return params, model


def group_lr(group: dict[str, Any]) -> float:
    """The group's learning rate as a Python float (a 0-d Tensor ``lr`` is accepted)."""
    lr = group["lr"]
    return float(lr) if isinstance(lr, Tensor) else lr


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype optimizer state and arithmetic use for parameters of ``dtype`` (fp32 for half)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def decoupled_decay_(tensor: Tensor, group: dict[str, Any]) -> None:
    """AdamW's decoupled weight decay ``W ← W(1 − lr·wd)`` in place (a no-op at ``wd = 0``)."""
    if group["weight_decay"] != 0:
        tensor.mul_(1 - group_lr(group) * group["weight_decay"])


def heavy_ball_(
    buffers: list[Tensor], directions: list[Tensor], momentum: float | list[Tensor],
    dampening: float = 0.0, nesterov: bool = False,
) -> list[Tensor]:
    """Heavy-ball momentum over many tensors at once (``torch._foreach``).

    ``b ← μ·b + (1 − d)·u`` in place; returns ``b`` (copies), or ``(1 − d)·u + μ·b`` with
    ``nesterov`` (``directions`` are then modified in place). ``momentum`` may be one float or
    one 0-d tensor per buffer (a mask: 1 keeps a skipped block's buffer as it was when its
    direction is 0). SINGD's ``b ← α₂b + d`` is ``d = 0``; Shampoo's is distributed_shampoo's.
    """
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, directions, alpha=1 - dampening)
    if not nesterov:
        return [buffer.clone() for buffer in buffers]
    torch._foreach_mul_(directions, 1 - dampening)
    torch._foreach_add_(directions, torch._foreach_mul(buffers, momentum))
    return directions


def check_lr(value: Any) -> None:
    """``lr ≥ 0``: a real number or a 0-d real Tensor (as torch.optim accepts)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or not value.is_floating_point():
            raise ValueError(f"Invalid lr: a Tensor lr must be a 0-d real tensor, got {tuple(value.shape)}")
        value = float(value)
    check_real("lr", value, low=0.0)


@contextlib.contextmanager
def autocast_disabled() -> Iterator[None]:
    """Disable autocast on every device type for the duration of an optimizer step."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if device_type == "cuda" and not torch.cuda.is_available():
                continue
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def _to_device_keep_dtype(value: Any, device: torch.device) -> Any:
    """Copy ``value`` moving every tensor inside it to ``device``; a plain-number ``step`` becomes
    an int64 tensor (state saved by code that kept Python counters)."""
    if isinstance(value, Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {
            key: torch.tensor(item, dtype=torch.int64) if key == "step" and isinstance(item, (int, float))
            and not isinstance(item, bool) else _to_device_keep_dtype(item, device)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_to_device_keep_dtype(item, device) for item in value]
    if isinstance(value, tuple):
        return tuple(_to_device_keep_dtype(item, device) for item in value)
    return value


class SecondOrderOptimizer(Optimizer):
    """Base class of every optimizer of the suite (module docstring).

    Subclasses implement ``_validate_group(group)`` (raise ``Invalid <name>`` errors; may
    normalise values in place) and ``_step()`` (or ``_closure_step(closure)`` with
    ``closure_required = True``). Runtime objects that must not be pickled are listed in
    ``_runtime_attributes`` and rebuilt by ``_rebuild_runtime()``.
    """

    closure_required = False
    supports_maximize = True
    _step_supports_amp_scaling = True
    _meaning_keys: tuple[str, ...] = ()  # group keys whose value changes what the state means
    # Group options added in a later release → the value that reproduces the earlier behaviour,
    # filled into older checkpoints (which would otherwise be refused as not this optimizer's).
    _options_added_later: dict[str, Any] = {}
    _runtime_attributes: tuple[str, ...] = ()

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(maximize, bool):
            raise TypeError(f"Invalid maximize: {maximize!r} (expected a bool)")
        if maximize and not self.supports_maximize:
            raise ValueError(f"Invalid maximize: {type(self).__name__} minimises a loss it evaluates itself; "
                             "maximize=True is not supported (negate the loss instead)")
        if foreach not in (None, True, False):
            raise TypeError(f"Invalid foreach: {foreach!r} (expected None or a bool)")
        if differentiable:
            raise ValueError("Invalid differentiable: differentiating through second-order steps is not supported")
        if fused:
            raise ValueError("Invalid fused: there are no fused kernels; leave fused=None")
        self._warned: set[str] = set()
        defaults = dict(defaults, maximize=maximize, foreach=foreach, differentiable=False, fused=None)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups
    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group`` with every hyperparameter validated (module doc)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid param group: expected a dict, got {type(param_group).__name__}")
        unknown = sorted(set(param_group) - set(self.defaults) - set(_TORCH_GROUP_KEYS))
        if unknown:
            raise ValueError(f"Invalid param group: unknown key {unknown[0]!r} for {type(self).__name__} "
                             f"(known: {sorted(self.defaults)})")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        plain = [p[1] if isinstance(p, tuple) else p for p in params]
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        for param in plain:
            if isinstance(param, Tensor) and param.is_complex():
                raise ValueError("Invalid params: complex parameters are not supported "
                                 "(view them as real with torch.view_as_real)")
            if id(param) in seen:
                raise ValueError("Invalid params: a parameter appears more than once "
                                 "(in one param group or across groups)")
            seen.add(id(param))
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if not isinstance(merged["maximize"], bool):
            raise TypeError(f"Invalid maximize: {merged['maximize']!r} (expected a bool)")
        if merged["maximize"] and not self.supports_maximize:
            raise ValueError(f"Invalid maximize: not supported by {type(self).__name__}")
        self._validate_group(merged)
        super().add_param_group(dict(param_group, params=params))
        group = self.param_groups[-1]
        for key in self.defaults:
            group[key] = merged[key]

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D401 - torch name
        """Load a ``state_dict`` after checking it belongs to this optimizer (module docstring).

        The argument must be called ``state_dict``: DCP's ``set_optimizer_state_dict`` passes it
        by keyword. Tensors are copied (never aliased) and moved to the parameter's device only.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        for saved in saved_groups:  # checkpoints older than an option behave as they did then
            for key, value in self._options_added_later.items():
                saved.setdefault(key, value)
        saved_state = state_dict["state"]
        self._check_loadable(saved_groups, saved_state)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups), strict=True))
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for key, value in saved_state.items():
            if key in id_map:
                param = id_map[key]
                state[param] = _to_device_keep_dtype(copy.deepcopy(value), param.device)
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            for key, value in saved.items():
                if isinstance(value, list) and isinstance(group.get(key), tuple):
                    saved[key] = tuple(value)  # JSON-like round trips turn tuples into lists
            new_groups.append(saved)
        self.state, self.param_groups = state, new_groups
        self._after_load()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _after_load(self) -> None:
        """Hook for subclasses: re-derive runtime decisions (e.g. when to record) after a load."""

    def _check_loadable(self, saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any]) -> None:
        name = type(self).__name__
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"Invalid state_dict: {len(saved_groups)} param groups saved, "
                             f"{name} has {len(self.param_groups)}")
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"Invalid state_dict: param group {index} holds {len(saved['params'])} "
                                 f"parameters, {name}'s holds {len(group['params'])}")
            missing = sorted(set(self.defaults) - set(saved) - {"maximize", "foreach", "differentiable", "fused"})
            extra = sorted(set(saved) - set(self.defaults) - set(_TORCH_GROUP_KEYS))
            if missing or extra:
                raise ValueError(f"Invalid state_dict: it was not saved by {name} (param group {index} "
                                 f"lacks {missing} / has unknown {extra})")
            for key in self._meaning_keys:
                if saved.get(key) != group.get(key):
                    raise ValueError(f"Invalid state_dict: saved with {key}={saved.get(key)!r}, this "
                                     f"{name} has {key}={group.get(key)!r} (the state means something else)")
            for saved_id, param in zip(saved["params"], group["params"]):
                for key, value in (saved_state.get(saved_id) or {}).items():
                    if key in PARAM_SHAPED_STATE and isinstance(value, Tensor) and value.shape != param.shape:
                        raise ValueError(f"Invalid state_dict: state {key!r} has shape {tuple(value.shape)}, "
                                         f"its parameter {tuple(param.shape)}")
                self._check_param_state(param, group, saved_state.get(saved_id) or {})

    def _check_param_state(self, param: Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        """Hook for subclasses: raise ``Invalid state_dict`` when ``saved`` does not fit ``param``."""

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self._runtime_attributes:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_warned" not in self.__dict__:
            self._warned = set()
        if self._runtime_attributes and not all(hasattr(self, name) for name in self._runtime_attributes):
            self._rebuild_runtime()

    def _rebuild_runtime(self) -> None:
        """Recreate the objects named in ``_runtime_attributes`` (after a copy or unpickling)."""
        if "_distributor_spec" in self.__dict__:
            self.distributor = resolve_distributor(self._distributor_spec)

    def _use_distributor(self, distributor: Any) -> None:
        """Resolve ``distributor`` (``None``, ``True``, a process group or a Distributor). A
        process group cannot be pickled, so a copy re-resolves the default group (``True``)."""
        self._distributor_spec = None if distributor is None or distributor is False else True
        self.distributor = resolve_distributor(distributor)

    # ------------------------------------------------------------------ the step
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.closure_required:  # GradScaler.step cannot pass a closure to them
            cls._step_supports_amp_scaling = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; returns the closure's loss (module docstring for the phases)."""
        with autocast_disabled():
            if self.closure_required:
                if closure is None:
                    # All-zero gradients without a closure: torch.distributed.checkpoint
                    # materialising the state of a fresh optimizer. A no-op, not a user's step.
                    if any(p.grad is not None and bool(p.grad.any())
                           for group in self.param_groups for p in group["params"]):
                        raise RuntimeError(
                            f"{type(self).__name__}.step() needs a closure: call "
                            f"optimizer.step(closure) with a closure that {self._closure_contract} "
                            "(with Hugging Face Trainer or Lightning see secondorder.integrations)")
                    self._prepare_state_without_step()
                    return None
                return self._closure_step(closure)
            loss = self._evaluate_closure(closure)
            if self._scaler_found_inf():
                self._skip_scaled_step()
                return loss
            self._unscale_gradients()
            negate = [g for group in self.param_groups if group["maximize"]
                      for p in group["params"] if (g := p.grad) is not None]
            if negate:
                torch._foreach_neg_(negate)
            try:
                self._step()
            finally:
                if negate:
                    torch._foreach_neg_(negate)
        return loss

    _closure_contract = "evaluates the model and returns the loss"

    def _step(self) -> None:
        raise NotImplementedError

    def _closure_step(self, closure: Callable[[], Any]) -> Any:
        raise NotImplementedError

    def _prepare_state_without_step(self) -> None:
        """Closure optimizers: allocate state a checkpoint needs, without a step (DCP)."""

    def _skip_scaled_step(self) -> None:
        """A GradScaler step with inf/NaN gradients: nothing changes (subclasses drop captures)."""

    def _scaler_found_inf(self) -> bool:
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf > 0)

    def _unscale_gradients(self) -> None:
        """Divide gradients that still carry GradScaler's scale by it (in place)."""
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.div_(grad_scale.to(param.grad.device))

    @staticmethod
    def _evaluate_closure(closure: Callable[[], Any] | None) -> Any:
        """Run ``closure`` with gradients enabled (torch.optim convention) and return its value."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # ------------------------------------------------------------------ non-finite input
    @staticmethod
    def _finite_units(units: list[list[Tensor]]) -> list[bool]:
        """Per unit (a list of tensors: a block's gradient, a layer's gradients and statistics),
        whether every floating entry is finite. One fused ``inf``-norm, one host sync."""
        flat, owner = [], []
        for index, unit in enumerate(units):
            for tensor in unit:
                if tensor is not None and tensor.is_floating_point() and tensor.numel():
                    flat.append(tensor)
                    owner.append(index)
        finite = [True] * len(units)
        if not flat:
            return finite
        norms = torch._foreach_norm(flat, ord=math.inf)
        device = norms[0].device
        flags = torch.isfinite(torch.stack([n.to(device, torch.float32) for n in norms])).tolist()
        for index, flag in zip(owner, flags):
            finite[index] = finite[index] and flag
        return finite

    def _skip_unit(self, state: dict[str, Any], cause: str) -> None:
        """Count a skipped unit in ``state["nonfinite_skips"]`` and warn once per cause."""
        counter = state.get("nonfinite_skips")
        if counter is None:
            state["nonfinite_skips"] = counter = torch.zeros((), dtype=torch.int64)
        counter.add_(1)
        self._warn_once(cause)

    def _numerical_failure(self, state: dict[str, Any], cause: str) -> None:
        """Count a failed amortised computation (``state["numerical_failures"]``; the last good
        factors / inverses are kept by the caller) and warn once per cause."""
        counter = state.get("numerical_failures")
        if counter is None:
            state["numerical_failures"] = counter = torch.zeros((), dtype=torch.int64)
        counter.add_(1)
        self._warn_once(cause)

    def _warn_once(self, cause: str) -> None:
        if cause in self._warned:
            return
        self._warned.add(cause)
        warnings.warn(f"{type(self).__name__}: {cause} (state kept; counted in "
                      "optimizer.nonfinite_skips(); warned once)", NumericalWarning, stacklevel=5)

    def nonfinite_skips(self) -> int:
        """How many units (blocks, layers or whole steps) were skipped for non-finite input."""
        total = 0

        def walk(value: Any) -> None:
            nonlocal total
            if isinstance(value, dict):
                for key, item in value.items():
                    if key == "nonfinite_skips":
                        total += int(item)
                    else:
                        walk(item)

        for value in self.state.values():
            walk(value)
        return total

    def describe(self) -> str:
        """One line per parameter group: how many parameters are preconditioned, and how."""
        lines = []
        for index, group in enumerate(self.param_groups):
            lines.append(f"group {index}: {len(group['params'])} parameters")
        return f"{type(self).__name__}: " + "; ".join(lines)
