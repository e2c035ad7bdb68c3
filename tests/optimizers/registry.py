"""The contract registry: one entry per optimizer of the package.

The generic tests in ``test_contract.py`` run over every entry (PyTorch's OptimizerInfo idea).
Each optimizer module's author adds one ``OptimizerSpec`` to ``REGISTRY`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Contract features an entry may opt out of, each with the reason written in ``skips``.
FEATURES = (
    "state_dict",  # mid-run round trip continues bit-identically
    "dcp",  # get_/set_optimizer_state_dict round trip
    "scheduler",  # StepLR / OneCycleLR take effect
    "param_groups",  # groups with different hyperparameters; add_param_group
    "no_grad_params",  # parameters without gradient untouched
    "zero_grad_step",  # an all-zero gradient step gives no NaN
    "closure",  # step(closure) returns the loss
    "grad_scaler",  # GradScaler("cpu") with unscale_ + clipping
    "accumulation",  # gradient accumulation over micro-batches == one big batch step direction
    "determinism",  # same seed => same result
    "bf16",  # bf16 params keep fp32 optimizer state
    "loss_decreases",  # trains a toy problem
)


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer for the generic contract tests.

    ``make(model, **overrides)`` returns the optimizer for ``model`` (a small ``nn.Sequential``
    of Linear/Tanh layers, float32 unless a test says otherwise); ``overrides`` are
    hyperparameters a test wants set (e.g. ``lr``). ``bad_arguments`` lists
    ``(kwargs, argument_name)`` pairs: building with ``kwargs`` must raise ValueError or
    TypeError whose message contains ``argument_name``. ``closure_driven`` optimizers
    (exact Gauss-Newton, SANIA) need a closure every step; ``make_closure(model, x, y, loss_fn)``
    builds one for them. ``skips`` maps a feature of ``FEATURES`` to why it cannot apply.
    """

    name: str
    make: Callable[..., torch.optim.Optimizer]
    bad_arguments: tuple[tuple[dict[str, Any], str], ...] = ()
    closure_driven: bool = False
    make_closure: Callable[..., Callable[[], Any]] | None = None
    momentum_key: str | None = "betas"  # what OneCycleLR may cycle ("betas", "momentum" or None)
    skips: dict[str, str] = field(default_factory=dict)
    lr: float = 1e-2  # a learning rate that trains the toy problems


REGISTRY: list[OptimizerSpec] = []


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to the registry (names must be unique)."""
    if any(existing.name == spec.name for existing in REGISTRY):
        raise ValueError(f"duplicate optimizer spec {spec.name}")
    REGISTRY.append(spec)
    return spec


def toy_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer tanh MLP 6 -> 8 -> 3 used by the contract tests."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
