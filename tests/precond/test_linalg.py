"""Pure linear algebra against float64 dense references."""

import math

import pytest
import torch

from secondorder.precond import linalg
from secondorder.precond.linalg import (
    EigenFailure,
    apply_kronecker,
    batched_eigh,
    cholesky_solve_with_jitter,
    damped_inverse,
    inverse_root_from_eigh,
    matrix_inverse_root,
    mode_product,
    randomized_low_rank,
    shifted_eigenvalues,
    stable_eigh,
)


def random_spd(n, *, condition=10.0, rank=None, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    spectrum = torch.logspace(0, -math.log10(condition), n, dtype=torch.float64)
    if rank is not None:
        spectrum[rank:] = 0
    return ((q * spectrum) @ q.T).to(dtype)


def reference_power(matrix, power):
    values, vectors = torch.linalg.eigh(matrix.double())
    return (vectors * values.pow(power)) @ vectors.T


@pytest.mark.parametrize("condition", [1.0, 1e3, 1e10])
def test_stable_eigh_reconstructs(condition):
    matrix = random_spd(12, condition=condition)
    values, vectors = stable_eigh(matrix)
    torch.testing.assert_close((vectors * values) @ vectors.T, matrix, atol=1e-12, rtol=0)
    assert torch.all(values[1:] >= values[:-1])


def test_stable_eigh_symmetrises_input():
    matrix = random_spd(6)
    noisy = matrix + 1e-9 * torch.triu(torch.ones(6, 6, dtype=torch.float64), 1)
    values, _ = stable_eigh(noisy)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(matrix), atol=1e-8, rtol=0)


def test_stable_eigh_rejects_non_finite():
    matrix = random_spd(4)
    matrix[0, 1] = float("nan")
    with pytest.raises(EigenFailure):
        stable_eigh(matrix)


def test_stable_eigh_retries_in_float64(monkeypatch):
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky(matrix):
        calls.append(matrix.dtype)
        if matrix.dtype != torch.float64:
            raise RuntimeError("simulated LAPACK failure")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    matrix = random_spd(5, dtype=torch.float32)
    values, vectors = stable_eigh(matrix)
    assert calls == [torch.float32, torch.float64]
    assert values.dtype == torch.float32 and vectors.dtype == torch.float32
    torch.testing.assert_close((vectors * values) @ vectors.T, matrix, atol=1e-5, rtol=0)


def test_stable_eigh_raises_when_float64_fails_too(monkeypatch):
    def broken(matrix):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(EigenFailure):
        stable_eigh(random_spd(3, dtype=torch.float32))


def test_batched_eigh_matches_individual_and_isolates_failures():
    matrices = [random_spd(4, seed=s) for s in range(3)] + [random_spd(6, seed=9)]
    bad = random_spd(4, seed=5)
    bad[1, 1] = float("inf")
    results = batched_eigh(matrices[:2] + [bad] + matrices[2:])
    assert results[2] is None
    good = [r for i, r in enumerate(results) if i != 2]
    for matrix, (values, vectors) in zip(matrices, good):
        torch.testing.assert_close((vectors * values) @ vectors.T, matrix, atol=1e-12, rtol=0)


@pytest.mark.parametrize("exponent", [0.25, 0.5, 1.0])
def test_inverse_root_matches_float64_reference(exponent):
    matrix = random_spd(10, condition=1e4)
    values, vectors = stable_eigh(matrix)
    root = inverse_root_from_eigh(values, vectors, exponent)
    torch.testing.assert_close(root, reference_power(matrix, -exponent), atol=1e-9, rtol=1e-9)


def test_matrix_inverse_root_of_rank_deficient_factor_is_finite_and_shifted():
    # A softmax head's factor: rank deficient, eigenvalues slightly negative in float32.
    matrix = random_spd(10, rank=6, dtype=torch.float32)
    epsilon = 1e-12
    root = matrix_inverse_root(matrix, 0.25, epsilon)
    assert torch.isfinite(root).all()
    values = torch.linalg.eigvalsh(matrix.double() + epsilon * torch.eye(10, dtype=torch.float64))
    shifted = shifted_eigenvalues(values, epsilon)
    assert shifted.min() >= epsilon * (1 - 1e-9)


