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


# ------------------------------------------------------------------------------------- Shampoo
_SHAMPOO_BAD_ARGUMENTS = (
    ({"lr": -1.0}, "lr"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (0.9, 1.5)}, "betas"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay_type": "l1"}, "weight_decay_type"),
    ({"momentum": 1.0}, "momentum"),
    ({"dampening": -0.5}, "dampening"),
    ({"nesterov": True}, "nesterov"),
    ({"precondition_frequency": 0}, "precondition_frequency"),
    ({"precondition_frequency": 2.5}, "precondition_frequency"),
    ({"start_preconditioning_step": 0}, "start_preconditioning_step"),
    ({"max_preconditioner_dim": 0}, "max_preconditioner_dim"),
    ({"grafting": "lion"}, "grafting"),
    ({"graft_beta2": 1.5}, "graft_beta2"),
    ({"graft_epsilon": 0.0}, "graft_epsilon"),
    ({"factor_dtype": torch.float16}, "factor_dtype"),
    ({"inverse_exponent_override": {2: -0.5}}, "inverse_exponent_override"),
)


def _make_shampoo(**fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        from secondorder import Shampoo

        # frequency 2 so that short contract runs cross several amortised steps
        return Shampoo(model.parameters(), **{"lr": 1e-2, "precondition_frequency": 2, **fixed, **overrides})

    return make


register(OptimizerSpec(name="Shampoo", make=_make_shampoo(), bad_arguments=_SHAMPOO_BAD_ARGUMENTS))
register(OptimizerSpec(name="Shampoo-SOAP", make=_make_shampoo(eigenvalue_correction=True),
                       bad_arguments=(({"epsilon": -1.0}, "epsilon"),
                                      ({"relative_epsilon": -1.0}, "relative_epsilon"))))
register(OptimizerSpec(name="Shampoo-momentum-fp64", make=_make_shampoo(
    momentum=0.5, nesterov=True, factor_dtype=torch.float64, precondition_1d=True, max_preconditioner_dim=4)))


# --------------------------------------------------------------------------------------- SANIA
def _make_sania(model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
    from secondorder import SANIA

    return SANIA(model.parameters(), **{"lr": 1.0, **overrides})


def _sania_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> Callable[[], Any]:
    """SANIA's closure returns the loss and leaves differentiation to the optimizer."""
    return lambda: loss_fn(model(x), y)


register(
    OptimizerSpec(
        name="SANIA",
        make=_make_sania,
        bad_arguments=(
            ({"lr": -1.0}, "lr"),
            ({"preconditioner": "newton"}, "preconditioner"),
            ({"model": "cubic"}, "model"),
            ({"eps": -1.0}, "eps"),
            ({"beta2": 1.0}, "beta2"),
            ({"hutch_alpha": 0.0}, "hutch_alpha"),
            ({"hutch_init_iters": 0}, "hutch_init_iters"),
            ({"f_star": float("nan")}, "f_star"),
        ),
        closure_driven=True,
        make_closure=_sania_closure,
        momentum_key=None,  # no momentum: Adam-SQR keeps only a second moment (beta2)
        skips={
            "grad_scaler": "GradScaler.step refuses closures, and SANIA needs one (its step size "
            "comes from the closure's loss value)",
            "accumulation": "the Polyak step needs the loss and gradient of one closure evaluation; "
            "accumulate micro-batches inside the closure instead (backward per micro-batch, return "
            "the mean loss)",
        },
        lr=1.0,  # a multiplier of the Polyak step, 1 as published
    )
)


# --------------------------------------------------------------------------------------- EKFAC
def _make_ekfac(model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
    from secondorder import EKFAC

    # statistics and eigenbases every step so that short contract runs exercise every path
    kwargs = {"model": model, "lr": 1e-2, "stats_every": 1, "precondition_frequency": 2, **overrides}
    return EKFAC(model.parameters(), **kwargs)


register(
    OptimizerSpec(
        name="EKFAC",
        make=_make_ekfac,
        bad_arguments=(
            ({"lr": -1.0}, "lr"),
            ({"betas": (1.0, 0.9)}, "betas"),
            ({"damping": 0.0}, "damping"),
            ({"weight_decay": -1.0}, "weight_decay"),
            ({"weight_decay_type": "l1"}, "weight_decay_type"),
            ({"stat_decay": 1.0}, "stat_decay"),
            ({"kl_clip": 0.0}, "kl_clip"),
            ({"stats_every": 0}, "stats_every"),
            ({"correction_every": 0}, "correction_every"),
            ({"precondition_frequency": 0}, "precondition_frequency"),
            ({"loss_reduction": "none"}, "loss_reduction"),
            ({"model": "not a module"}, "model"),
        ),
        momentum_key="betas",
    )
)


# ------------------------------------------------------------------------- AdaFisher(W)
def _make_adafisher(cls_name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        import secondorder

        kwargs = {"model": model, "lr": 1e-3, "update_freq": 2, **overrides}
        return getattr(secondorder, cls_name)(model.parameters(), **kwargs)

    return make


for _name in ("AdaFisher", "AdaFisherW"):
    register(
        OptimizerSpec(
            name=_name,
            make=_make_adafisher(_name),
            bad_arguments=(
                ({"lr": -1.0}, "lr"),
                ({"betas": (1.0, 0.9)}, "betas"),
                ({"damping": 0.0}, "damping"),
                ({"gamma": 1.0}, "gamma"),
                ({"weight_decay": -1.0}, "weight_decay"),
                ({"update_freq": 0}, "update_freq"),
                ({"ema": "convex"}, "ema"),
                ({"minmax_eps": 0.0}, "minmax_eps"),
                ({"unsupported": "skip"}, "unsupported"),
                ({"model": "not a module"}, "model"),
                ({"normalization": "max"}, "normalization"),
                ({"graft": "sgd"}, "graft"),
                ({"power": 0.0}, "power"),
            ),
            momentum_key="betas",
            lr=1e-2,  # Adam-norm grafting (the default): an Adam-sized lr
        )
    )


# --------------------------------------------------------------------------------------- SINGD
def _make_singd(**fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        from secondorder import SINGD

        # factors updated every step (T=1) so that short contract runs exercise every path
        kwargs = {"model": model, "lr": 1e-2, "T": 1, "lr_cov": 5e-2, **fixed, **overrides}
        return SINGD(model.parameters(), **kwargs)

    return make


_SINGD_BAD_ARGUMENTS = (
    ({"lr": -1.0}, "lr"),
    ({"lr_cov": -1.0}, "lr_cov"),
    ({"momentum": 1.0}, "momentum"),
    ({"damping": -1.0}, "damping"),
    ({"alpha1": 1.0}, "alpha1"),
    ({"T": 0}, "T"),
    ({"structures": ("dense", "sparse")}, "structures"),
    ({"kfac_approx": "mean"}, "kfac_approx"),
    ({"loss_average": "tokens"}, "loss_average"),
    ({"init_scale": 0.0}, "init_scale"),
    ({"model": "not a module"}, "model"),
)
register(OptimizerSpec(name="SINGD", make=_make_singd(), bad_arguments=_SINGD_BAD_ARGUMENTS,
                       momentum_key="momentum"))
register(OptimizerSpec(name="SINGD-block-ikfac",
                       make=_make_singd(structures="block3diagonal", kfac_like=True),
                       bad_arguments=_SINGD_BAD_ARGUMENTS, momentum_key="momentum"))


# ---------------------------------------------------------------------------- ExactGaussNewton
def _make_exact_gauss_newton(**fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        from secondorder import ExactGaussNewton

        # the contract's loss_fn is F.mse_loss, which loss="mse" reproduces exactly
        kwargs = {"model": model, "loss": "mse", "lr": 1.0, "damping": 1e-2}
        kwargs.update(fixed, **overrides)
        return ExactGaussNewton(model.parameters(), **kwargs)

    return make


def _gauss_newton_closure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable
) -> Callable[[], Any]:
    """EGN's closure returns (outputs, targets); the optimizer computes F.mse_loss itself."""
    return lambda: (model(x), y)


_EGN_SKIPS = {
    "grad_scaler": "GradScaler.step refuses closures, and exact Gauss-Newton needs one (it "
    "differentiates the closure's outputs itself and never reads .grad)",
    "accumulation": "the optimizer never reads .grad: it builds the Jacobian of the closure's "
    "outputs; for a larger batch return the concatenated outputs of several micro-batch "
    "forwards from the closure (same step as one big batch)",
}
register(
    OptimizerSpec(
        name="ExactGaussNewton",
        make=_make_exact_gauss_newton(),
        bad_arguments=(
            ({"lr": -1.0}, "lr"),
            ({"damping": 0.0}, "damping"),
            ({"momentum": 1.0}, "momentum"),
            ({"solve": "qr"}, "solve"),
            ({"loss": "hinge"}, "loss"),
            ({"line_search": 1}, "line_search"),
            ({"armijo_c": 0.0}, "armijo_c"),
            ({"max_backtracks": 0}, "max_backtracks"),
            ({"model": "not a module"}, "model"),
        ),
        closure_driven=True,
        make_closure=_gauss_newton_closure,
        momentum_key="momentum",
        skips=dict(
            _EGN_SKIPS,
            bf16="without momentum EGN keeps no floating state beyond scalars; the "
            "ExactGaussNewton-momentum entry checks the float32 momentum buffer of bf16 parameters",
        ),
        lr=1.0,
    )
)
register(
    OptimizerSpec(
        name="ExactGaussNewton-momentum",
        make=_make_exact_gauss_newton(
            momentum=0.3, line_search=True, adaptive_damping=True, solve="batch"
        ),
        closure_driven=True,
        make_closure=_gauss_newton_closure,
        momentum_key="momentum",
        skips=dict(_EGN_SKIPS),
        lr=1.0,
    )
)
