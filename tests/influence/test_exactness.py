"""Scores equal brute-force float64 solves with the same block-diagonal matrices."""

import pytest
import torch
from torch.utils.data import TensorDataset

from secondorder import influence
from tests.influence import oracle

DAMPING = 1e-3


def _scores(model, train, query, strategy, damping=DAMPING, batch_size=5, **kwargs):
    task = influence.ClassificationTask()
    train_set, query_set = TensorDataset(*train), TensorDataset(*query)
    factors = influence.fit_factors(
        model, task, train_set, strategy=strategy, batch_size=batch_size, progress=False
    )
    return influence.compute_pairwise_scores(
        model,
        task,
        factors,
        query_set,
        train_set,
        damping=damping,
        train_batch_size=batch_size,
        progress=False,
        **kwargs,
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_scores_match_dense_block_solve(strategy, bias):
    model, train, query = oracle.make_problem(bias=bias)
    expected, _ = oracle.dense_scores(
        model, train, query, oracle.dense_blocks(model, *train, strategy), DAMPING
    )
    result = _scores(model, train, query, strategy)
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-10)


def test_identity_equals_gradient_dot_products():
    model, train, query = oracle.make_problem()
    expected, _ = oracle.dense_scores(model, train, query, None, 0.0)
    result = _scores(model, train, query, "identity")
    torch.testing.assert_close(result.scores, expected, rtol=1e-12, atol=1e-12)


def test_kfac_with_one_example_equals_empirical_fisher_block():
    """Rank-one exactness (ekfac.md §11.4): with N = 1 and T = 1, A ⊗ S is the EF block."""
    model, train, query = oracle.make_problem(n_train=1, tokens=1)
    blocks = oracle.dense_blocks(model, *train, "empirical_block")
    expected, _ = oracle.dense_scores(model, train, query, blocks, DAMPING)
    result = _scores(model, train, query, "kfac")
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-10)


def test_kfac_with_tokens_is_not_the_empirical_block():
    """Negative control: with T > 1 positions the Kronecker product is not rank-one exact."""
    model, train, query = oracle.make_problem(n_train=1, tokens=3)
    blocks = oracle.dense_blocks(model, *train, "empirical_block")
    expected, _ = oracle.dense_scores(model, train, query, blocks, DAMPING)
    result = _scores(model, train, query, "kfac")
    assert not torch.allclose(result.scores, expected, rtol=1e-3)


def test_factors_equal_oracle_factors():
    model, train, _ = oracle.make_problem()
    rows = oracle.layer_rows(model, *train)
    factors = influence.fit_factors(
        model,
        influence.ClassificationTask(),
        TensorDataset(*train),
        strategy="ekfac",
        batch_size=4,
        progress=False,
    )
    for name in ("fc1", "fc2"):
        factor_a, factor_s = oracle.kronecker_factors(rows[name])
        layer = factors.layers[name]
        torch.testing.assert_close(
            layer["activation_covariance"][0] / layer["activation_count"], factor_a
        )
        torch.testing.assert_close(
            layer["gradient_covariance"][0] / layer["gradient_count"], factor_s
        )
        # the correction identity vec Λ = diag(Kᵀ EF K) with the fitted eigenbasis (ekfac.md §11.3)
        matrices = oracle.per_example_matrices(model, *train)[name].flatten(1)
        empirical = matrices.T @ matrices / matrices.shape[0]
        basis = torch.kron(layer["gradient_eigenvectors"][0], layer["activation_eigenvectors"][0])
        expected = (basis.T @ empirical @ basis).diagonal().reshape(layer["lambda"].shape[1:])
        torch.testing.assert_close(layer["lambda"][0] / layer["lambda_count"], expected)


