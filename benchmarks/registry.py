"""The race's optimizer table: name -> how to build it for a model and a workload.

Adding an optimizer is one ``register(RaceEntry(...))`` call at the bottom of this file::

    register(RaceEntry(
        "EKFAC", "secondorder:EKFAC",
        hyper={"*": dict(lr=1e-3, damping=1e-3), "W2": dict(lr=3e-4)},
        pass_model=True,              # constructor gets model=model (layer capture)
    ))

* ``target`` is ``"module:attribute"``, imported only when the entry is built, so an
  optimizer that is missing (not written yet, peer package not installed) is skipped by the
  race with a printed note instead of breaking it (:class:`EntryUnavailable`).
* ``hyper`` maps a workload name (or ``"*"`` for every workload) to constructor keyword
  arguments; a workload's own dict updates the ``"*"`` one, and ``"<workload>/full"``
  updates that for full-size runs (the quick race's smaller models often want another
  lr). ``build`` may replace all of
  this with a custom ``build(model, workload, **overrides) -> Optimizer`` (raise
  :class:`EntryUnavailable` from it when a package is missing).
* ``closure=True`` marks closure-driven optimizers (exact Gauss-Newton, SANIA). The race then
  calls ``optimizer.step(closure)`` every step instead of doing forward/backward itself.
  The default closure (:func:`default_closure`) zeroes the gradients, runs the forward pass,
  computes the workload's mean loss, calls ``backward()`` and returns the loss tensor; the
  optimizer may call it several times per step. An optimizer that needs something else
  (e.g. the model outputs, or a per-sample loss) gives ``make_closure(model, inputs,
  targets, loss_fn, optimizer) -> closure``; whatever the closure returns, ``step`` must
  return a loss the race can turn into a float.
* ``pass_model=True`` passes ``model=model`` to the constructor (layer-capture optimizers);
  ``benchmarks.step_time`` then runs a real forward/backward before each timed step.
* ``quick=True`` puts the entry in the default ``--quick`` subset; keep that subset small so
  ``make demo`` stays under 3 minutes (others are raced when named with ``--optimizers``).
* ``schedule=False`` opts out of the workload's shared warm-up + cosine LR schedule (for
  optimizers that choose their own step size).
* ``frequency_arg`` names the constructor argument that sets how often the amortized work
  (eigendecompositions, inverses) runs; ``benchmarks.step_time`` sweeps it over 1, 10, 100.
* ``peer=True`` marks another package's optimizer (pytorch-optimizer, heavyball): the race
  runs it only when named, ``step_time`` whenever it is installed.
* ``skip_workloads`` maps a workload name to the reason the entry does not apply there
  (e.g. ``{"W2": "too many outputs for a batch-space solve"}``); the race lists it as
  "not applicable" instead of running it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "RaceEntry",
    "EntryUnavailable",
    "REGISTRY",
    "register",
    "build_optimizer",
    "default_closure",
    "resolve_target",
]

ClosureFactory = Callable[..., Callable[[], Any]]


class EntryUnavailable(RuntimeError):
    """Raised when an entry's optimizer cannot be imported (the race skips the entry)."""


@dataclass(frozen=True)
class RaceEntry:
    """One optimizer of the race (see the module docstring for every field's meaning)."""

    name: str
    target: str = ""
    hyper: dict[str, dict[str, Any]] = field(default_factory=dict)
    pass_model: bool = False
    closure: bool = False
    make_closure: ClosureFactory | None = None
    quick: bool = False
    schedule: bool = True
    build: Callable[..., torch.optim.Optimizer] | None = None
    frequency_arg: str | None = None
    peer: bool = False
    skip_workloads: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def kwargs_for(self, workload: str, quick: bool = True) -> dict[str, Any]:
        """Constructor keyword arguments for ``workload``: ``"*"``, then the workload's own,
        then (full-size runs only, ``quick=False``) those under ``"<workload>/full"``."""
        full = {} if quick else self.hyper.get(f"{workload}/full", {})
        return {**self.hyper.get("*", {}), **self.hyper.get(workload, {}), **full}


