"""The contract registry: one entry per optimizer of the package (and per main mode).

The generic tests in ``test_contract.py`` and the drop-in contract matrix (``test_drop_in.py``,
``test_faults.py``, ``test_mixed_precision.py``, ``test_state_dict_contract.py``) run over
every entry (PyTorch's OptimizerInfo idea). A new optimizer gets the whole suite by adding one
``OptimizerSpec`` to ``REGISTRY`` below.
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

# How an optimizer skips non-finite input (CONTRACT.md, "Non-finite input"):
#   "blocks"  - Shampoo: the preconditioner blocks holding a non-finite gradient entry;
#   "capture" - EKFAC, AdaFisher(W), SINGD: the layer (weight and bias together) of model=;
#   "closure" - ExactGaussNewton, SANIA: the whole step (they need step(closure)).
FAMILIES = ("blocks", "capture", "closure")
WHOLE = (slice(None), slice(None))


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer for the generic contract tests.

    ``build(params, module, **overrides)`` constructs ``secondorder.<cls_name>`` from ``params``
    (tensors or param groups) with the entry's ``fixed`` keyword arguments, ``model=module`` for
    the entries that take a model (capture optimizers, exact Gauss-Newton) and ``overrides``.
    ``make(module, **overrides)`` is ``build(module.parameters(), module, **overrides)`` (a small
    ``nn.Sequential`` of Linear/Tanh layers, float32 unless a test says otherwise).

    ``bad_arguments`` lists ``(kwargs, argument_name)`` pairs: building with ``kwargs`` must raise
    ValueError or TypeError whose message contains ``argument_name``. ``group_bad_values`` lists
    ``(group_kwargs, argument_name)`` pairs that a *param group* may not carry: the constructor
    and ``add_param_group`` raise ValueError containing ``"Invalid <argument_name>"``.
    ``family`` is one of ``FAMILIES``; closure optimizers need a closure every step and
    ``make_closure(model, x, y, loss_fn)`` builds one for them. ``skips`` maps a feature of
    ``FEATURES`` to why it cannot apply. ``config_twins`` names the registry entries whose state
    must be refused by ``load_state_dict`` although the class is the same or a subclass
    (the configuration changes the state's meaning). ``first_block`` is the region of the first
    layer's weight that forms the preconditioner block holding entry ``[0, 0]`` (blocks family).
    """

    name: str
    cls_name: str
    family: str
    fixed: dict[str, Any] = field(default_factory=dict)
    bad_arguments: tuple[tuple[dict[str, Any], str], ...] = ()
    group_bad_values: tuple[tuple[dict[str, Any], str], ...] = ()
    make_closure: Callable[..., Callable[[], Any]] | None = None
    momentum_key: str | None = "betas"  # what OneCycleLR may cycle ("betas", "momentum" or None)
    skips: dict[str, str] = field(default_factory=dict)
    lr: float = 1e-2  # a learning rate that trains the toy problems
    supports_maximize: bool = True  # False: maximize=True raises ValueError naming "maximize"
    has_weight_decay: bool = True  # a per-group ``weight_decay`` hyperparameter exists
    common_keywords: dict[str, Any] = field(default_factory=dict)  # shared names it must accept
    config_twins: tuple[str, ...] = ()
    # capture family: the optimizer's own name of its statistics schedule (``stats_every`` is
    # the common name every layer optimizer also accepts)
    schedule_key: str | None = None
    first_block: tuple[slice, slice] = WHOLE

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Invalid family: {self.family!r} (expected one of {FAMILIES})")
        if (self.family == "closure") != (self.make_closure is not None):
            raise ValueError(f"{self.name}: closure optimizers, and only they, need make_closure")

    @property
    def closure_driven(self) -> bool:
        return self.family == "closure"

    @property
    def takes_model(self) -> bool:
        """Whether the constructor takes ``model=`` (capture optimizers and exact Gauss-Newton)."""
        return self.family == "capture" or self.cls_name == "ExactGaussNewton"

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        import secondorder

        return getattr(secondorder, self.cls_name)

    # positional-only: an override may itself be called ``model`` (a bad-argument case)
    def build(self, params: Any, module: nn.Module | None = None, /, **overrides: Any) -> torch.optim.Optimizer:
        kwargs = dict(self.fixed)
        if self.takes_model and module is not None:
            kwargs["model"] = module
        kwargs.update(overrides)
        return self.optimizer_class(params, **kwargs)

    def make(self, module: nn.Module, /, **overrides: Any) -> torch.optim.Optimizer:
        return self.build(module.parameters(), module, **overrides)


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


