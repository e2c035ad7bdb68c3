"""The drop-in contract of issue 13 (``/work/coord/CONTRACT.md``): constructors, flags, param groups.

Every test runs over the registry entries it applies to (``training.over_specs``); a new optimizer
gets the whole matrix by adding one ``OptimizerSpec``. The data: ``toy_model`` (Linear 6→8, tanh,
Linear 8→3, every Linear with a bias) on ``toy_data``, a few steps.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from tests.optimizers.registry import REGISTRY, OptimizerSpec, toy_model
from tests.optimizers.training import (
    assert_all_finite,
    assert_unmodified,
    batches,
    flat,
    loss_fn,
    over_specs,
    snapshot,
    take_step,
    toy_data,
)


def weights_and_biases(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return weights, biases


def train(spec: OptimizerSpec, optimizer, model, steps: int = 3):
    for x, y in batches(steps):
        take_step(spec, optimizer, model, x, y)


def base_lr(spec: OptimizerSpec) -> float:
    return spec.fixed.get("lr", spec.lr)


# ------------------------------------------------------------------------------ constructors
@over_specs(lambda spec: spec.takes_model)
def test_old_positional_model_form_raises_type_error_naming_model_keyword(spec):
    model = toy_model()
    with pytest.raises(TypeError, match="model="):
        spec.optimizer_class(list(model.parameters()), model)


@over_specs(lambda spec: spec.takes_model)
def test_module_shorthand_equals_params_with_model_keyword(spec):
    model_a, model_b = toy_model(), toy_model()
    shorthand = spec.optimizer_class(model_a, **spec.fixed)
    explicit = spec.optimizer_class(model_b.parameters(), model=model_b, **spec.fixed)
    train(spec, shorthand, model_a)
    train(spec, explicit, model_b)
    assert torch.equal(flat(model_a), flat(model_b))


@over_specs()
def test_shared_keyword_names_are_accepted(spec):
    # CONTRACT.md: the same keyword names for the same concepts (lr, betas, damping, weight_decay, eps).
    model = toy_model()
    optimizer = spec.make(model, **spec.common_keywords)
    train(spec, optimizer, model, steps=2)
    assert_all_finite(model, optimizer)


@over_specs(lambda spec: spec.family == "capture")
def test_stats_every_is_the_common_name_of_the_statistics_schedule(spec):
    # issue 13: the same keyword for the same concept; each layer optimizer keeps its paper's name too
    model_a, model_b = toy_model(), toy_model()
    common = spec.make(model_a, **{spec.schedule_key: 1, "stats_every": 3})
    own = spec.make(model_b, **{spec.schedule_key: 3})
    assert common.param_groups[0][spec.schedule_key] == 3
    train(spec, common, model_a, steps=5)
    train(spec, own, model_b, steps=5)
    assert torch.equal(flat(model_a), flat(model_b))


@over_specs()
def test_torch_flags_at_default_values_are_accepted_and_change_nothing(spec):
    model_a, model_b = toy_model(), toy_model()
    flagged = spec.make(model_a, maximize=False, foreach=None, differentiable=False, fused=None)
    plain = spec.make(model_b)
    train(spec, flagged, model_a)
    train(spec, plain, model_b)
    assert torch.equal(flat(model_a), flat(model_b))


@over_specs()
@pytest.mark.parametrize("flag", ["differentiable", "fused"])
def test_differentiable_and_fused_true_are_refused(spec, flag):
    with pytest.raises(ValueError, match=flag):
        spec.make(toy_model(), **{flag: True})


@over_specs(lambda spec: spec.supports_maximize)
def test_maximize_ascends_exactly_like_minimizing_the_negated_loss(spec):
    model_max, model_min = toy_model(), toy_model()
    ascent = spec.make(model_max, maximize=True)
    descent = spec.make(model_min)
    for x, y in batches(4):
        ascent.zero_grad()
        (-loss_fn(model_max(x), y)).backward()  # maximize −L  ==  minimize L
        ascent.step()
        descent.zero_grad()
        loss_fn(model_min(x), y).backward()
        descent.step()
    assert not torch.equal(flat(model_max), flat(toy_model()))
    torch.testing.assert_close(flat(model_max), flat(model_min), rtol=1e-6, atol=1e-7)


@over_specs(lambda spec: not spec.supports_maximize)
def test_maximize_true_is_refused_where_unsupported(spec):
    with pytest.raises(ValueError, match="maximize"):
        spec.make(toy_model(), maximize=True)


@over_specs()
def test_tensor_lr_is_bit_identical_to_float_lr(spec):
    model_tensor, model_float = toy_model(), toy_model()
    lr = base_lr(spec)
    with_tensor = spec.make(model_tensor, lr=torch.tensor(lr))
    with_float = spec.make(model_float, lr=lr)
    train(spec, with_tensor, model_tensor, steps=4)
    train(spec, with_float, model_float, steps=4)
    assert torch.equal(flat(model_tensor), flat(model_float))


@over_specs()
def test_complex_parameters_are_refused(spec):
    model = toy_model().to(torch.complex64)
    with pytest.raises(ValueError, match=r"(?s)(?=.*params)(?=.*complex)"):
        spec.make(model)


@over_specs()
@pytest.mark.parametrize("where", ["same_group", "across_groups"])
def test_parameter_listed_twice_is_refused(spec, where):
    model = toy_model()
    params = list(model.parameters())
    if where == "same_group":
        groups = [{"params": params + [model[0].weight]}]
    else:
        groups = [{"params": params}, {"params": [model[0].weight]}]
    with pytest.raises(ValueError, match="params"):
        spec.build(groups, model)


@over_specs(lambda spec: spec.takes_model)
def test_model_tracking_none_of_the_parameters_is_refused(spec):
    model = toy_model()
    with pytest.raises(ValueError, match="model"):
        spec.build(model.parameters(), copy.deepcopy(model))


# ------------------------------------------------------------------------ per-group validation
def _layer_groups(model, bad):
    return [{"params": list(model[0].parameters()), **bad}, {"params": list(model[2].parameters())}]


@pytest.mark.parametrize("spec,bad,name", [
    pytest.param(spec, bad, name, id=f"{spec.name}-{name}")
    for spec in REGISTRY
    for bad, name in spec.group_bad_values])
def test_bad_group_value_is_refused_by_the_constructor(spec, bad, name):
    model = toy_model()
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        spec.build(_layer_groups(model, bad), model)


@pytest.mark.parametrize("spec,bad,name", [
    pytest.param(spec, bad, name, id=f"{spec.name}-{name}")
    for spec in REGISTRY
    for bad, name in spec.group_bad_values])
def test_bad_group_value_is_refused_by_add_param_group(spec, bad, name):
    model = toy_model()
    optimizer = spec.build(list(model[0].parameters()), model)
    saved = snapshot(optimizer)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        optimizer.add_param_group({"params": list(model[2].parameters()), **bad})
    assert_unmodified(optimizer, saved)


@over_specs()
@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_unknown_group_key_is_refused(spec, where):
    model = toy_model()
    bad = {"not_a_hyperparameter": 1.0}
    message = "Invalid param group: unknown key 'not_a_hyperparameter'"
    if where == "constructor":
        with pytest.raises(ValueError, match=message):
            spec.build(_layer_groups(model, bad), model)
    else:
        optimizer = spec.build(list(model[0].parameters()), model)
        saved = snapshot(optimizer)
        with pytest.raises(ValueError, match=message):
            optimizer.add_param_group({"params": list(model[2].parameters()), **bad})
        assert_unmodified(optimizer, saved)


def test_sania_group_with_weight_decay_is_refused():
    spec = next(s for s in REGISTRY if s.name == "SANIA")
    model = toy_model()
    message = "Invalid param group: unknown key 'weight_decay'"
    with pytest.raises(ValueError, match=message):
        spec.build(_layer_groups(model, {"weight_decay": 0.1}), model)
    optimizer = spec.build(list(model[0].parameters()), model)
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": list(model[2].parameters()), "weight_decay": 0.1})


# -------------------------------------------------------------- weight / bias in separate groups
@over_specs()
def test_weight_bias_split_with_equal_hyperparameters_equals_one_group(spec):
    model_split, model_one = toy_model(), toy_model()
    weights, biases = weights_and_biases(model_split)
    split = spec.build([{"params": weights}, {"params": biases}], model_split)
    one = spec.make(model_one)
    train(spec, split, model_split)
    train(spec, one, model_one)
    torch.testing.assert_close(dict(model_split.named_parameters()), dict(model_one.named_parameters()),
                               rtol=1e-5, atol=1e-6)


@over_specs()
def test_bias_group_with_zero_lr_never_moves(spec):
    # The standard decay / no-decay recipe, with the no-decay group frozen.
    model = toy_model()
    weights, biases = weights_and_biases(model)
    decay = {"weight_decay": 0.1} if spec.has_weight_decay else {}
    no_decay = {"weight_decay": 0.0} if spec.has_weight_decay else {}
    optimizer = spec.build([{"params": weights, **decay}, {"params": biases, "lr": 0.0, **no_decay}], model)
    weights_before, biases_before = flat(weights).clone(), flat(biases).clone()
    train(spec, optimizer, model)
    assert torch.equal(flat(biases), biases_before)
    assert not torch.equal(flat(weights), weights_before)
    assert_all_finite(model, optimizer)


@over_specs(lambda spec: spec.has_weight_decay and not spec.closure_driven)
def test_each_parameter_gets_its_own_groups_lr_and_weight_decay(spec):
    # One step: the layer is preconditioned once (weight and bias jointly), then each parameter
    # is scaled by its own group's lr and decayed by its own group's weight_decay.
    lr = base_lr(spec)
    x, y = toy_data()

    def one_step(groups_of):
        model = toy_model()
        optimizer = spec.build(groups_of(model), model)
        take_step(spec, optimizer, model, x, y)
        return dict(model.named_parameters())

    split = one_step(lambda m: [{"params": weights_and_biases(m)[0], "weight_decay": 0.1},
                                {"params": weights_and_biases(m)[1], "weight_decay": 0.0, "lr": lr / 2}])
    decayed = one_step(lambda m: [{"params": list(m.parameters()), "weight_decay": 0.1}])
    plain = one_step(lambda m: [{"params": list(m.parameters()), "weight_decay": 0.0}])
    initial = dict(toy_model().named_parameters())
    for name in split:
        if name.endswith("weight"):
            torch.testing.assert_close(split[name], decayed[name], rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(split[name] - initial[name], (plain[name] - initial[name]) / 2,
                                       rtol=1e-4, atol=1e-7)


# -------------------------------------------------------------------- describe() and fallbacks
class Scale(nn.Module):
    """A parameter no layer capture knows: it must fall back (module path "3.scale")."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def model_with_fallback() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), Scale(3))


