"""The optimizer contract: generic tests over every entry of ``registry.REGISTRY``.

Each test states one promise a ``torch.optim`` user relies on. An entry opts out of a
feature only through ``OptimizerSpec.skips`` with the reason written there.
"""

from __future__ import annotations

import copy
import inspect
import io
import re

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from tests.optimizers.registry import REGISTRY, toy_model
from tests.optimizers.training import (
    batches,
    flat,
    loss_fn,
    over_specs,
    refresh_steps,
    state_tensors,
    take_step,
    toy_data,
)

SPECS = {spec.name: spec for spec in REGISTRY}


def specs_for(feature: str):
    """Parametrize over the registry; entries that skip ``feature`` are reported as skipped."""
    return pytest.mark.parametrize(
        "spec",
        [pytest.param(spec, id=spec.name,
                      marks=[pytest.mark.skip(reason=spec.skips[feature])] if feature in spec.skips else [])
         for spec in REGISTRY],
    )


@specs_for("state_dict")
def test_state_dict_round_trip_continues_bit_identically(spec):
    model = toy_model()
    optimizer = spec.make(model)
    data = batches(10)
    for x, y in data[:5]:
        take_step(spec, optimizer, model, x, y)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_copy = copy.deepcopy(model)
    resumed = spec.make(model_copy)
    resumed.load_state_dict(saved)
    before, after = state_tensors(optimizer), state_tensors(resumed)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key
    for x, y in data[5:]:
        take_step(spec, optimizer, model, x, y)
        take_step(spec, resumed, model_copy, x, y)
    assert torch.equal(flat(model), flat(model_copy))


@specs_for("dcp")
def test_dcp_state_dict_round_trip(spec):
    model = toy_model()
    optimizer = spec.make(model)
    data = batches(8)
    for x, y in data[:4]:
        take_step(spec, optimizer, model, x, y)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    model_copy = copy.deepcopy(model)
    resumed = spec.make(model_copy)
    set_optimizer_state_dict(model_copy, resumed, optim_state_dict=saved)
    for x, y in data[4:]:
        take_step(spec, optimizer, model, x, y)
        take_step(spec, resumed, model_copy, x, y)
    assert torch.equal(flat(model), flat(model_copy))


@specs_for("dcp")
def test_dcp_initialisation_on_fresh_optimizer_leaves_parameters(spec):
    # get_optimizer_state_dict on an empty optimizer calls step() with zero gradients and lr = 0.
    model = toy_model()
    optimizer = spec.make(model)
    before = flat(model).clone()
    get_optimizer_state_dict(model, optimizer)
    assert torch.equal(flat(model), before)


@specs_for("scheduler")
def test_scheduler_setting_lr_to_zero_freezes_parameters(spec):
    model = toy_model()
    optimizer = spec.make(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 if epoch == 0 else 0.0)
    x, y = toy_data()
    take_step(spec, optimizer, model, x, y)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0
    frozen = flat(model).clone()
    for _ in range(3):
        take_step(spec, optimizer, model, x, y)
    assert torch.equal(flat(model), frozen)


@specs_for("scheduler")
def test_step_lr_and_one_cycle(spec):
    model = toy_model()
    optimizer = spec.make(model)
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = toy_data()
    initial = optimizer.param_groups[0]["lr"]
    take_step(spec, optimizer, model, x, y)
    step_lr.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(initial / 2)
    model = toy_model()
    optimizer = spec.make(model)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.lr, total_steps=6, cycle_momentum=spec.momentum_key is not None)
    seen = []
    for _ in range(5):
        take_step(spec, optimizer, model, x, y)
        one_cycle.step()
        seen.append(optimizer.param_groups[0]["lr"])
    assert len(set(seen)) > 1
    assert torch.isfinite(flat(model)).all()


@specs_for("param_groups")
def test_param_groups_with_different_hyperparameters(spec):
    model = toy_model()
    optimizer = spec.make(model)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    grouped = spec.make(model)
    defaults = {key: value for key, value in grouped.param_groups[0].items() if key != "params"}
    frozen_lr = dict(defaults, lr=0.0, params=second)
    grouped.param_groups = []
    grouped.state.clear()
    grouped.add_param_group(dict(defaults, params=first))
    grouped.add_param_group(frozen_lr)
    del optimizer
    before_second = torch.cat([p.detach().flatten() for p in second]).clone()
    before_first = torch.cat([p.detach().flatten() for p in first]).clone()
    x, y = toy_data()
    for _ in range(3):
        take_step(spec, grouped, model, x, y)
    assert torch.equal(torch.cat([p.detach().flatten() for p in second]), before_second)
    assert not torch.equal(torch.cat([p.detach().flatten() for p in first]), before_first)