# Per-group values every optimizer must refuse with the constructor's message (issue 13's list:
# lr=-1, betas=(1.5, 0.9), damping=-1), where the optimizer has the hyperparameter.
_BAD_LR = ({"lr": -1.0}, "lr")
_BAD_BETAS = ({"betas": (1.5, 0.9)}, "betas")
_BAD_DAMPING = ({"damping": -1.0}, "damping")
_BAD_WEIGHT_DECAY = ({"weight_decay": -1.0}, "weight_decay")
# The keyword names the capture optimizers share (CONTRACT.md, "Constructors").
_CAPTURE_KEYWORDS = {"lr": 1e-2, "betas": (0.9, 0.999), "damping": 1e-3, "weight_decay": 0.0, "eps": 1e-8}


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
    ({"graft_scale": 0.0}, "graft_scale"),
    ({"graft_norm_beta": 1.0}, "graft_norm_beta"),
    ({"graft_norm_beta": -0.1}, "graft_norm_beta"),
    ({"factor_dtype": torch.float16}, "factor_dtype"),
    ({"inverse_exponent_override": {2: -0.5}}, "inverse_exponent_override"),
)
_SHAMPOO_COMMON = dict(
    family="blocks",
    cls_name="Shampoo",
    group_bad_values=(_BAD_LR, _BAD_BETAS, _BAD_WEIGHT_DECAY),
    common_keywords={"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 0.0},
)
# frequency 2 so that short contract runs cross several amortised steps
_SHAMPOO_FIXED = {"lr": 1e-2, "precondition_frequency": 2}

register(OptimizerSpec(name="Shampoo", fixed=_SHAMPOO_FIXED, bad_arguments=_SHAMPOO_BAD_ARGUMENTS,
                       config_twins=("Shampoo-SOAP",), **_SHAMPOO_COMMON))
register(OptimizerSpec(name="Shampoo-SOAP", fixed=dict(_SHAMPOO_FIXED, eigenvalue_correction=True),
                       bad_arguments=(({"epsilon": -1.0}, "epsilon"),
                                      ({"relative_epsilon": -1.0}, "relative_epsilon")),
                       config_twins=("Shampoo",), **_SHAMPOO_COMMON))
register(OptimizerSpec(name="Shampoo-momentum-fp64", fixed=dict(
    _SHAMPOO_FIXED, momentum=0.5, nesterov=True, factor_dtype=torch.float64, precondition_1d=True,
    max_preconditioner_dim=4), first_block=(slice(0, 4), slice(0, 4)), **_SHAMPOO_COMMON))


# --------------------------------------------------------------------------------------- SANIA
def _sania_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> Callable[[], Any]:
    """SANIA's closure returns the loss and leaves differentiation to the optimizer."""
    return lambda: loss_fn(model(x), y)


register(
    OptimizerSpec(
        name="SANIA",
        cls_name="SANIA",
        family="closure",
        fixed={"lr": 1.0},
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
        group_bad_values=(_BAD_LR, ({"eps": -1.0}, "eps"), ({"beta2": 1.0}, "beta2")),
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
        supports_maximize=False,  # the Polyak step size assumes a loss bounded below by f_star
        has_weight_decay=False,
        common_keywords={"lr": 1.0, "eps": 0.1},
    )
)


# --------------------------------------------------------------------------------------- EKFAC
register(
    OptimizerSpec(
        name="EKFAC",
        cls_name="EKFAC",
        family="capture",
        # statistics and eigenbases every step so that short contract runs exercise every path
        fixed={"lr": 1e-2, "stats_every": 1, "precondition_frequency": 2},
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
        group_bad_values=(_BAD_LR, _BAD_BETAS, _BAD_DAMPING, _BAD_WEIGHT_DECAY),
        momentum_key="betas",
        common_keywords=_CAPTURE_KEYWORDS,
        schedule_key="stats_every",
    )
)


# ------------------------------------------------------------------------- AdaFisher(W)
for _name, _twin in (("AdaFisher", "AdaFisherW"), ("AdaFisherW", "AdaFisher")):
    register(
        OptimizerSpec(
            name=_name,
            cls_name=_name,
            family="capture",
            fixed={"lr": 1e-2, "update_freq": 2},
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
                ({"normalization": "max"}, "normalization"),
                ({"graft": "sgd"}, "graft"),
                ({"power": 0.0}, "power"),
                ({"step_scale": 0.0}, "step_scale"),
                ({"loss_average": "tokens"}, "loss_average"),
                ({"model": "not a module"}, "model"),
            ),
            group_bad_values=(_BAD_LR, _BAD_BETAS, _BAD_DAMPING, _BAD_WEIGHT_DECAY,
                              ({"gamma": 1.0}, "gamma")),
            momentum_key="betas",
            lr=1e-2,  # Adam-norm grafting (the default): an Adam-sized lr
            common_keywords=dict(_CAPTURE_KEYWORDS, lr=1e-2),
            config_twins=(_twin,),
            schedule_key="update_freq",
        )
    )


