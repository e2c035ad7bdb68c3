"""load_state_dict / state_dict contract (issue 13, CONTRACT.md "load_state_dict").

A state that does not belong to the optimizer (another class, a configuration that changes the
state's meaning, other parameter shapes) is refused with ``ValueError("Invalid state_dict ...")``
BEFORE anything is modified; a plain-number ``step`` loads; load and save hooks take effect.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.optimizers.registry import REGISTRY, OptimizerSpec
from tests.optimizers.training import (
    assert_all_finite,
    assert_unmodified,
    batches,
    flat,
    over_specs,
    snapshot,
    state_tensors,
    take_step,
)

SPECS = {spec.name: spec for spec in REGISTRY}
# one source entry per optimizer class: the first registered
FIRST_OF_CLASS = {}
for _spec in REGISTRY:
    FIRST_OF_CLASS.setdefault(_spec.cls_name, _spec)


def sized_model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def trained(spec: OptimizerSpec, hidden: int = 8, steps: int = 2):
    model = sized_model(hidden)
    optimizer = spec.make(model)
    for x, y in batches(steps):
        take_step(spec, optimizer, model, x, y)
    return model, optimizer


def assert_refused_unmodified(spec: OptimizerSpec, foreign_state: dict) -> None:
    model, optimizer = trained(spec)
    saved = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"^Invalid state_dict"):
        optimizer.load_state_dict(copy.deepcopy(foreign_state))
    assert_unmodified(optimizer, saved)
    for x, y in batches(2):  # and it still trains from its own state
        take_step(spec, optimizer, model, x, y)
    assert_all_finite(model, optimizer)


@pytest.mark.parametrize("target,source", [
    pytest.param(target, source, id=f"{target.name}<-{source.name}")
    for target in REGISTRY for source in FIRST_OF_CLASS.values() if source.cls_name != target.cls_name])
def test_state_of_another_optimizer_class_is_refused_unmodified(target, source):
    assert_refused_unmodified(target, trained(source)[1].state_dict())


@pytest.mark.parametrize("target,twin", [
    pytest.param(target, SPECS[twin], id=f"{target.name}<-{twin}")
    for target in REGISTRY for twin in target.config_twins])
def test_state_of_a_configuration_twin_is_refused_unmodified(target, twin):
    # SOAP-mode state into plain Shampoo (and back), AdaFisherW state into AdaFisher (and back).
    assert_refused_unmodified(target, trained(twin)[1].state_dict())


# ExactGaussNewton without momentum keeps no parameter-shaped state: nothing to mismatch.
@over_specs(lambda spec: spec.name != "ExactGaussNewton")
def test_state_for_other_parameter_shapes_is_refused_unmodified(spec):
    assert_refused_unmodified(spec, trained(spec, hidden=5)[1].state_dict())


def _replace_steps(state_dict: dict, convert) -> int:
    replaced = 0
    for param_state in state_dict["state"].values():
        if isinstance(param_state.get("step"), torch.Tensor):
            param_state["step"] = convert(param_state["step"].item())
            replaced += 1
    return replaced


@over_specs()
@pytest.mark.parametrize("kind", ["int", "float"])
def test_loaded_plain_number_step_continues_like_a_tensor_step(spec, kind):
    model, optimizer = trained(spec)
    saved = copy.deepcopy(optimizer.state_dict())
    plain = copy.deepcopy(saved)
    assert _replace_steps(plain, int if kind == "int" else float) > 0, "no tensor step in the state"
    runs = []
    for state_dict in (saved, plain):
        resumed_model = copy.deepcopy(model)
        resumed = spec.make(resumed_model)
        resumed.load_state_dict(state_dict)
        for x, y in batches(4)[2:]:
            take_step(spec, resumed, resumed_model, x, y)
        assert_all_finite(resumed_model, resumed)
        runs.append(flat(resumed_model))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=1e-7)


def _first_floating_path(value, prefix=()):
    """Key path of the first floating tensor with more than one entry inside ``value``."""
    if isinstance(value, torch.Tensor):
        return prefix if value.is_floating_point() and value.numel() > 1 else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _first_floating_path(item, prefix + (key,))
        if found is not None:
            return found
    return None


def _get(value, path):
    for key in path:
        value = value[key]
    return value


@over_specs()
def test_load_state_dict_pre_hook_edits_take_effect_and_post_hook_runs(spec):
    model, optimizer = trained(spec)
    state_dict = copy.deepcopy(optimizer.state_dict())
    edited_lr = optimizer.param_groups[0]["lr"] * 0.5
    first_id = min(state_dict["state"])
    path = _first_floating_path(state_dict["state"][first_id])
    expected = None if path is None else _get(state_dict["state"][first_id], path) + 1.0

    def pre_hook(opt, sd):
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = edited_lr
        if path is not None:
            container = _get(sd["state"][first_id], path[:-1])
            container[path[-1]] = container[path[-1]] + 1.0
        return sd

    post_calls = []
    resumed = spec.make(copy.deepcopy(model))
    resumed.register_load_state_dict_pre_hook(pre_hook)
    resumed.register_load_state_dict_post_hook(lambda opt: post_calls.append(opt))
    resumed.load_state_dict(state_dict)
    assert resumed.param_groups[0]["lr"] == edited_lr
    if path is not None:
        loaded = state_tensors(resumed)[(first_id,) + path]  # state_dict ids are parameter positions
        assert torch.equal(loaded, expected), "the pre-hook's per-parameter edit was ignored"
    assert post_calls == [resumed]


@over_specs()
def test_state_dict_pre_and_post_hooks_take_effect(spec):
    model, optimizer = trained(spec)
    pre_calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: pre_calls.append(opt))

    def post_hook(opt, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.123
        return state_dict

    optimizer.register_state_dict_post_hook(post_hook)
    state_dict = optimizer.state_dict()
    assert pre_calls == [optimizer]
    assert state_dict["param_groups"][0]["lr"] == 0.123
    assert optimizer.param_groups[0]["lr"] != 0.123