@specs_for("param_groups")
def test_add_param_group_trains_the_new_parameters(spec):
    # The head is frozen and outside the optimizer at first (a fine-tuning recipe), then added.
    model = toy_model()
    head_params = list(model[2].parameters())
    for param in head_params:
        param.requires_grad_(False)
    optimizer = spec.build(list(model[0].parameters()), model)
    x, y = toy_data()
    take_step(spec, optimizer, model, x, y)
    for param in head_params:
        param.requires_grad_(True)
    defaults = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    optimizer.add_param_group(dict(defaults, params=head_params))
    before = torch.cat([p.detach().flatten() for p in head_params]).clone()
    for _ in range(3):
        take_step(spec, optimizer, model, x, y)
    assert not torch.equal(torch.cat([p.detach().flatten() for p in head_params]), before)
    assert torch.isfinite(flat(model)).all()


@specs_for("no_grad_params")
def test_parameters_without_gradient_are_untouched(spec):
    model = toy_model()
    optimizer = spec.make(model)
    frozen = model[2].bias
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    x, y = toy_data()
    for _ in range(4):
        take_step(spec, optimizer, model, x, y)
    assert torch.equal(frozen.detach(), before)
    assert not any(isinstance(v, torch.Tensor) and v.numel() > 1 for v in optimizer.state.get(frozen, {}).values())


@specs_for("zero_grad_step")
def test_all_zero_gradients_give_no_nan(spec):
    model = toy_model()
    optimizer = spec.make(model)
    if spec.closure_driven:
        zero_closure = spec.make_closure(model, torch.zeros(8, 6), model(torch.zeros(8, 6)).detach(), loss_fn)
        for _ in range(4):
            optimizer.step(zero_closure)
    else:
        for _ in range(4):
            for param in model.parameters():
                param.grad = torch.zeros_like(param)
            optimizer.step()
    assert torch.isfinite(flat(model)).all()
    for key, value in state_tensors(optimizer).items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
    x, y = toy_data()
    for _ in range(3):
        take_step(spec, optimizer, model, x, y)
    assert torch.isfinite(flat(model)).all()


@specs_for("closure")
def test_step_returns_closure_loss(spec):
    model = toy_model()
    optimizer = spec.make(model)
    x, y = toy_data()
    if spec.closure_driven:
        closure = spec.make_closure(model, x, y, loss_fn)
        expected = float(loss_fn(model(x), y).detach())
    else:
        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        expected = float(loss_fn(model(x), y).detach())
    returned = optimizer.step(closure)
    assert float(returned) == pytest.approx(expected, rel=1e-6)


@specs_for("grad_scaler")
def test_grad_scaler_with_unscale_and_clipping(spec):
    model = toy_model()
    optimizer = spec.make(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = toy_data()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
        loss = loss_fn(output.float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss))
    assert torch.isfinite(flat(model)).all()
    assert losses[-1] < losses[0]
    # An overflowing step is skipped: parameters unchanged, the scale halves.
    before, scale = flat(model).clone(), scaler.get_scale()
    optimizer.zero_grad()
    scaler.scale(loss_fn(model(x), y) * float("inf")).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(flat(model), before)
    assert scaler.get_scale() == scale / 2


@specs_for("accumulation")
def test_gradient_accumulation_equals_one_large_batch(spec):
    # float64, so that the (mathematically equal) gradients differ only at 1e-16 and a
    # preconditioner's amplification of rounding cannot hide a real accumulation error.
    x, y = toy_data(32, dtype=torch.float64)
    model_big, model_acc = toy_model(dtype=torch.float64), toy_model(dtype=torch.float64)
    big, acc = spec.make(model_big), spec.make(model_acc)
    for _ in range(4):
        big.zero_grad()
        loss_fn(model_big(x), y).backward()
        big.step()
        acc.zero_grad()
        for half in (slice(0, 16), slice(16, 32)):
            (loss_fn(model_acc(x[half]), y[half]) / 2).backward()
        acc.step()
    torch.testing.assert_close(flat(model_acc), flat(model_big), atol=1e-9, rtol=1e-9)