REGISTRY: dict[str, RaceEntry] = {}


def register(entry: RaceEntry) -> RaceEntry:
    """Add ``entry`` to :data:`REGISTRY`; names are unique and case-sensitive."""
    if entry.name in REGISTRY:
        raise ValueError(f"Invalid entry: duplicate optimizer name {entry.name!r}")
    if not entry.target and entry.build is None:
        raise ValueError(f"Invalid entry {entry.name!r}: give target or build")
    REGISTRY[entry.name] = entry
    return entry


def resolve_target(target: str) -> Any:
    """Import ``"package.module:Attribute"``; :class:`EntryUnavailable` if that fails."""
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        why = f"{type(error).__name__}: {error}"
        raise EntryUnavailable(f"{target} is not importable ({why})") from error


def build_optimizer(
    name: str, model: nn.Module, workload: str = "*", quick: bool = True, **overrides: Any
) -> torch.optim.Optimizer:
    """Build registry entry ``name`` for ``model`` with ``workload``'s hyperparameters.

    ``overrides`` update the entry's keyword arguments (e.g. ``precondition_frequency=1``).
    Raises ``ValueError`` for an unknown name and :class:`EntryUnavailable` when the
    optimizer cannot be imported.
    """
    if name not in REGISTRY:
        raise ValueError(f"Invalid name: unknown optimizer {name!r} (known: {', '.join(REGISTRY)})")
    entry = REGISTRY[name]
    if entry.build is not None:
        return entry.build(model, workload, **overrides)
    cls = resolve_target(entry.target)
    kwargs = {**entry.kwargs_for(workload, quick), **overrides}
    if entry.pass_model:
        kwargs["model"] = model
    return cls(model.parameters(), **kwargs)