@over_specs()
def test_describe_lists_how_parameters_are_preconditioned(spec):
    model = model_with_fallback()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = spec.make(model)
    text = optimizer.describe()
    assert isinstance(text, str) and text.strip()
    if spec.family == "capture":  # the fallback parameter is named by its module path
        assert "3.scale" in text, text


@over_specs(lambda spec: spec.family == "capture")
def test_fallback_of_a_linear_weight_warns_at_construction(spec):
    model = toy_model()
    outside = nn.Linear(3, 3)  # a Linear layer the model= does not contain: its weight falls back
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.build(list(model.parameters()) + list(outside.parameters()), model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("weight" in m or "Linear" in m for m in messages), messages


@over_specs(lambda spec: spec.family == "capture")
def test_no_warning_when_every_linear_weight_is_preconditioned(spec):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.make(toy_model())
    assert not caught, [str(w.message) for w in caught]


# --------------------------------------------------------------------------- closure optimizers
@over_specs(lambda spec: spec.closure_driven)
def test_step_with_gradients_and_no_closure_raises(spec):
    model = toy_model()
    optimizer = spec.make(model)
    x, y = toy_data()
    loss_fn(model(x), y).backward()
    before = flat(model).clone()
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step()
    assert torch.equal(flat(model), before)


@over_specs(lambda spec: spec.closure_driven)
@pytest.mark.parametrize("gradients", ["none", "zeros"])
def test_step_without_closure_or_gradient_is_a_no_op(spec, gradients):
    # What torch.distributed.checkpoint's get_/set_optimizer_state_dict do on a fresh optimizer.
    model = toy_model()
    optimizer = spec.make(model)
    if gradients == "zeros":
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
    before = flat(model).clone()
    assert optimizer.step() is None
    assert torch.equal(flat(model), before)
    assert_all_finite(model, optimizer)


# -------------------------------------------------------------------- copy, pickle and repr
def _copy(obj, how: str):
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))