@specs_for("determinism")
def test_same_seed_same_result(spec):
    results = []
    for _ in range(2):
        model = toy_model(seed=3)
        optimizer = spec.make(model)
        for x, y in batches(5):
            take_step(spec, optimizer, model, x, y)
        results.append(flat(model))
    assert torch.equal(results[0], results[1])


@specs_for("bf16")
def test_bf16_parameters_keep_float32_state(spec):
    model = toy_model(dtype=torch.bfloat16)
    optimizer = spec.make(model)
    for x, y in batches(4):
        take_step(spec, optimizer, model, x.bfloat16(), y.bfloat16())
    floating = {k: v for k, v in state_tensors(optimizer).items() if v.is_floating_point() and v.numel() > 1}
    assert floating, "no floating state to check"
    for key, value in floating.items():
        assert value.dtype in (torch.float32, torch.float64), key
    resumed = spec.make(copy.deepcopy(model))
    resumed.load_state_dict(optimizer.state_dict())
    for key, value in state_tensors(resumed).items():
        if key in floating:
            assert value.dtype == floating[key].dtype, key
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@specs_for("loss_decreases")
def test_loss_decreases_on_a_toy_problem(spec):
    model = toy_model()
    optimizer = spec.make(model, lr=spec.lr)
    x, y = toy_data(64)
    initial = float(loss_fn(model(x), y))
    for _ in range(40):
        take_step(spec, optimizer, model, x, y)
    final = float(loss_fn(model(x), y))
    assert final < 0.5 * initial, (initial, final)


@pytest.mark.parametrize("spec,kwargs,name", [
    pytest.param(spec, kwargs, name, id=f"{spec.name}-{name}-{i}")
    for spec in REGISTRY for i, (kwargs, name) in enumerate(spec.bad_arguments)])
def test_bad_argument_raises_naming_it(spec, kwargs, name):
    # The project's rule: the message starts with "Invalid <argument name>".
    with pytest.raises((ValueError, TypeError), match=rf"^Invalid {re.escape(name)}"):
        spec.make(toy_model(), **kwargs)


def test_registry_lists_every_public_optimizer():
    import secondorder

    public = {"Shampoo", "EKFAC", "AdaFisher", "AdaFisherW", "SINGD", "ExactGaussNewton", "SANIA"}
    available = {name for name in public if hasattr(secondorder, name)}
    registered = {spec.name.split("-")[0] for spec in REGISTRY}
    assert available <= registered, available - registered


@pytest.mark.parametrize("spec", [s for s in REGISTRY if not s.closure_driven and "-" not in s.name],
                         ids=lambda s: s.name)
def test_compiled_model_trains_like_eager(spec):
    # Capture hooks must fire inside compiled graphs too, also when a graph of the same
    # architecture was compiled earlier without hooks (Dynamo skips hook guards by default).
    results = []
    for compiled in (False, True):
        model = toy_model(seed=4)
        optimizer = spec.make(model)
        forward = torch.compile(model) if compiled else model
        for x, y in batches(4):
            optimizer.zero_grad()
            loss_fn(forward(x), y).backward()
            optimizer.step()
        results.append((flat(model), sorted(str(k) for k in state_tensors(optimizer))))
    assert results[0][1] == results[1][1]  # the same statistics were recorded
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)


def _accepts(spec, argument: str) -> bool:
    import secondorder

    return argument in inspect.signature(getattr(secondorder, spec.cls_name)).parameters


def _one_step_delta(spec, model, x, y, **overrides) -> list[torch.Tensor]:
    optimizer = spec.make(model, **overrides)
    before = [p.detach().clone() for p in model.parameters()]
    take_step(spec, optimizer, model, x, y)
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


