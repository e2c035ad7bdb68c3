"""EK-FAC's ``max_factor_dim``: a wide layer's ``A`` kept block-diagonal, against dense oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import EKFAC
from secondorder.precond.blocked_factor import factor_blocks
from tests.oracles import empirical_fisher, per_example_gradients

PAPER = dict(damping_rule="absolute", power=1.0, correction="per_example", graft="none")
F64 = torch.float64


def _ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch(n=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 7, generator=generator, dtype=F64),
            torch.randint(0, 3, (n,), generator=generator))


def test_blocks_are_contiguous_nearly_equal_and_within_the_bound():
    assert factor_blocks(513, 256) == [(0, 171), (171, 342), (342, 513)]
    assert factor_blocks(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert factor_blocks(8, 8) is None and factor_blocks(8, None) is None
    for size, bound in ((513, 64), (100, 7), (5, 1)):
        blocks = factor_blocks(size, bound)
        assert blocks[0][0] == 0 and blocks[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        widths = [stop - start for start, stop in blocks]
        assert max(widths) <= bound and max(widths) - min(widths) <= 1


def test_blocked_factors_are_the_dense_factors_diagonal_blocks():
    """Two steps (two EMA folds): each A_j equals A[c_j, c_j] of an unblocked run; G is G."""
    x, y = _batch()
    runs = {}
    for max_dim in (None, 3):
        model = _model()
        optimizer = EKFAC(model, **PAPER, lr=0.0, stats_every=1, stat_decay=0.7, max_factor_dim=max_dim)
        for step in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x[step::2]), y[step::2]).backward()
            optimizer.step()
        runs[max_dim] = (model, optimizer)
    (dense_model, dense), (blocked_model, blocked) = runs[None], runs[3]
    for dense_layer, blocked_layer in zip(dense_model[0::2], blocked_model[0::2], strict=True):
        want, got = dense.state[dense_layer.weight], blocked.state[blocked_layer.weight]
        assert "activation_factor" not in got and "activation_basis" not in got
        blocks = factor_blocks(dense_layer.in_features + 1, 3)
        for j, (start, stop) in enumerate(blocks):
            torch.testing.assert_close(got[f"activation_factor_block_{j}"],
                                       want["activation_factor"][:, start:stop, start:stop], rtol=0, atol=1e-14)
        torch.testing.assert_close(got["gradient_factor"], want["gradient_factor"], rtol=0, atol=1e-14)


def test_first_blocked_step_is_exact_against_a_dense_oracle():
    """stat_decay 0, β₁ 0: A from the raw inputs, blockdiag'd; G from per-example output
    gradients; Q = kron(Q_G, blockdiag(Q_{A_j})); Λ = diag(QᵀEFQ); ΔW = −lr·Q(Λ+λ)⁻¹Qᵀ vec Ḡ."""
    model = _model()
    lr, damping, max_dim = 0.1, 1e-2, 3
    optimizer = EKFAC(model, **PAPER, lr=lr, betas=(0.0, 0.999), damping=damping, stat_decay=0.0,
                      stats_every=1, max_factor_dim=max_dim)
    x, y = _batch()
    n = x.shape[0]
    before = [p.detach().clone() for p in model.parameters()]
    oracles = []
    inputs = x
    for index in (0, 2):  # each Linear: its input rows ā and per-example gradients
        layer = model[index]
        rows = torch.cat([inputs, torch.ones(n, 1, dtype=F64)], dim=1)
        weight_grads, bias_grads = per_example_gradients(model, _ce_sum, x, y, [layer.weight, layer.bias])
        a_full = rows.T @ rows / n
        g_factor = bias_grads.T @ bias_grads / n  # g_n = ∂ℓ_n/∂(layer output) = bias gradient
        blocks = factor_blocks(rows.shape[1], max_dim)
        q_a = torch.block_diag(*(torch.linalg.eigh(a_full[s:e, s:e])[1] for s, e in blocks))
        q = torch.kron(torch.linalg.eigh(g_factor)[1].contiguous(), q_a.contiguous())
        per_example = torch.cat([weight_grads, bias_grads.unsqueeze(-1)], dim=-1).reshape(n, -1)
        correction = torch.diagonal(q.T @ empirical_fisher(per_example) @ q)
        oracles.append(q @ torch.diag(1.0 / (correction + damping)) @ q.T)
        inputs = model[index + 1](layer(inputs)).detach() if index == 0 else None
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    for index, (layer, oracle) in enumerate(zip(optimizer.capture.layers, oracles, strict=True)):
        torch.testing.assert_close(optimizer.to_dense(layer.weight), oracle)
        grad_matrix = layer.gradient_matrix(grads[2 * index], grads[2 * index + 1]).reshape(-1)
        got = layer.gradient_matrix(layer.weight - before[2 * index], layer.bias - before[2 * index + 1])
        torch.testing.assert_close(got.reshape(-1), -lr * oracle @ grad_matrix)


def test_blocked_state_is_smaller_and_round_trips():
    model = _model()
    optimizer = EKFAC(model, lr=0.01, stats_every=1, max_factor_dim=3)
    x, y = _batch()
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    state = optimizer.state[model[0].weight]
    assert sum(state[f"activation_factor_block_{j}"].numel() for j in range(3)) == 9 + 9 + 4  # not 8²
    for j in range(3):  # each block its own storage (not a view of the batched eigh's output)
        basis = state[f"activation_basis_block_{j}"]
        assert basis.untyped_storage().nbytes() == basis.numel() * basis.element_size()
    saved = optimizer.state_dict()
    fresh_model = _model()
    fresh = EKFAC(fresh_model, lr=0.01, stats_every=1, max_factor_dim=3)
    fresh.load_state_dict(saved)
    fresh_model.load_state_dict(model.state_dict())
    for opt, net in ((optimizer, model), (fresh, fresh_model)):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [0, -3, 2.5, "64"])
def test_invalid_max_factor_dim(value):
    with pytest.raises((ValueError, TypeError), match="^Invalid max_factor_dim"):
        EKFAC(_model(), max_factor_dim=value)


def test_influence_from_a_blocked_optimizer_sees_the_block_diagonal_factor():
    from secondorder.influence import InfluenceFactors

    model = _model()
    optimizer = EKFAC(model, lr=0.01, stats_every=1, max_factor_dim=3)
    x, y = _batch()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    factors = InfluenceFactors.from_optimizer(optimizer)
    state = optimizer.state[model[0].weight]
    layer = factors.layers["0"]
    want = torch.block_diag(*(state[f"activation_factor_block_{j}"][0] for j in range(3)))
    torch.testing.assert_close(layer["activation_covariance"][0], want, rtol=0, atol=0)
    basis = optimizer.eigenbasis(model[0].weight).activation_basis
    torch.testing.assert_close(layer["activation_eigenvectors"], basis, rtol=0, atol=0)
