"""Mixed precision (issue 13, CONTRACT.md "Mixed precision"): GradScaler and autocast change nothing.

For Shampoo and every capture optimizer: a GradScaler loop (with ``unscale_`` + clipping, without
``unscale_``, with an explicit ``grad_scaler=`` argument) trains like the same loop without the
scaler, to float32 rounding; an overflowing step is skipped with its captured statistics dropped;
autocast around ``step()`` never changes a state dtype; bf16/fp16 autocast forwards train.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.optimizers.registry import toy_model
from tests.optimizers.training import (
    assert_all_finite,
    assert_same_tensors,
    batches,
    flat,
    floating_state,
    loss_fn,
    over_specs,
    state_tensors,
    toy_data,
)

SCALE = 2.0**16
MAX_NORM = 0.05  # small enough that clipping changes every step's gradient (checked below)
amp_specs = over_specs(lambda spec: spec.family in ("blocks", "capture"))
capture_specs = over_specs(lambda spec: spec.family == "capture")


def run(spec, steps: int = 10, *, scaler: str = "none", clip: bool = False, explicit: bool = False):
    """Train ``steps`` batches; ``scaler``: "none", "unscale" (unscale_ before step) or "plain"."""
    model = toy_model()
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=SCALE) if scaler != "none" else None
    optimizer = spec.make(model, grad_scaler=grad_scaler) if explicit else spec.make(model)
    norms = []
    for x, y in batches(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        if grad_scaler is None:
            loss.backward()
            if clip:
                norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
            optimizer.step()
            continue
        grad_scaler.scale(loss).backward()
        if scaler == "unscale":
            grad_scaler.unscale_(optimizer)
            if clip:
                norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        grad_scaler.step(optimizer)
        grad_scaler.update()
        assert grad_scaler.get_scale() == SCALE  # no step of this loop overflows
    return model, optimizer, norms


@amp_specs
def test_grad_scaler_with_unscale_and_clipping_equals_the_unscaled_loop(spec):
    reference, _, norms = run(spec, clip=True)
    assert min(norms) > MAX_NORM, "clipping must be active at every step for this test to bite"
    scaled, optimizer, _ = run(spec, scaler="unscale", clip=True)
    assert_all_finite(scaled, optimizer)
    torch.testing.assert_close(flat(scaled), flat(reference), rtol=1e-5, atol=1e-6)


@amp_specs
def test_grad_scaler_without_unscale_equals_the_unscaled_loop(spec):
    reference, _, _ = run(spec)
    scaled, optimizer, _ = run(spec, scaler="plain")
    assert_all_finite(scaled, optimizer)
    torch.testing.assert_close(flat(scaled), flat(reference), rtol=1e-5, atol=1e-6)


@capture_specs
@pytest.mark.parametrize("scaler", ["unscale", "plain"])
def test_explicit_grad_scaler_argument_equals_the_unscaled_loop(spec, scaler):
    reference, _, _ = run(spec)
    scaled, optimizer, _ = run(spec, scaler=scaler, explicit=True)
    assert_all_finite(scaled, optimizer)
    torch.testing.assert_close(flat(scaled), flat(reference), rtol=1e-5, atol=1e-6)


@capture_specs
def test_capture_optimizers_read_the_scale_from_torch_channel(spec):
    assert spec.make(toy_model())._step_supports_amp_scaling is True


@amp_specs
def test_overflowing_step_is_skipped_and_its_statistics_dropped(spec):
    # Three steps, one overflowing step (GradScaler's found_inf), three steps == the six clean
    # steps alone: nothing of the overflowing window (parameters, state, captured statistics) stays.
    data = batches(6)

    def train(overflow_after: int | None):
        model = toy_model()
        optimizer = spec.make(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        for index, (x, y) in enumerate(data):
            optimizer.zero_grad()
            scaler.scale(loss_fn(model(x), y)).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            if index == overflow_after:
                before, state_before = flat(model).clone(), floating_state(optimizer)
                optimizer.zero_grad()
                x_big, y_big = toy_data(16, seed=99)
                scaler.scale(loss_fn(model(x_big), y_big) * float("inf")).backward()
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
                assert scaler.get_scale() == SCALE / 2
                assert torch.equal(flat(model), before)
                assert_same_tensors(state_before, floating_state(optimizer), "state after a found_inf step")
        return model, optimizer

    with_overflow, optimizer = train(overflow_after=2)
    clean, _ = train(overflow_after=None)
    assert_all_finite(with_overflow, optimizer)
    torch.testing.assert_close(flat(with_overflow), flat(clean), rtol=1e-5, atol=1e-6)


@amp_specs
def test_autocast_around_forward_backward_and_step_keeps_state_dtypes(spec):
    def train(autocast: bool):
        model = toy_model()
        optimizer = spec.make(model)
        for x, y in batches(4):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                optimizer.zero_grad()
                loss = loss_fn(model(x).float(), y)
                loss.backward()
                optimizer.step()
        return {key: value.dtype for key, value in state_tensors(optimizer).items() if value.is_floating_point()}

    plain, autocast = train(False), train(True)
    assert plain.keys() == autocast.keys()
    for key, dtype in autocast.items():
        assert dtype in (torch.float32, torch.float64), (key, dtype)
        assert dtype == plain[key], (key, dtype, plain[key])


@capture_specs
def test_bf16_autocast_forward_trains(spec):
    model = toy_model()
    optimizer = spec.make(model, lr=spec.lr)
    x, y = toy_data(64)
    initial = float(loss_fn(model(x), y))
    for _ in range(40):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
        loss_fn(output.float(), y).backward()
        optimizer.step()
    assert_all_finite(model, optimizer)
    for key, value in state_tensors(optimizer).items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
    final = float(loss_fn(model(x), y))
    assert final < 0.7 * initial, (initial, final)


@capture_specs
def test_fp16_autocast_with_grad_scaler_drops_no_statistics(spec):
    # fp16 output gradients carry the 2^16 loss scale: statistics must be formed without
    # overflowing (in fp32), so no step is skipped and the run trains.
    model = toy_model()
    optimizer = spec.make(model, lr=spec.lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = toy_data(128)
    initial = float(loss_fn(model(x), y))
    for _ in range(20):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            output = model(x)
        scaler.scale(loss_fn(output.float(), y)).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == SCALE, "a step overflowed"
    assert optimizer.nonfinite_skips() == 0
    assert_all_finite(model, optimizer)
    assert float(loss_fn(model(x), y)) < 0.9 * initial