@over_specs(lambda spec: spec.family == "capture" and _accepts(spec, "graft"))
def test_adam_cap_takes_the_shorter_of_the_own_and_the_adam_grafted_step(spec):
    """``graft="adam_cap"`` (grafting.py): from the same state, every parameter's first step is
    either the method's own (``"none"``) or, where that is longer, the Adam-grafted one
    (``"adam"``, the own direction rescaled), never anything else. Loss scales and a small
    absolute damping make both branches occur for every optimizer."""
    long_own_step = {"damping": 1e-6}
    if _accepts(spec, "damping_rule"):  # EK-FAC's default damping is relative, its power ½
        long_own_step.update(damping_rule="absolute", power=1.0)
    branches = set()
    for loss_scale in (1e-3, 1.0, 1e3):
        for extra in ({}, long_own_step):
            x, y = toy_data(dtype=torch.float64)
            deltas = {graft: _one_step_delta(spec, toy_model(dtype=torch.float64), x, y * loss_scale,
                                             graft=graft, weight_decay=0.0, **extra)
                      for graft in ("none", "adam", "adam_cap")}
            for own, grafted, capped in zip(deltas["none"], deltas["adam"], deltas["adam_cap"],
                                            strict=True):
                if torch.allclose(capped, own, rtol=1e-9, atol=0):
                    assert capped.norm() <= grafted.norm() * (1 + 1e-9)
                    branches.add("own")
                else:
                    torch.testing.assert_close(capped, grafted, rtol=1e-9, atol=0)
                    assert grafted.norm() < own.norm()
                    branches.add("capped")
    assert branches == {"own", "capped"}


@over_specs(lambda spec: spec.family == "capture" and _accepts(spec, "loss_average"))
def test_loss_average_is_the_same_for_a_loss_without_positions(spec):
    """A model with one position per example: "batch" and "batch+sequence" are one reduction."""
    x, y = toy_data(dtype=torch.float64)
    steps = [torch.cat([d.flatten() for d in _one_step_delta(
        spec, toy_model(dtype=torch.float64), x, y, loss_average=average)])
        for average in ("batch", "batch+sequence")]
    torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=0)
    assert steps[0].abs().max() > 0


