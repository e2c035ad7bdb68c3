"""EKFAC: exact first steps against dense float64 oracles, schedules, failures, mixed models."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder.optimizers.ekfac as ekfac_module
from secondorder import EKFAC
from secondorder.precond.linalg import NumericalWarning
from tests.oracles import empirical_fisher, per_example_gradients

# The paper's algorithm (George et al. 2018): absolute damping, per-example correction, no
# grafting. The defaults are a documented variant (test_quality_defaults.py).
PAPER = dict(damping_rule="absolute", power=1.0, correction="per_example", graft="none")


def _ce_sum(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch(n=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=generator
    )


def _step(model, optimizer, x, y):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_first_step_is_exact_ekfac_step():
    """stat_decay 0, β₁ 0: Λ = diag(QᵀEFQ) from dense per-example gradients; ΔW = −lr·P(Ḡ)."""
    model = _mlp()
    optimizer = EKFAC(
        model, **PAPER, lr=0.1, betas=(0.0, 0.999), damping=1e-2, stat_decay=0.0, stats_every=1
    )
    x, y = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    fishers = []
    for layer in optimizer.capture.layers:  # dense blocks at the parameters the step sees
        dense_grads = per_example_gradients(model, _ce_sum, x, y, [layer.weight, layer.bias])
        rows = [
            layer.gradient_matrix(dense_grads[0][n], dense_grads[1][n]).reshape(-1)
            for n in range(6)
        ]
        fishers.append(empirical_fisher(torch.stack(rows)))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    for index, (layer, fisher) in enumerate(zip(optimizer.capture.layers, fishers, strict=True)):
        basis = optimizer.eigenbasis(layer.weight)
        q = basis.dense_basis()
        torch.testing.assert_close(basis.correction.reshape(-1), torch.diagonal(q.T @ fisher @ q))
        grad_matrix = layer.gradient_matrix(grads[2 * index], grads[2 * index + 1]).reshape(-1)
        expected = -0.1 * optimizer.to_dense(layer.weight) @ grad_matrix
        got = layer.gradient_matrix(
            layer.weight - before[2 * index], layer.bias - before[2 * index + 1]
        )
        torch.testing.assert_close(got.reshape(-1), expected)


def test_to_dense_equals_precondition_of_identity_and_damped_inverse():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)
    ).double()
    optimizer = EKFAC(model, **PAPER, lr=0.01, damping=0.05, stats_every=1)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    _step(model, optimizer, x, y)
    conv = optimizer.capture.layers[0]
    basis = optimizer.eigenbasis(conv.weight)
    size = basis.correction.numel()
    identity = torch.eye(size, dtype=torch.float64).reshape((size,) + basis.correction.shape)
    columns = optimizer.precondition(conv.weight, identity).reshape(size, size).T
    dense = optimizer.to_dense(conv.weight)
    torch.testing.assert_close(dense, columns)
    torch.testing.assert_close(
        dense, torch.linalg.inv(basis.to_dense() + 0.05 * torch.eye(size, dtype=torch.float64))
    )


def test_eigenbasis_export_round_trip():
    from secondorder.precond.kfac import KroneckerEigenbasis

    model = _mlp()
    optimizer = EKFAC(model, **PAPER, lr=0.01, damping=0.1, stats_every=1)
    x, y = _batch()
    for _ in range(2):
        _step(model, optimizer, x, y)
    exported = optimizer.eigenbasis_state_dict()
    assert sorted(exported) == ["0", "2"]
    matrix = torch.randn(1, 3, 5, dtype=torch.float64)
    restored = KroneckerEigenbasis.from_state_dict(exported["2"])
    torch.testing.assert_close(
        restored.precondition(matrix, 0.1), optimizer.precondition(model[2].weight, matrix)
    )


def test_huge_damping_gives_gradient_over_damping():
    model = _mlp()
    optimizer = EKFAC(model, **PAPER, lr=1.0, betas=(0.0, 0.999), damping=1e6, stats_every=1)
    x, y = _batch()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = [p.detach() - p.grad / 1e6 for p in model.parameters()]
    optimizer.step()
    for param, target in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.detach(), target, rtol=1e-9, atol=1e-12)


def test_kl_clip_scales_the_step():
    x, y = _batch()
    deltas = []
    for kl_clip in (None, 1e-8):
        model = _mlp()
        optimizer = EKFAC(
            model, **PAPER, lr=0.1, betas=(0.0, 0.999), damping=1e-2, stats_every=1, kl_clip=kl_clip
        )
        before = [p.detach().clone() for p in model.parameters()]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        deltas.append([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
    # lr²⟨P, Ḡ⟩ from the unclipped step ΔW = −lr·P
    quadratic = -0.1 * sum(float((d * g).sum()) for d, g in zip(deltas[0], grads, strict=True))
    nu = (1e-8 / quadratic) ** 0.5
    assert nu < 1
    for unclipped, clipped in zip(*deltas, strict=True):
        torch.testing.assert_close(clipped, nu * unclipped)


def test_recording_follows_the_schedule():
    model = _mlp()
    optimizer = EKFAC(model, **PAPER, stats_every=3, correction_every=3, precondition_frequency=6)
    x, y = _batch()
    enabled = [optimizer.capture.enabled]
    for _ in range(7):
        _step(model, optimizer, x, y)
        enabled.append(optimizer.capture.enabled)
    assert enabled == [True, False, False, True, False, False, True, False]
    assert int(optimizer.state[model[0].weight]["factor_updates"]) == 3


def test_failed_eigh_keeps_basis_counts_and_warns(monkeypatch):
    model = _mlp()
    optimizer = EKFAC(model, **PAPER, stats_every=1, precondition_frequency=1)
    x, y = _batch()
    _step(model, optimizer, x, y)
    weight = model[0].weight
    kept = optimizer.state[weight]["gradient_basis"].clone()
    monkeypatch.setattr(ekfac_module, "batched_eigh", lambda matrices: [None] * len(matrices))
    with pytest.warns(NumericalWarning):
        _step(model, optimizer, x, y)
    assert int(optimizer.state[weight]["numerical_failures"]) == 1
    torch.testing.assert_close(optimizer.state[weight]["gradient_basis"], kept)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Gate(nn.Module):
    """An unsupported layer with its own parameter."""

    def __init__(self, width):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.sigmoid(self.gain)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)
        self.gate = _Gate(8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv2d(1, 2, 3, padding="same")
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8 + 2 * 16, 3)

    def forward(self, tokens, image):
        h = self.gate(self.frozen(self.embed(tokens)))
        h = self.norm(h + self.attention(h, h, h, need_weights=False)[0]).mean(1)
        c = self.act(self.conv(image)).flatten(1)
        return self.head(torch.cat([h, c], 1))


@pytest.mark.parametrize("name", ["EKFAC", "AdaFisher", "AdaFisherW"])
def test_every_trainable_parameter_of_a_mixed_model_moves(name):
    import secondorder

    torch.manual_seed(3)
    model = _Mixed()
    optimizer = getattr(secondorder, name)(model, lr=1e-3)
    tokens = torch.randint(0, 10, (4, 5))
    image = torch.randn(4, 1, 4, 4)
    y = torch.randint(0, 3, (4,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(tokens, image), y).backward()
            optimizer.step()
    for param_name, param in model.named_parameters():
        moved = not torch.equal(param, before[param_name])
        assert moved == param.requires_grad, param_name
    kinds = {layer.name: layer.kind for layer in optimizer.capture.layers}
    assert "frozen" not in kinds and kinds["head"] == "linear"
    assert kinds["attention.in_proj"] == kinds["attention.out_proj"] == "attention"


@pytest.mark.parametrize("name", ["EKFAC", "AdaFisher"])
def test_unscaled_loss_scale_is_detected(name):
    """GradScaler pattern: scaled backward, grads unscaled before step == no scaling."""
    import secondorder

    x, y = _batch()
    results = []
    for scale in (1.0, 2.0**12):
        model = _mlp()
        optimizer = getattr(secondorder, name)(model, lr=0.01)
        for _ in range(3):
            optimizer.zero_grad()
            (F.cross_entropy(model(x), y) * scale).backward()
            for param in model.parameters():
                param.grad.div_(scale)  # what GradScaler.unscale_ does
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for plain, scaled in zip(*results, strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-12, atol=1e-14)