def test_per_layer_and_per_token_scores_sum_to_total():
    model, train, query = oracle.make_problem()
    # per-token needs every tracked layer at the same positions: track fc1 only (T = 3)
    task = influence.ClassificationTask(modules=["fc1"])
    train_set, query_set = TensorDataset(*train), TensorDataset(*query)
    factors = influence.fit_factors(
        model, task, train_set, strategy="ekfac", batch_size=5, progress=False
    )
    result = influence.compute_pairwise_scores(
        model,
        task,
        factors,
        query_set,
        train_set,
        damping=DAMPING,
        per_layer=True,
        per_token=True,
        progress=False,
    )
    assert result.per_token.shape == (4, 12, 3)
    torch.testing.assert_close(result.per_token.sum(-1), result.scores)
    torch.testing.assert_close(result.per_layer["fc1"], result.scores)
    # per-token against the oracle: g_tᵀ P a_t with P the dense preconditioned query gradient
    rows = oracle.layer_rows(model, *train)["fc1"]
    block = oracle.dense_blocks(model, *train, "ekfac")["fc1"]
    query_grads = oracle.per_example_matrices(model, *query)["fc1"].flatten(1)
    solved = torch.linalg.solve(
        block + DAMPING * torch.eye(block.shape[0], dtype=block.dtype), query_grads.T
    ).T
    solved = solved.reshape(4, 5, -1)
    expected = torch.einsum("qoi,nti,nto->qnt", solved, rows[0], rows[1])
    torch.testing.assert_close(result.per_token, expected)
    # both layers: per-layer scores sum to the total
    full = _scores(model, train, query, "ekfac", per_layer=True)
    torch.testing.assert_close(sum(full.per_layer.values()), full.scores)


def test_self_scores_equal_pairwise_diagonal():
    model, train, _ = oracle.make_problem()
    task = influence.ClassificationTask()
    dataset = TensorDataset(*train)
    factors = influence.fit_factors(
        model, task, dataset, strategy="ekfac", batch_size=5, progress=False
    )
    pairwise = influence.compute_pairwise_scores(
        model, task, factors, dataset, dataset, damping=DAMPING, progress=False
    )
    self_scores = influence.compute_self_scores(
        model, task, factors, dataset, damping=DAMPING, batch_size=5, per_layer=True, progress=False
    )
    torch.testing.assert_close(self_scores.scores, pairwise.scores.diagonal())
    torch.testing.assert_close(sum(self_scores.per_layer.values()), self_scores.scores)
    measured = influence.compute_self_scores(
        model, task, factors, dataset, damping=DAMPING, use_measurement=True, progress=False
    )
    torch.testing.assert_close(measured.scores, self_scores.scores)  # measurement = loss here
    assert (self_scores.scores > 0).all()


def test_heuristic_damping_is_tenth_of_mean_eigenvalue():
    model, train, query = oracle.make_problem()
    factors = influence.fit_factors(
        model,
        influence.ClassificationTask(),
        TensorDataset(*train),
        strategy="ekfac",
        progress=False,
    )
    for name, preconditioner in factors.preconditioners(None).items():
        layer = factors.layers[name]
        mean = float((layer["lambda"] / layer["lambda_count"]).mean())
        assert preconditioner.damping == pytest.approx(0.1 * mean, rel=1e-12)
    kfac = influence.fit_factors(
        model,
        influence.ClassificationTask(),
        TensorDataset(*train),
        strategy="kfac",
        progress=False,
    )
    layer = kfac.layers["fc1"]
    mean = float(
        torch.outer(layer["gradient_eigenvalues"][0], layer["activation_eigenvalues"][0]).mean()
    )
    assert kfac.preconditioners(None)["fc1"].damping == pytest.approx(0.1 * mean, rel=1e-12)


def test_huge_damping_scales_gradient_dot_products():
    model, train, query = oracle.make_problem()
    identity, _ = oracle.dense_scores(model, train, query, None, 0.0)
    result = _scores(model, train, query, "ekfac", damping=1e8)
    torch.testing.assert_close(result.scores * 1e8, identity, rtol=1e-5, atol=1e-9)
