"""Issue 14's default rules: Adam-norm grafting, EK-FAC's damping/power/batch correction,
SINGD's statistics-scaled initial factors, AdaFisher's mean normalisation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import EKFAC, SINGD, AdaFisher
from secondorder.precond.eigen_step import (
    effective_damping,
    eigenbasis_direction,
    fold_batch_correction,
    rescale_restart,
)
from secondorder.precond.grafting import adam_graft
from secondorder.precond.structured import get_structure
from secondorder.precond.structured.initial_scale import scale_to_statistics


def test_adam_graft_keeps_direction_and_takes_adams_norm():
    torch.manual_seed(0)
    grads = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    directions = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    states = [{}, {}]
    out = adam_graft(states, grads, directions, beta2=0.999, eps=1e-8)
    # t = 1: v̂ = g², so Adam's direction is sign(g) up to ε: norm √(number of entries).
    adam_norm = math.sqrt(sum(float(((g / (g.abs() + 1e-8)) ** 2).sum()) for g in grads))
    got_norm = math.sqrt(sum(float((d**2).sum()) for d in out))
    assert got_norm == pytest.approx(adam_norm, rel=1e-12)
    ratio = out[0] / directions[0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])))
    torch.testing.assert_close(out[1] / directions[1], torch.full_like(out[1], float(ratio[0, 0])))
    assert int(states[0]["graft_step"]) == 1 and states[0]["graft_exp_avg_sq"].shape == (4, 3)


def test_adam_graft_with_numerators_uses_them_for_the_norm():
    grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    numerator = torch.tensor([0.5, 0.5], dtype=torch.float64)
    (out,) = adam_graft([{}], [grad], [torch.tensor([3.0, 4.0], dtype=torch.float64)],
                        beta2=0.0, eps=0.0, numerators=[numerator])
    expected_norm = math.sqrt(0.5**2 + 0.25**2)  # numerator / |g|
    assert float(out.norm()) == pytest.approx(expected_norm)


@pytest.mark.parametrize("length", [1e-3, 1e3])
def test_adam_cap_shrinks_only_steps_longer_than_adams(length):
    """t = 1: Adam's direction is sign(g), norm √6; a shorter step passes unchanged, a longer
    one is shrunk to exactly that norm along its own direction."""
    torch.manual_seed(0)
    grad = torch.randn(2, 3, dtype=torch.float64)
    direction = torch.randn(2, 3, dtype=torch.float64)
    direction *= length / direction.norm()
    (out,) = adam_graft([{}], [grad], [direction], beta2=0.999, eps=1e-12, kind="adam_cap")
    if length < math.sqrt(6):
        torch.testing.assert_close(out, direction, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, direction * (math.sqrt(6) / length), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="Invalid kind"):
        adam_graft([{}], [grad], [direction], beta2=0.999, eps=1e-8, kind="sgd")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("loss_scale", [1e-2, 1e3])
def test_singd_default_step_is_its_own_and_never_longer_than_adams(loss_scale, momentum):
    """SINGD's default (graft="adam_cap"): each layer's first step (the heavy-ball buffer
    starts at 0, so it is ``d``) is the natural gradient itself where that is shorter than
    ``(1 − α₂)·`` Adam's step, and that length where longer (so the heavy-ball sum of
    aligned steps is at most Adam's length)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    lengths = {}
    for graft in ("none", "adam_cap"):
        work = copy.deepcopy(model)
        optimizer = SINGD(work, lr=1.0, momentum=momentum, graft=graft, warn_unsupported=False)
        before = [p.detach().clone() for p in work.parameters()]
        optimizer.zero_grad()
        (loss_scale * F.mse_loss(work(x), y)).backward()
        grads = [p.grad.clone() for p in work.parameters()]
        optimizer.step()
        steps = [b - p.detach() for b, p in zip(before, work.parameters())]
        lengths[graft] = [math.hypot(steps[i].norm(), steps[i + 1].norm()) for i in (0, 2)]
    for layer, own in enumerate(lengths["none"]):
        adam = math.sqrt(grads[2 * layer].numel() + grads[2 * layer + 1].numel())  # sign(g) at t=1
        assert lengths["adam_cap"][layer] == pytest.approx(min(own, (1 - momentum) * adam), rel=1e-6)
    bites = max(lengths["none"]) > (1 - momentum) * math.sqrt(4 * 8 + 8)
    assert bites == (loss_scale > 1)  # both cases are exercised