@over_specs()
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_of_model_and_optimizer_trains_identically(spec, how):
    model = toy_model()
    optimizer = spec.make(model)
    data = batches(5)
    for x, y in data[:2]:
        take_step(spec, optimizer, model, x, y)
    model_copy, optimizer_copy = _copy((model, optimizer), how)
    before = flat(model).clone()
    take_step(spec, optimizer_copy, model_copy, *data[2])
    assert torch.equal(flat(model), before), "the copy's step moved the original parameters"
    take_step(spec, optimizer, model, *data[2])
    for x, y in data[3:]:
        take_step(spec, optimizer, model, x, y)
        take_step(spec, optimizer_copy, model_copy, x, y)
    assert torch.equal(flat(model), flat(model_copy))
    assert_all_finite(model_copy, optimizer_copy)


@over_specs(lambda spec: not spec.closure_driven)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_of_optimizer_alone_steps_its_own_parameters(spec, how):
    # CONTRACT.md: deepcopy(optimizer) / pickle round trip gives an optimizer that can step; for
    # model-based ones the model is copied along. The copy steps its own (copied) parameters.
    model = toy_model()
    optimizer = spec.make(model)
    data = batches(2)
    take_step(spec, optimizer, model, *data[0])
    optimizer.zero_grad()
    loss_fn(model(data[1][0]), data[1][1]).backward()
    optimizer_copy = _copy(optimizer, how)
    copied = [p for group in optimizer_copy.param_groups for p in group["params"]]
    assert all(c is not p for c, p in zip(copied, model.parameters()))
    for copy_param, param in zip(copied, model.parameters()):  # Parameter.__deepcopy__ drops .grad
        copy_param.grad = param.grad.clone()
    before = flat(model).clone()
    optimizer_copy.step()
    assert torch.equal(flat(model), before), "the copy's step moved the original parameters"
    assert not torch.equal(flat(copied), before), "the copy's step moved nothing"
    assert torch.isfinite(flat(copied)).all()


