"""torch.optim plumbing shared by every optimizer of the suite.

``SecondOrderOptimizer`` is a thin subclass of :class:`torch.optim.Optimizer` that fixes the
parts of the base class a second-order optimizer cannot live with:

* ``load_state_dict`` keeps each saved tensor's dtype (torch casts every floating *and
  integer* state tensor to the parameter dtype, pytorch/pytorch#43706, which would turn
  float32 factors of a bf16 model into bf16 and int64 counters into floats) and copies the
  tensors instead of aliasing the caller's.
* Optimizers that read layer inputs need the model: :func:`split_model_argument` accepts
  ``Optimizer(model.parameters(), model=model)`` and the shorthand ``Optimizer(model)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]


def split_model_argument(params: ParamsT | nn.Module, model: nn.Module | None) -> tuple[ParamsT, nn.Module | None]:
    """Return ``(params, model)`` from the two ways of passing a model.

    ``Optimizer(model)`` is shorthand for ``Optimizer(model.parameters(), model=model)``.
    Passing a module *and* a different ``model=`` is refused.
    """
    if isinstance(params, nn.Module):
        if model is not None and model is not params:
            raise ValueError("Invalid model: a module was passed as params and a different one as model=")
        return list(params.parameters()), params
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    return params, model


def _to_device_keep_dtype(value: Any, device: torch.device) -> Any:
    """Move every tensor inside ``value`` to ``device``; dtypes and Python values untouched."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {key: _to_device_keep_dtype(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_device_keep_dtype(item, device) for item in value]
    if isinstance(value, tuple):
        return tuple(_to_device_keep_dtype(item, device) for item in value)
    return value


class SecondOrderOptimizer(Optimizer):
    """Base class: dtype-preserving checkpoints and the closure convention of torch.optim."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D401 - torch name
        """Load a ``state_dict`` keeping every state tensor's dtype.

        The argument must be called ``state_dict``: DCP's ``set_optimizer_state_dict`` passes it
        by keyword. Tensors are deep-copied (no aliasing of the caller's dict) and moved to the
        parameter's device only.
        """
        state_dict = copy.deepcopy(state_dict)
        saved_state = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id in saved_state:
                self.state[param] = _to_device_keep_dtype(saved_state[saved_id], param.device)

    @staticmethod
    def _evaluate_closure(closure: Callable[[], Any] | None) -> Any:
        """Run ``closure`` with gradients enabled (torch.optim convention) and return its value."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()
