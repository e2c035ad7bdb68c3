"""K-FAC factors and the EK-FAC correction against dense empirical-Fisher blocks (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.precond.capture import LayerCapture
from secondorder.precond.kfac import (
    KroneckerEigenbasis,
    eigenvalue_correction,
    kronecker_factors,
    per_example_gradients,
)
from tests.oracles import empirical_fisher
from tests.oracles import per_example_gradients as oracle_per_example


def _ce_sum(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def _capture(model, x, y):
    capture = LayerCapture(model)
    out = model(x)
    (_ce_sum(out, y) / x.shape[0]).backward()
    return capture, capture.pop()


def _dense_block(model, layer, x, y):
    """The layer's EF block from torch.func per-example gradients, in gradient-matrix order."""
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    grads = oracle_per_example(model, _ce_sum, x, y, params)
    rows = [
        layer.gradient_matrix(grads[0][n], grads[1][n] if layer.bias is not None else None).reshape(
            -1
        )
        for n in range(x.shape[0])
    ]
    return empirical_fisher(torch.stack(rows))


def _mlp(bias=True):
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).double()


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_batch_one_equals_empirical_fisher_block(bias):
    torch.manual_seed(0)
    model = _mlp(bias)
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([2])
    capture, stats = _capture(model, x, y)
    for layer in capture.layers:
        A, G = kronecker_factors(layer, stats[layer])
        dense = _dense_block(model, layer, x, y)
        torch.testing.assert_close(torch.kron(G[0], A[0]), dense)
        basis = KroneckerEigenbasis.from_factors(A, G)
        torch.testing.assert_close(
            basis.to_dense(), dense
        )  # K-FAC eigenvalues reconstruct kron(G, A)
        # in batch size 1 the correction equals the K-FAC eigenvalues
        correction = eigenvalue_correction(
            layer, stats[layer], basis.gradient_basis, basis.activation_basis
        )
        torch.testing.assert_close(correction, basis.kfac_eigenvalues())


def test_kfac_with_tokens_is_not_the_fisher_block():
    """Negative control for the token convention (ekfac.md §11.4): T > 1 must not match."""
    torch.manual_seed(1)
    model = _mlp()
    x = torch.randn(1, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (1, 3))
    capture, stats = _capture(model, x, y)
    layer = capture.layers[0]
    A, G = kronecker_factors(layer, stats[layer])
    assert not torch.allclose(torch.kron(G[0], A[0]), _dense_block(model, layer, x, y))


def _conv_model(groups):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=groups),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 3),
    )
    return model.double()


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.head = nn.Linear(3, 6)

    def forward(self, idx):
        return self.head(torch.tanh(self.embed(idx)))


CASES = {
    "mlp": (lambda: _mlp(), lambda: (torch.randn(5, 3), torch.randint(0, 3, (5,)))),
    "tokens": (lambda: _mlp(), lambda: (torch.randn(4, 3, 3), torch.randint(0, 3, (4, 3)))),
    "conv": (lambda: _conv_model(1), lambda: (torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,)))),
    "conv_groups": (
        lambda: _conv_model(2),
        lambda: (torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))),
    ),
    "embedding": (_TinyLM, lambda: (torch.randint(0, 6, (4, 5)), torch.randint(0, 6, (4, 5)))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_elements", [1 << 24, 1])
def test_correction_is_diagonal_of_rotated_empirical_fisher(case, chunk_elements):
    torch.manual_seed(2)
    make_model, make_data = CASES[case]
    model = make_model().double()
    x, y = make_data()
    x = x.double() if x.is_floating_point() else x
    capture, stats = _capture(model, x, y)
    for layer in capture.layers:
        A, G = kronecker_factors(layer, stats[layer])
        basis = KroneckerEigenbasis.from_factors(A, G)
        correction = eigenvalue_correction(
            layer,
            stats[layer],
            basis.gradient_basis,
            basis.activation_basis,
            chunk_elements=chunk_elements,
        )
        basis.correction = correction
        dense = _dense_block(model, layer, x, y)
        q = basis.dense_basis()
        torch.testing.assert_close(correction.reshape(-1), torch.diagonal(q.T @ dense @ q))
        # the materialised per-example matrices agree with the dense per-example gradients too
        per_example = per_example_gradients(layer, stats[layer]).reshape(x.shape[0], -1)
        torch.testing.assert_close(empirical_fisher(per_example), dense)


def test_conv_factors_equal_brute_force_patches():
    torch.manual_seed(3)
    model = _conv_model(1)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    capture, stats = _capture(model, x, torch.randint(0, 3, (3,)))
    conv = capture.layers[0]
    A, G = kronecker_factors(conv, stats[conv])
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    patches = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(A[0], patches.T @ patches / patches.shape[0])
    assert G.shape == (1, 4, 4) and stats[conv].num_positions == 3 * 9


def test_precondition_equals_to_dense_and_inverse_of_damped_curvature():
    torch.manual_seed(4)
    make_model, make_data = CASES["conv_groups"]
    model = make_model()
    x, y = make_data()
    capture, stats = _capture(model, x.double(), y)
    conv = capture.layers[0]
    A, G = kronecker_factors(conv, stats[conv])
    basis = KroneckerEigenbasis.from_factors(A, G)
    basis.correction = eigenvalue_correction(
        conv, stats[conv], basis.gradient_basis, basis.activation_basis
    )
    damping = 1e-2
    size = basis.correction.numel()
    identity = torch.eye(size, dtype=torch.float64).reshape((size,) + basis.correction.shape)
    columns = basis.precondition(identity, damping).reshape(size, size).T
    torch.testing.assert_close(basis.to_dense(damping), columns)
    curvature = basis.to_dense()
    torch.testing.assert_close(
        basis.to_dense(damping),
        torch.linalg.inv(curvature + damping * torch.eye(size, dtype=torch.float64)),
    )


def test_huge_damping_and_state_dict_round_trip():
    torch.manual_seed(5)
    capture, stats = _capture(
        _mlp(), torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    )
    layer = capture.layers[1]
    basis = KroneckerEigenbasis.from_factors(*kronecker_factors(layer, stats[layer]))
    matrix = torch.randn(1, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(basis.precondition(matrix, 1e8), matrix / 1e8, rtol=1e-6, atol=0)
    restored = KroneckerEigenbasis.from_state_dict(basis.state_dict())
    assert restored.correction is None
    torch.testing.assert_close(restored.precondition(matrix, 0.1), basis.precondition(matrix, 0.1))


def test_oracles_agree_on_linear_least_squares():
    """Linear model, squared error: GGN = Hessian = kron(I, 2·XᵀX/N) (weight, row-major)."""
    from tests.oracles import gauss_newton, loss_hessian

    torch.manual_seed(6)
    model = nn.Linear(3, 2, bias=False).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)

    def loss_fn(out, target):
        return (out - target).pow(2).sum()

    expected = torch.kron(torch.eye(2, dtype=torch.float64), 2 * x.T @ x / 5)
    torch.testing.assert_close(gauss_newton(model, loss_fn, x, y), expected)
    torch.testing.assert_close(loss_hessian(model, loss_fn, x, y), expected)