# --------------------------------------------------------------------------------------- SINGD
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
# factors updated every step (T=1) so that short contract runs exercise every path
_SINGD_FIXED = {"lr": 1e-2, "T": 1, "lr_cov": 5e-2}
_SINGD_COMMON = dict(
    cls_name="SINGD",
    family="capture",
    bad_arguments=_SINGD_BAD_ARGUMENTS,
    group_bad_values=(_BAD_LR, _BAD_BETAS, _BAD_DAMPING, _BAD_WEIGHT_DECAY),
    momentum_key="momentum",
    common_keywords=_CAPTURE_KEYWORDS,
    schedule_key="T",
)
register(OptimizerSpec(name="SINGD", fixed=_SINGD_FIXED, **_SINGD_COMMON))
register(OptimizerSpec(name="SINGD-block-ikfac",
                       fixed=dict(_SINGD_FIXED, structures="block3diagonal", kfac_like=True),
                       **_SINGD_COMMON))


# ---------------------------------------------------------------------------- ExactGaussNewton
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
_EGN_COMMON = dict(
    cls_name="ExactGaussNewton",
    family="closure",
    group_bad_values=(_BAD_LR, _BAD_DAMPING, ({"momentum": 1.0}, "momentum")),
    make_closure=_gauss_newton_closure,
    momentum_key="momentum",
    lr=1.0,
    supports_maximize=False,  # a Gauss-Newton model of the loss is convex: no ascent direction
    has_weight_decay=False,
    common_keywords={"lr": 1.0, "damping": 1e-2},
)
# the contract's loss_fn is F.mse_loss, which loss="mse" reproduces exactly
_EGN_FIXED = {"loss": "mse", "lr": 1.0, "damping": 1e-2}
register(
    OptimizerSpec(
        name="ExactGaussNewton",
        fixed=_EGN_FIXED,
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
        skips=dict(
            _EGN_SKIPS,
            bf16="without momentum EGN keeps no floating state beyond scalars; the "
            "ExactGaussNewton-momentum entry checks the float32 momentum buffer of bf16 parameters",
        ),
        **_EGN_COMMON,
    )
)
register(
    OptimizerSpec(
        name="ExactGaussNewton-momentum",
        fixed=dict(_EGN_FIXED, momentum=0.3, line_search=True, adaptive_damping=True, solve="batch"),
        skips=dict(_EGN_SKIPS),
        **_EGN_COMMON,
    )
)