def default_closure(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
    """The torch.optim closure: zero grads, forward, mean loss, backward; returns the loss."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        return loss

    return closure


# ---------------------------------------------------------------------------------------------
# The table. Hyperparameters were tuned by hand on the quick race (see benchmarks/README.md).
# ---------------------------------------------------------------------------------------------

register(RaceEntry(
    "AdamW", "torch.optim:AdamW", quick=True,
    hyper={"*": dict(lr=3e-3, betas=(0.9, 0.999), weight_decay=1e-4),
           "W2": dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01),
           "W2/full": dict(lr=1.5e-3)},
    note="the baseline: lr best of {1, 2, 3, 6, 10}e-3 on quick W2, of {1, 2, 3, 10}e-3 on W1, "
         "of {0.6, 1, 1.5, 2, 3}e-3 on full W2 at 200 steps",
))

register(RaceEntry(
    "Shampoo", "secondorder:Shampoo", quick=True,
    hyper={"*": dict(lr=3e-3, betas=(0.9, 0.999), epsilon=1e-12, weight_decay=1e-4,
                     precondition_frequency=10, grafting="adam"),
           "W2": dict(lr=8e-3, betas=(0.9, 0.95), weight_decay=0.01),
           "W2/full": dict(lr=3e-3)},
    frequency_arg="precondition_frequency",
    note="Adam grafting, eigh roots every 10 steps; lr best of {2, 3, 5, 8, 15}e-3 on quick W2, "
         "of {1, 2, 3, 6}e-3 on W1, of {2, 3, 5, 8}e-3 on full W2 at 200 steps",
))
register(RaceEntry(
    "Shampoo-SOAP", "secondorder:Shampoo", quick=True,
    hyper={"*": dict(lr=3e-3, betas=(0.9, 0.999), weight_decay=1e-4, precondition_frequency=10,
                     eigenvalue_correction=True, grafting="none"),
           "W2": dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01),
           "W2/full": dict(lr=3e-3)},
    frequency_arg="precondition_frequency",
    note="eigenvalue-corrected Shampoo (Adam in the Kronecker eigenbasis), no grafting; "
         "W2 lr best of {5, 10}e-3, full W2 (200 steps) of {3, 5, 10}e-3 (both swept before the "
         "SOAP mode computed its first bases at step 1; not re-tuned since)",
))


# Peers from other packages (skipped when not installed; install with
# `pip install pytorch-optimizer heavyball`). Their own defaults except the frequency.

def _heavyball_soap(model: nn.Module, workload: str, **overrides: Any) -> torch.optim.Optimizer:
    """heavyball's SOAP with torch.compile off (its CPU autotuning takes minutes per step)."""
    try:
        import heavyball
    except ImportError as error:
        raise EntryUnavailable(f"heavyball is not installed ({error})") from error
    heavyball.utils.compile_mode = None
    kwargs = {"lr": 3e-3, "precondition_frequency": 10, "use_precond_schedule": False, **overrides}
    return heavyball.SOAP(model.parameters(), **kwargs)


register(RaceEntry(
    "pto.Shampoo", "pytorch_optimizer:Shampoo", peer=True,
    hyper={"*": dict(lr=3e-3, preconditioning_compute_steps=10)},
    frequency_arg="preconditioning_compute_steps",
    note="pytorch-optimizer's Shampoo (no grafting)",
))
register(RaceEntry(
    "pto.SOAP", "pytorch_optimizer:SOAP", peer=True,
    hyper={"*": dict(lr=3e-3, precondition_frequency=10)},
    frequency_arg="precondition_frequency",
    note="pytorch-optimizer's SOAP",
))
register(RaceEntry(
    "heavyball.SOAP", build=_heavyball_soap, peer=True, frequency_arg="precondition_frequency",
    note="heavyball's SOAP, compile off",
))

register(RaceEntry(
    "SANIA", "secondorder:SANIA", closure=True, schedule=False, quick=True,
    hyper={"*": dict(lr=1.0, preconditioner="adagrad_sqr", eps=1.0)},
    note="AdaGrad-SQR Polyak step, f* = 0; its own step size (no LR schedule); default closure "
         "(backward inside)",
))

register(RaceEntry(
    "LBFGS", "torch.optim:LBFGS", closure=True, schedule=False,
    hyper={"*": dict(lr=1.0, max_iter=1, history_size=10, line_search_fn="strong_wolfe")},
    note="torch.optim.LBFGS, one strong-Wolfe line-searched step per mini-batch",
))


def loss_only_closure(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      optimizer: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
    """A closure that returns the loss without calling backward (the optimizer differentiates
    it itself, e.g. with ``create_graph=True`` for Hessian-vector products)."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        return loss_fn(model(inputs), targets)

    return closure


register(RaceEntry(
    "SANIA-Hutch", "secondorder:SANIA", closure=True, schedule=False,
    make_closure=loss_only_closure,
    hyper={"*": dict(lr=1.0, preconditioner="hutchinson", hutch_init_iters=10)},
    note="Hutchinson diagonal-Hessian Polyak step (one Hessian-vector product per step)",
))

register(RaceEntry(
    "EKFAC", "secondorder:EKFAC", pass_model=True, quick=True,
    hyper={"*": dict(lr=3e-3, weight_decay=1e-4)},
    note="the constructor's defaults (issue 14 variant: relative damping 0.1·mean(Λ), power 1/2, "
         "batch-gradient correction, Adam-norm grafting; factors every 10 steps, bases every 20); "
         "lr best of {1, 3}e-3 on quick W2 (benchmarks/defaults_race.py)",
))

register(RaceEntry(
    "EKFAC-paper", "secondorder:EKFAC", pass_model=True,
    hyper={"*": dict(lr=1e-3, betas=(0.9, 0.999), damping=1e-3, weight_decay=1e-4, stats_every=10,
                     correction_every=2, precondition_frequency=100, damping_rule="absolute",
                     power=1.0, correction="per_example", graft="none")},
    note="George et al. 2018 as published: absolute damping, power 1, per-example correction "
         "every 2 steps, no grafting (the issue-14 baseline)",
))

register(RaceEntry(
    "AdaFisher", "secondorder:AdaFisher", pass_model=True,
    hyper={"*": dict(lr=3e-3, betas=(0.9, 0.999), damping=1e-3, gamma=0.8, weight_decay=1e-4,
                     update_freq=10, normalization="minmax", graft="none", step_scale=1.0),
           "W2": dict(lr=1e-3)},
    note="paper EMA rule (normalise after averaging), factors every 10 steps, Adam fallback",
))

register(RaceEntry(
    "AdaFisherW", "secondorder:AdaFisherW", pass_model=True, quick=True,
    hyper={"*": dict(lr=3e-3, betas=(0.9, 0.999), damping=1e-3, gamma=0.8, weight_decay=1e-4,
                     update_freq=10, normalization="minmax", graft="none", step_scale=1.0),
           "W2": dict(lr=1e-3, weight_decay=0.01)},
    note="AdaFisher with decoupled weight decay",
))


def _exact_gauss_newton(model: nn.Module, workload: str, **overrides: Any) -> torch.optim.Optimizer:
    """ExactGaussNewton with the loss matching the workload (MSE on W3, cross-entropy else)."""
    from secondorder import ExactGaussNewton

    kwargs = {**REGISTRY["ExactGaussNewton"].kwargs_for(workload), **overrides}
    kwargs.setdefault("loss", "mse" if workload == "W3" else "cross_entropy")
    return ExactGaussNewton(model.parameters(), model=model, **kwargs)


def outputs_closure(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> Callable[[], tuple[torch.Tensor, Any]]:
    """ExactGaussNewton's closure: the model outputs and the targets (it computes the loss and
    every derivative itself; ``loss_fn`` must be the one its ``loss=`` names)."""
    return lambda: (model(inputs), targets)


register(RaceEntry(
    "ExactGaussNewton", build=_exact_gauss_newton, closure=True, make_closure=outputs_closure, quick=True,
    hyper={"*": dict(lr=1.0, damping=0.1, line_search=True)},
    skip_workloads={"W2": "a batch of byte windows has b·T·256 outputs, far too many for the "
                          "(b·c × b·c) batch-space solve"},
    note="damped Gauss-Newton solved in the batch dimension (b·c × b·c Cholesky, or p × p "
         "when smaller), Armijo line search on the batch below the scheduled lr; not raced on "
         "W2 (too many outputs). Tuned on W3/W3s over damping {1e-4..1}, lr {0.1..1}, line "
         "search, adaptive damping, momentum",
))


# SINGD (structured inverse-free natural gradient): closure=True so that benchmarks.step_time
# times the forward/backward too (its layer statistics are recorded by hooks during backward;
# a bare step() on copied gradients would never update the factors). The "-bf16" rows keep the
# fp32 model and hold K, C and their momenta in bf16 (the paper's precision claim).
# W2's loss is a mean over tokens: loss_average="batch+sequence" scales G to match.
# graft/init_scale/normalize_lr_cov/loss_average pinned to singd's algorithm: these settings
# were tuned for it (the constructor's defaults differ since issue 14; defaults_race.py).
_SINGD_HYPER = {"*": dict(lr=1e-2, momentum=0.9, damping=0.1, lr_cov=5e-2, T=5, graft="none",
                          init_scale=1.0, normalize_lr_cov=False, loss_average="batch"),
                "W2": dict(loss_average="batch+sequence")}
_BF16 = {"preconditioner_dtype": torch.bfloat16}
for _name, _extra in (("SINGD", {}), ("SINGD-diag", {"structures": "diagonal"}),
                      ("SINGD-bf16", _BF16), ("SINGD-diag-bf16", {"structures": "diagonal", **_BF16})):
    _w2 = {} if "structures" in _extra else {"damping": 1e-2}
    register(RaceEntry(
        _name, "secondorder:SINGD", pass_model=True, closure=True, frequency_arg="T",
        quick=_name == "SINGD",
        hyper={"*": {**_SINGD_HYPER["*"], **_extra}, "W2": {**_SINGD_HYPER["W2"], **_w2}},
        note=f"INGD, {_extra.get('structures', 'dense')} K and C"
             f"{', bf16 factors' if 'preconditioner_dtype' in _extra else ''}, factor update every 5 steps",
    ))