def test_shifted_eigenvalues_rule():
    values = torch.tensor([-3.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(shifted_eigenvalues(values, 0.5), torch.tensor([0.5, 4.5, 5.5], dtype=torch.float64))
    positive = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(shifted_eigenvalues(positive, 0.5), positive)


def test_damped_inverse():
    matrix = random_spd(7, rank=3)
    values, vectors = stable_eigh(matrix)
    expected = torch.linalg.inv(matrix + 0.1 * torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(damped_inverse(values, vectors, 0.1), expected, atol=1e-10, rtol=1e-10)


def test_mode_product_and_apply_kronecker_match_kron():
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    a, b, c = (torch.randn(n, n, dtype=torch.float64) for n in (3, 4, 5))
    at, bt, ct = (m.T.contiguous() for m in (a, b, c))
    torch.testing.assert_close(mode_product(g[:, :, 0], a, 0), a.T @ g[:, :, 0])
    torch.testing.assert_close(mode_product(g[:, :, 0], b, 1), g[:, :, 0] @ b)
    result = apply_kronecker(g, [a, b, c])
    expected = (torch.kron(torch.kron(at, bt), ct) @ g.reshape(-1)).reshape(3, 4, 5)
    torch.testing.assert_close(result, expected)
    partial = apply_kronecker(g, [a, None, c])
    expected = (torch.kron(torch.kron(at, torch.eye(4, dtype=torch.float64)), ct) @ g.reshape(-1)).reshape(3, 4, 5)
    torch.testing.assert_close(partial, expected)
    with pytest.raises(ValueError, match="matrices"):
        apply_kronecker(g, [a, b])


def test_cholesky_solve_with_jitter():
    matrix = random_spd(8)
    rhs = torch.randn(8, 2, dtype=torch.float64)
    torch.testing.assert_close(cholesky_solve_with_jitter(matrix, rhs), torch.linalg.solve(matrix, rhs))
    vector = torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(cholesky_solve_with_jitter(matrix, vector), torch.linalg.solve(matrix, vector))
    # Rank deficient and slightly indefinite: needs jitter, still solves the consistent system.
    singular = random_spd(8, rank=4) - 1e-14 * torch.eye(8, dtype=torch.float64)
    consistent = singular @ torch.randn(8, dtype=torch.float64)
    solution = cholesky_solve_with_jitter(singular, consistent)
    torch.testing.assert_close(singular @ solution, consistent, atol=1e-6, rtol=0)


def test_cholesky_solve_gives_up_cleanly():
    with pytest.raises(EigenFailure):
        cholesky_solve_with_jitter(-torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), max_tries=2)


def test_randomized_low_rank_recovers_exact_low_rank():
    generator = torch.Generator().manual_seed(1)
    u = torch.randn(30, 4, dtype=torch.float64, generator=generator)
    v = torch.randn(20, 4, dtype=torch.float64, generator=generator)
    matrix = u @ v.T
    left, singular, right = randomized_low_rank(matrix, 4, generator=generator)
    torch.testing.assert_close((left * singular) @ right.T, matrix, atol=1e-9, rtol=0)
    torch.testing.assert_close(singular, torch.linalg.svdvals(matrix)[:4])


def test_randomized_low_rank_of_symmetric_operator():
    spd = random_spd(25, rank=3)
    left, singular, _ = randomized_low_rank(lambda x: spd @ x, 3, size=25, dtype=torch.float64)
    torch.testing.assert_close((left * singular) @ left.T, spd, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        randomized_low_rank(spd, 0)


def test_bias_correction():
    assert linalg.bias_correction(1.0, 5) == 1.0
    assert linalg.bias_correction(0.0, 5) == 1.0
    assert linalg.bias_correction(0.9, 2) == pytest.approx(0.19)


def test_cpu_threads_restores_setting():
    previous = torch.get_num_threads()
    with linalg.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == previous
    with pytest.raises(RuntimeError):
        with linalg.cpu_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == previous
