"""Issue 14's default rules: Adam-norm grafting, EK-FAC's damping/power/batch correction,
SINGD's statistics-scaled initial factors, AdaFisher's mean normalisation."""

from __future__ import annotations

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
    optimizer = SINGD(model, init_scale="auto", warn_unsupported=False)
    optimizer.zero_grad()
    F.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)).backward()
    optimizer.step()
    K, C = optimizer.factors(model[2].weight)
    assert float(C.to_dense().diagonal().mean()) > 3.0  # G tiny: C starts far above I


def test_adafisher_mean_normalisation_makes_damping_relative():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    optimizer = AdaFisher(model, update_freq=1, gamma=0.0, damping=1e-3)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    state = optimizer.state[model[0].weight]
    assert float(state["fisher_activation"].mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(state["fisher_gradient"].mean()) == pytest.approx(1.0, rel=1e-5)