def test_relative_damping_is_absolute_damping_times_mean():
    correction = torch.rand(2, 3, 4, dtype=torch.float64)
    projected = torch.randn(2, 3, 4, dtype=torch.float64)
    relative = eigenbasis_direction(projected, correction, 0.1, "relative", 1.0)
    for group in range(2):
        absolute = eigenbasis_direction(
            projected[group], correction[group], 0.1 * float(correction[group].mean()),
            "absolute", 1.0,
        )
        torch.testing.assert_close(relative[group], absolute)
    half = eigenbasis_direction(projected, correction, 0.1, "relative", 0.5)
    damping = effective_damping(correction, 0.1, "relative")
    torch.testing.assert_close(half, projected / (correction + damping).sqrt())


def test_batch_correction_and_restart_scale():
    correction = torch.ones(1, 2, 2, dtype=torch.float64)
    projected = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]], dtype=torch.float64)
    fold_batch_correction(correction, projected, num_examples=4, decay=0.75)
    torch.testing.assert_close(correction, 0.75 + 0.25 * 4 * projected**2)
    kfac = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]], dtype=torch.float64)
    restarted = rescale_restart(kfac, correction)
    assert float(restarted.mean()) == pytest.approx(float(correction.mean()))
    torch.testing.assert_close(restarted / restarted.max(), kfac / kfac.max())
    assert rescale_restart(kfac, None) is kfac


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch(n=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=generator
    )


def test_ekfac_default_first_step_is_grafted_relative_damped_direction():
    """Defaults: Δ = −lr·P·‖Adam‖/‖P‖, P = Q[(QᵀḠQ)/√(Λ + 0.1·mean(Λ))]Qᵀ."""
    x, y = _batch()
    model = _mlp()
    optimizer = EKFAC(model, lr=0.1, betas=(0.0, 0.999), stat_decay=0.0, stats_every=1,
                      damping=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    for index, layer in enumerate(optimizer.capture.layers):
        basis = optimizer.eigenbasis(layer.weight)
        grad_matrix = layer.gradient_matrix(grads[2 * index], grads[2 * index + 1])
        # Λ after the step holds the batch fold N·X² on top of the (ρ = 0) restart.
        damping = 0.1 * float(basis.correction.mean())
        direction = basis.unproject(
            basis.project(grad_matrix) / (basis.correction + damping).sqrt()
        )
        adam = torch.cat([(g / (g.abs() + 1e-8)).reshape(-1)
                          for g in grads[2 * index: 2 * index + 2]])
        expected = -0.1 * direction * adam.norm() / direction.norm()
        got = layer.gradient_matrix(layer.weight - before[2 * index],
                                    layer.bias - before[2 * index + 1])
        torch.testing.assert_close(got, expected)


def test_ekfac_batch_correction_records_only_on_statistics_steps():
    model = _mlp()
    optimizer = EKFAC(model, stats_every=3)
    x, y = _batch()
    enabled = [optimizer.capture.enabled]
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        enabled.append(optimizer.capture.enabled)
    assert enabled == [True, False, False, True, False]


def test_singd_auto_init_scales_factors_to_statistics():
    K_cls = get_structure("dense")
    K, C = K_cls.eye(3, dtype=torch.float64), K_cls.eye(2, dtype=torch.float64)
    rows_K = torch.full((4, 3), 0.5, dtype=torch.float64)  # tr̄(U) = 4·0.25 = 1
    rows_C = torch.full((4, 2), 10.0, dtype=torch.float64)  # tr̄(G) = 400
    scale_to_statistics(K, C, rows_K, rows_C, damping=0.0)
    torch.testing.assert_close(K.to_dense(), torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(C.to_dense(), torch.eye(2, dtype=torch.float64) / 20.0)


def test_singd_auto_init_makes_loss_average_matter_less():
    """A sequence model read with the wrong loss_average: auto init moves K, C off I at once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5))
    x, y = torch.randn(4, 16, 4), torch.randint(0, 5, (4, 16))
    # the pre-0.5 defaults: wrong loss_average for this loss, slow factor steps
    optimizer = SINGD(model, init_scale="auto", loss_average="batch", lr_cov=1e-2,
                      normalize_lr_cov=False, warn_unsupported=False)
    optimizer.zero_grad()
    F.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)).backward()
    optimizer.step()
    K, C = optimizer.factors(model[2].weight)
    assert float(C.to_dense().diagonal().mean()) > 3.0  # G tiny: C starts far above I


def test_adafisher_mean_normalisation_makes_damping_relative():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    optimizer = AdaFisher(model, update_freq=1, gamma=0.0, damping=1e-3, normalization="mean")
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    state = optimizer.state[model[0].weight]
    assert float(state["fisher_activation"].mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(state["fisher_gradient"].mean()) == pytest.approx(1.0, rel=1e-5)