@over_specs()
def test_repr_names_the_class_and_lr(spec):
    model = toy_model()
    optimizer = spec.make(model)
    take_step(spec, optimizer, model, *toy_data())
    text = repr(optimizer)
    assert spec.cls_name in text and "lr" in text


# ----------------------------------------------------------------------- hooks and zero_grad
@over_specs()
def test_step_pre_and_post_hooks_run_in_order(spec):
    model = toy_model()
    optimizer = spec.make(model)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt)))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt)))
    train(spec, optimizer, model, steps=2)
    assert [name for name, _ in calls] == ["pre", "post", "pre", "post"]
    assert all(opt is optimizer for _, opt in calls)


@over_specs()
def test_step_pre_hook_edits_take_effect(spec):
    model = toy_model()
    optimizer = spec.make(model)
    train(spec, optimizer, model, steps=1)

    def freeze(opt, args, kwargs):
        for group in opt.param_groups:
            group["lr"] = 0.0

    optimizer.register_step_pre_hook(freeze)
    before = flat(model).clone()
    train(spec, optimizer, model, steps=2)
    assert torch.equal(flat(model), before)


@over_specs()
def test_zero_grad_sets_gradients_to_none_by_default(spec):
    model = toy_model()
    optimizer = spec.make(model)
    x, y = toy_data()
    loss_fn(model(x), y).backward()
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    loss_fn(model(x), y).backward()
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@over_specs()
def test_tensor_lr_follows_a_scheduler(spec):
    # LR schedulers write the group's lr; with a Tensor lr they write into it.
    model = toy_model()
    optimizer = spec.make(model, lr=torch.tensor(base_lr(spec)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 if epoch == 0 else 0.0)
    train(spec, optimizer, model, steps=1)
    scheduler.step()
    before = flat(model).clone()
    train(spec, optimizer, model, steps=2)
    assert torch.equal(flat(model), before)


@over_specs(lambda spec: spec.cls_name == "ExactGaussNewton")
def test_gauss_newton_trains_a_compiled_model_like_eager(spec):
    # cross-entropy: c > 1 outputs need the recorded extra forwards (issue 13 measured the failure here)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = toy_model(seed=4)
        optimizer = spec.make(model, loss="cross_entropy")
        forward = torch.compile(model) if compiled else model
        for x, y in batches(3):
            labels = y.argmax(dim=1)
            optimizer.step(lambda forward=forward, x=x, labels=labels: (forward(x), labels))
        results.append(flat(model))
    assert not torch.equal(results[0], flat(toy_model(seed=4)))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def conv_model() -> nn.Module:
    """Conv2d + Linear, both with biases (issue 13: SINGD refused the split for layer 'conv1')."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def conv_batches(count: int):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 1, 6, 6, generator=generator), torch.randn(16, 3, generator=generator))
            for _ in range(count)]


@over_specs()
def test_conv_weight_bias_split_equals_one_group_and_frozen_biases_stay(spec):
    def run(groups_of):
        model = conv_model()
        optimizer = spec.build(groups_of(model), model)
        for x, y in conv_batches(3):
            take_step(spec, optimizer, model, x, y)
        assert_all_finite(model, optimizer)
        return model

    one = run(lambda m: list(m.parameters()))
    split = run(lambda m: [{"params": weights_and_biases(m)[0]}, {"params": weights_and_biases(m)[1]}])
    torch.testing.assert_close(dict(split.named_parameters()), dict(one.named_parameters()), rtol=1e-5, atol=1e-6)
    frozen = run(lambda m: [{"params": weights_and_biases(m)[0]}, {"params": weights_and_biases(m)[1], "lr": 0.0}])
    initial = conv_model()
    assert torch.equal(flat(weights_and_biases(frozen)[1]), flat(weights_and_biases(initial)[1]))
    assert not torch.equal(flat(weights_and_biases(frozen)[0]), flat(weights_and_biases(initial)[0]))