def _fixed_gradients(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per step, a float64 gradient for every parameter of ``toy_model``."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [p.shape for p in toy_model().parameters()]
    return [[torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes] for _ in range(steps)]


def _delta_under_fixed_gradients(spec, grads: list[list[torch.Tensor]], **overrides) -> torch.Tensor:
    """Total parameter change of a float64 ``toy_model`` stepped with ``grads`` (no decay):
    the steps depend on the gradients only."""
    model = toy_model(dtype=torch.float64)
    optimizer = spec.make(model, weight_decay=0.0, **overrides)
    before = flat(model).clone()
    for step_grads in grads:
        for p, grad in zip(model.parameters(), step_grads, strict=True):
            p.grad = grad.clone()
        optimizer.step()
    return before - flat(model)


@over_specs(lambda spec: _accepts(spec, "graft_scale"))
def test_graft_scale_multiplies_every_grafted_step(spec):
    """``graft_scale`` s: with the same gradients, every step is s × the step at s = 1 (the
    graft-only first steps, the grafted Kronecker steps after them, diagonal-only blocks and
    momentum alike): it scales the graft's norm, nothing else."""
    grads = _fixed_gradients(4)
    one = _delta_under_fixed_gradients(spec, grads, graft_scale=1.0)
    assert one.abs().max() > 0
    torch.testing.assert_close(_delta_under_fixed_gradients(spec, grads, graft_scale=3.0), 3 * one,
                               rtol=1e-10, atol=1e-14)


@over_specs(lambda spec: _accepts(spec, "graft_norm_beta"))
def test_graft_norm_beta_averages_only_the_step_length(spec):
    """``graft_norm_beta`` β sets a grafted step's length from the graft's and the direction's
    norms averaged over steps (both averages start at 0, so their bias corrections cancel):
    up to the first preconditioned step there is one step to average and every β gives the
    per-step graft's (β = 0) trajectory; after it, changing gradients give different steps.
    (The exact formula against torch Adam is in the optimizer's own tests.)"""
    grads = _fixed_gradients(8)
    start = spec.make(toy_model()).param_groups[0]["start_preconditioning_step"]
    first = [_delta_under_fixed_gradients(spec, grads[:start], graft_norm_beta=beta) for beta in (0.0, 0.9)]
    assert first[0].abs().max() > 0
    torch.testing.assert_close(first[1], first[0], rtol=1e-12, atol=1e-15)
    averaged = _delta_under_fixed_gradients(spec, grads, graft_norm_beta=0.9)
    instant = _delta_under_fixed_gradients(spec, grads, graft_norm_beta=0.0)
    assert (averaged - instant).abs().max() > 1e-3 * instant.abs().max()


@over_specs(lambda spec: bool(spec.optimizer_class._options_added_later))
def test_checkpoint_from_before_an_option_resumes_with_its_old_behaviour(spec):
    """A state dict saved before a group option existed loads with the value that reproduces
    the behaviour of then (``_options_added_later``) and trains on; a state dict missing any
    other option is still refused as not this optimizer's."""
    model = toy_model()
    optimizer = spec.make(model)
    x, y = toy_data()
    take_step(spec, optimizer, model, x, y)
    saved = optimizer.state_dict()
    old_values = spec.optimizer_class._options_added_later
    for group in saved["param_groups"]:
        for key in old_values:
            del group[key]
    resumed = spec.make(model)
    resumed.load_state_dict(saved)
    for group in resumed.param_groups:
        assert {key: group[key] for key in old_values} == old_values
    take_step(spec, resumed, model, x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    del saved["param_groups"][0]["lr"]
    with pytest.raises(ValueError, match=r"lacks \['lr'\]"):
        spec.make(model).load_state_dict(saved)


@over_specs(lambda spec: not spec.closure_driven)
def test_step_leaves_gradients_untouched(spec):
    """``step()`` reads ``.grad`` and never writes it (torch.optim's contract; an optimizer may
    work on the gradients themselves rather than copies, e.g. Shampoo's screen on CPU)."""
    model = toy_model()
    optimizer = spec.make(model)
    for x, y in batches(3):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        optimizer.step()
        for p, grad in zip(model.parameters(), grads, strict=True):
            if grad is not None:
                assert torch.equal(p.grad, grad)


class _TiedHeadLM(nn.Module):
    """An embedding and a linear head sharing one ``(V, D)`` weight (GPT-2 / tied Llama)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(idx))))


@over_specs(lambda spec: not spec.closure_driven)
def test_weight_tied_between_embedding_and_head_trains(spec):
    """Every optimizer moves a weight tied between an embedding and a head each step, whatever
    it does with it (statistics from both uses, the head's own use, or its fallback), and keeps
    it finite (which of these it does is tested per capture in tests/optimizers/test_layer_kinds.py)."""
    torch.manual_seed(0)
    model = _TiedHeadLM()
    optimizer = spec.make(model)
    idx = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        before = model.embed.weight.detach().clone()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(idx).reshape(-1, 11), idx.reshape(-1)).backward()
        optimizer.step()
        assert torch.isfinite(model.embed.weight).all()
        assert not torch.equal(model.embed.weight, before)


# Each periodic refresh at the constructor's documented defaults (the class docstrings): the
# state tensor of the first layer's weight that a refresh rewrites, the steps of 24 at which
# it changes, and the keywords of the entry's mode (everything else at its default).
DEFAULT_REFRESHES = {
    "Shampoo": ("root_0", [10, 20], {}),  # roots every 10 steps, from step 10
    "Shampoo-SOAP": ("basis_0", [1, 4, 8, 12, 16, 20, 24], {"eigenvalue_correction": True}),
    "EKFAC": ("activation_basis", [1, 21], {}),  # eigenbases every 20 steps, from step 1
    "AdaFisher": ("fisher_activation", [1, 6, 11, 16, 21], {}),  # update_freq 5
    "AdaFisherW": ("fisher_activation", [1, 6, 11, 16, 21], {}),
    "SINGD": ("K", [1, 11, 21], {}),  # T 10
}


@pytest.mark.parametrize("name", sorted(DEFAULT_REFRESHES))
def test_documented_default_refresh_schedule(name):
    """At the constructor's defaults each optimizer refreshes its curvature exactly on the steps
    its docstring gives (SOAP mode's bases every 4 steps and EK-FAC's every 20 were chosen by
    the defaults race; root mode keeps distributed_shampoo's 10)."""
    spec = SPECS[name]
    key, expected, mode = DEFAULT_REFRESHES[name]
    torch.manual_seed(0)
    model = toy_model()
    kwargs = dict(mode, **({"model": model} if spec.takes_model else {}))
    optimizer = spec.optimizer_class(model.parameters(), **kwargs)
    assert refresh_steps(optimizer, model, key, 24) == expected
