"""Fault injection (issue 13, CONTRACT.md "Non-finite input"): a NaN/Inf never loses training state.

After ``loss.backward()`` one entry of the first layer's weight gradient is set to NaN or Inf (for
the closure optimizers: a gradient hook for SANIA, a non-finite target for exact Gauss-Newton, which
never reads ``.grad``), or one entry of the INPUT is. Then:

* the affected unit is skipped (Shampoo: the block holding the entry; capture optimizers: the layer,
  weight and bias together; closure optimizers: the whole step) with its parameters and floating
  state bitwise unchanged, while every other unit steps exactly as on the clean batch;
* no NaN/Inf appears anywhere; the next normal steps train;
* one ``NumericalWarning`` per cause (a second identical fault warns no more);
* ``optimizer.nonfinite_skips()`` counts the skipped units and survives a state_dict round trip.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import secondorder
from secondorder.precond.linalg import NumericalWarning
from tests.optimizers.registry import WHOLE, OptimizerSpec, toy_model
from tests.optimizers.training import (
    assert_all_finite,
    assert_same_tensors,
    batches,
    flat,
    floating_state,
    loss_fn,
    over_specs,
    take_step,
    toy_data,
)

VALUES = {"nan": float("nan"), "inf": float("inf")}


def fault_step(spec: OptimizerSpec, optimizer, model, x, y, kind: str, value: float, target=None):
    """One step as the user writes it, with a non-finite ``kind`` ("grad" or "input") injected.

    ``target`` is the parameter whose gradient entry ``[0, 0]`` (or ``[0]``) is poisoned
    (default: the first layer's weight).
    """
    target = model[0].weight if target is None else target
    index = (0,) * target.dim()
    x, y = x.clone(), y.clone()
    if kind == "input":
        x[0, 0] = value
    if spec.closure_driven:
        handle = None
        if kind == "grad":
            if spec.cls_name == "ExactGaussNewton":
                y[0, 0] = value  # a non-finite loss and output gradient: EGN never reads .grad
            else:
                def poison(grad):
                    grad = grad.clone()
                    grad[index] = value
                    return grad

                handle = target.register_hook(poison)
        try:
            return optimizer.step(spec.make_closure(model, x, y, loss_fn))
        finally:
            if handle is not None:
                handle.remove()
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    if kind == "grad":
        target.grad[index] = value
    optimizer.step()
    return loss


def affected_params(spec: OptimizerSpec, model) -> list[torch.Tensor]:
    """The parameters of the unit a poisoned first-layer weight gradient skips."""
    if spec.family == "blocks":
        return [model[0].weight]
    if spec.family == "capture":
        return [model[0].weight, model[0].bias]
    return list(model.parameters())


def named_values(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def warm_up(spec, steps: int = 2):
    model = toy_model()
    optimizer = spec.make(model)
    for x, y in batches(steps):
        take_step(spec, optimizer, model, x, y)
    return model, optimizer


@over_specs()
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_gradient_skips_only_the_affected_unit(spec, value):
    faulty_model, faulty = warm_up(spec)
    clean_model, clean = warm_up(spec)
    x, y = toy_data(16, seed=7)
    before = named_values(faulty_model)
    affected = affected_params(spec, faulty_model)
    affected_names = {name for name, p in faulty_model.named_parameters() if any(p is q for q in affected)}
    state_before = floating_state(faulty, affected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        fault_step(spec, faulty, faulty_model, x, y, "grad", VALUES[value])
    take_step(spec, clean, clean_model, x, y)
    after, reference = named_values(faulty_model), named_values(clean_model)

    assert_all_finite(faulty_model, faulty)
    # the affected unit: parameters and state bitwise unchanged
    if spec.family == "blocks":
        region = spec.first_block
        assert torch.equal(after["0.weight"][region], before["0.weight"][region]), "the faulty block moved"
        if region == WHOLE:
            assert_same_tensors(state_before, floating_state(faulty, affected), "state of the skipped block")
    else:
        for name in affected_names:
            assert torch.equal(after[name], before[name]), f"{name} of the skipped unit moved"
        assert_same_tensors(state_before, floating_state(faulty, affected), "state of the skipped unit")
    # every other unit: exactly the clean step
    for name in set(after) - affected_names:
        torch.testing.assert_close(after[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(after[name], before[name]), f"{name} did not step"
    if spec.family == "blocks" and spec.first_block != WHOLE:
        outside = torch.ones_like(after["0.weight"], dtype=torch.bool)
        outside[spec.first_block] = False
        torch.testing.assert_close(after["0.weight"][outside], reference["0.weight"][outside],
                                   rtol=1e-6, atol=1e-7)
    others = [p for name, p in faulty_model.named_parameters() if name not in affected_names]
    clean_others = [p for name, p in clean_model.named_parameters() if name not in affected_names]
    faulty_state, clean_state = floating_state(faulty, others), floating_state(clean, clean_others)
    assert faulty_state.keys() == clean_state.keys()
    for key in faulty_state:
        torch.testing.assert_close(faulty_state[key], clean_state[key], rtol=1e-6, atol=1e-7, msg=str(key))


@over_specs()
def test_nan_input_skips_everything_and_poisons_nothing(spec):
    # A NaN input entry makes every gradient entry NaN: every unit is skipped.
    model, optimizer = warm_up(spec)
    before, state_before = named_values(model), floating_state(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        fault_step(spec, optimizer, model, *toy_data(16, seed=7), "input", VALUES["nan"])
    assert_all_finite(model, optimizer)
    after = named_values(model)
    for name in before:
        assert torch.equal(after[name], before[name]), f"{name} moved"
    assert_same_tensors(state_before, floating_state(optimizer))


@over_specs()
def test_inf_input_skips_the_affected_units_and_poisons_nothing(spec):
    # x[0, 0] = inf saturates the tanh (finite loss) but the first weight's gradient gets
    # 0·inf = NaN entries and its layer's statistics see the Inf input.
    model, optimizer = warm_up(spec)
    before = named_values(model)
    affected = affected_params(spec, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        fault_step(spec, optimizer, model, *toy_data(16, seed=7), "input", VALUES["inf"])
    assert_all_finite(model, optimizer)
    after = named_values(model)
    if spec.family == "blocks":  # every block holding column 0 of the first weight is skipped
        assert torch.equal(after["0.weight"][:, 0], before["0.weight"][:, 0]), "0.weight[:, 0] moved"
        return
    for name, param in model.named_parameters():
        if any(param is q for q in affected):
            assert torch.equal(after[name], before[name]), f"{name} moved"


@over_specs()
@pytest.mark.parametrize("kind", ["grad", "input"])
def test_one_warning_per_cause_not_per_step(spec, kind):
    model, optimizer = warm_up(spec)
    data = batches(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fault_step(spec, optimizer, model, *data[0], kind, VALUES["nan"])
        first = [w for w in caught if issubclass(w.category, NumericalWarning)]
        take_step(spec, optimizer, model, *data[1])
        fault_step(spec, optimizer, model, *data[2], kind, VALUES["nan"])
        second = [w for w in caught if issubclass(w.category, NumericalWarning)][len(first):]
    # one cause, one warning (not one per layer or block); a NaN input may show up as two causes
    # at once in a capture optimizer (its statistics and its gradients)
    assert 1 <= len(first) <= (1 if kind == "grad" else 2), [str(w.message) for w in first]
    assert issubclass(secondorder.NumericalWarning, NumericalWarning)
    assert not second, [str(w.message) for w in second]


@over_specs()
def test_nonfinite_skips_counts_units_and_survives_state_dict(spec):
    model, optimizer = warm_up(spec)
    assert optimizer.nonfinite_skips() == 0
    data = batches(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        fault_step(spec, optimizer, model, *data[0], "grad", VALUES["nan"])
        assert optimizer.nonfinite_skips() == 1  # one block, one layer or one step
        take_step(spec, optimizer, model, *data[1])
        assert optimizer.nonfinite_skips() == 1
        fault_step(spec, optimizer, model, *data[2], "grad", VALUES["inf"])
        assert optimizer.nonfinite_skips() == 2
        fault_step(spec, optimizer, model, *data[3], "input", VALUES["nan"])
    expected_input_units = {"capture": 2, "closure": 1}.get(spec.family)
    if expected_input_units is None:  # blocks: at least the blocks of both weight matrices
        assert optimizer.nonfinite_skips() >= 2 + 2
    else:
        assert optimizer.nonfinite_skips() == 2 + expected_input_units
    total = optimizer.nonfinite_skips()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = spec.make(toy_model())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.nonfinite_skips() == total


@over_specs()
def test_training_continues_normally_after_faults(spec):
    model, optimizer = warm_up(spec)
    x, y = toy_data(64, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        for kind in ("grad", "input"):
            for value in VALUES.values():
                fault_step(spec, optimizer, model, x, y, kind, value)
    start = float(loss_fn(model(x), y))
    for _ in range(8):
        take_step(spec, optimizer, model, x, y)
    assert_all_finite(model, optimizer)
    assert float(loss_fn(model(x), y)) < start


class Scale(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@over_specs(lambda spec: spec.family == "capture")
def test_nonfinite_fallback_parameter_is_skipped_alone(spec):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), Scale(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = spec.make(model)
        for x, y in batches(2):
            take_step(spec, optimizer, model, x, y)
        return model, optimizer

    (faulty_model, faulty), (clean_model, clean) = build(), build()
    x, y = toy_data(16, seed=7)
    scale = faulty_model[3].scale
    before, state_before = scale.detach().clone(), floating_state(faulty, [scale])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        fault_step(spec, faulty, faulty_model, x, y, "grad", VALUES["nan"], target=scale)
    take_step(spec, clean, clean_model, x, y)
    assert_all_finite(faulty_model, faulty)
    assert torch.equal(scale.detach(), before)
    assert_same_tensors(state_before, floating_state(faulty, [scale]), "state of the fallback parameter")
    after, reference = named_values(faulty_model), named_values(clean_model)
    for name in after:
        if name != "3.scale":
            torch.testing.assert_close(after[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)
    assert faulty.nonfinite_skips() == 1


# ----------------------------------------------- exact Gauss-Newton: a linear-algebra failure
_LINALG_FUNCTIONS = ("eigh", "eigvalsh", "cholesky", "cholesky_ex", "solve", "solve_ex", "lstsq", "inv",
                     "inv_ex", "qr", "svd", "lu_factor", "lu_factor_ex", "solve_triangular")


@over_specs(lambda spec: spec.cls_name == "ExactGaussNewton")
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_gauss_newton_linalg_failure_is_a_skipped_counted_step(spec, loss, monkeypatch):
    model = toy_model()
    optimizer = spec.make(model, loss=loss)
    x, y = toy_data(16, seed=3)
    target = y.argmax(dim=1) if loss == "cross_entropy" else y
    optimizer.step(lambda: (model(x), target))
    before, state_before = flat(model).clone(), floating_state(optimizer)
    calls = []

    def failing(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise torch.linalg.LinAlgError(f"injected failure of torch.linalg.{name}")

        return fail

    for name in _LINALG_FUNCTIONS:
        monkeypatch.setattr(torch.linalg, name, failing(name))
    monkeypatch.setattr(torch, "cholesky_solve", failing("cholesky_solve"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step(lambda: (model(x), target))  # never raises
    monkeypatch.undo()
    assert calls, "the step used none of the patched linear-algebra functions"
    assert any(issubclass(w.category, NumericalWarning) for w in caught)
    assert torch.equal(flat(model), before)
    assert_same_tensors(state_before, floating_state(optimizer))
    assert optimizer.nonfinite_skips() + sum(
        int(s.get("numerical_failures", 0)) for s in optimizer.state.values()) == 1
    optimizer.step(lambda: (model(x), target))  # and the next step trains again
    assert not torch.equal(flat(model), before)
    assert_all_finite(model, optimizer)


@over_specs(lambda spec: spec.family == "capture")
def test_nonfinite_conv_gradient_skips_the_conv_layer_only(spec):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        optimizer = spec.make(model)
        generator = torch.Generator().manual_seed(5)
        data = [(torch.randn(16, 1, 6, 6, generator=generator), torch.randn(16, 3, generator=generator))
                for _ in range(3)]
        for x, y in data[:2]:
            take_step(spec, optimizer, model, x, y)
        return model, optimizer, data[2]

    (faulty_model, faulty, (x, y)), (clean_model, clean, _) = build(), build()
    conv = faulty_model[0]
    before, state_before = named_values(faulty_model), floating_state(faulty, [conv.weight, conv.bias])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        fault_step(spec, faulty, faulty_model, x, y, "grad", VALUES["nan"], target=conv.weight)
    take_step(spec, clean, clean_model, x, y)
    assert_all_finite(faulty_model, faulty)
    after, reference = named_values(faulty_model), named_values(clean_model)
    for name in ("0.weight", "0.bias"):
        assert torch.equal(after[name], before[name]), f"{name} of the skipped conv layer moved"
    assert_same_tensors(state_before, floating_state(faulty, [conv.weight, conv.bias]), "state of the conv layer")
    for name in ("3.weight", "3.bias"):
        torch.testing.assert_close(after[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(after[name], before[name]), f"{name} did not step"
