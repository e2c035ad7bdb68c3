"""Cheap amortised refreshes (warm-started QR bases, coupled Newton roots) against eigh in float64."""

import math

import pytest
import torch

from secondorder.precond import kronecker
from secondorder.precond.kronecker import KroneckerFactors, compute_inverses
from secondorder.precond.linalg import EigenFailure, coupled_newton_inverse_root, warm_started_eigenbasis


def random_spd(n, *, condition=10.0, seed=0, rank=None):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    spectrum = torch.logspace(0, -math.log10(condition), n, dtype=torch.float64)
    if rank is not None:
        spectrum[rank:] = 0
    return (q * spectrum) @ q.T


def reference_power(matrix, power):
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.pow(power)) @ vectors.T


def subspace_error(basis, reference, size):
    """‖P − P_ref‖ of the projectors on the top-``size`` columns (descending order)."""
    top, ref = basis[:, :size], reference[:, :size]
    return float(torch.linalg.matrix_norm(top @ top.T - ref @ ref.T))


# ----- warm_started_eigenbasis ------------------------------------------------------------

def test_exact_eigenbasis_is_a_fixed_point_in_descending_order():
    matrix = random_spd(9, condition=1e3)
    values, vectors = torch.linalg.eigh(matrix)  # ascending
    estimates, basis, order = warm_started_eigenbasis(matrix, vectors)
    torch.testing.assert_close(estimates, values.flip(0), atol=1e-12, rtol=1e-12)
    assert order.tolist() == list(range(8, -1, -1))
    # Same columns up to sign, now in descending order.
    torch.testing.assert_close((basis * vectors.flip(1)).sum(0).abs(), torch.ones(9, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_repeated_steps_converge_to_the_eigh_basis():
    matrix = random_spd(12, condition=1e2, seed=1)
    reference = torch.linalg.eigh(matrix).eigenvectors.flip(1)
    basis = torch.linalg.qr(reference + 0.2 * torch.randn(12, 12, generator=torch.Generator().manual_seed(2),
                                                          dtype=torch.float64)).Q
    errors = []
    for _ in range(60):
        _, basis, _ = warm_started_eigenbasis(matrix, basis)
        errors.append(subspace_error(basis, reference, 4))
    assert errors[-1] < 1e-8 and errors[-1] < errors[0], errors[::10]
    torch.testing.assert_close(basis.T @ basis, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)


def test_rank_deficient_factor_gives_an_orthogonal_basis_and_non_finite_raises():
    matrix = random_spd(8, rank=3)
    _, basis, _ = warm_started_eigenbasis(matrix, torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(basis.T @ basis, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    matrix[2, 5] = matrix[5, 2] = float("nan")
    with pytest.raises(EigenFailure):
        warm_started_eigenbasis(matrix, basis)


# ----- coupled_newton_inverse_root --------------------------------------------------------

@pytest.mark.parametrize("root", [1, 2, 4])
@pytest.mark.parametrize("condition", [1.0, 1e2, 1e5])
def test_coupled_newton_matches_eigh_root(root, condition):
    matrix = random_spd(10, condition=condition, seed=root)
    result, residual = coupled_newton_inverse_root(matrix, root, tolerance=1e-12)
    assert residual < 1e-10
    expected = reference_power(matrix, -1.0 / root)
    torch.testing.assert_close(result, expected, atol=1e-9 * float(expected.abs().max()), rtol=0)


def test_coupled_newton_batched_and_non_finite():
    matrices = torch.stack([random_spd(6, condition=10.0, seed=s) for s in range(3)])
    result, _ = coupled_newton_inverse_root(matrices, 4, tolerance=1e-12)
    for matrix, root in zip(matrices, result):
        torch.testing.assert_close(root, reference_power(matrix, -0.25), atol=1e-10, rtol=0)
    bad = matrices[0].clone()
    bad[0, 0] = float("nan")
    _, residual = coupled_newton_inverse_root(bad, 4)
    assert math.isnan(residual)
    with pytest.raises(ValueError, match="Invalid root"):
        coupled_newton_inverse_root(matrices[0], 0)


# ----- KroneckerFactors with the cheap refreshes ------------------------------------------

def accumulate(strategy, shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = strategy.init_state(torch.zeros(shape, dtype=torch.float64))
    grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]
    for t, grad in enumerate(grads, start=1):
        strategy.update_stats(state, grad, t)
        if strategy.eigenvalue_corrected:
            strategy.update_correction(state, grad)
    return state, grads


def soap(method):
    return KroneckerFactors((0.5, 0.5), beta2=0.95, epsilon=1e-8, eigenvalue_corrected=True,
                            factor_dtype=torch.float64, refresh_method=method)


def test_qr_refresh_permutes_the_correction_with_the_basis():
    # From an exact (ascending) eigh basis, a QR refresh only reverses the columns: the
    # preconditioner must not change, which holds only if Λ is permuted with them.
    strategy = soap("qr")
    state, grads = accumulate(strategy, (6, 4), 12)
    compute_inverses([(strategy, state)], 12, initial=True)
    before = strategy.precondition(state, grads[-1], 12)
    corrected = state["corrected"].clone()
    assert compute_inverses([(strategy, state)], 12) == [True]
    torch.testing.assert_close(state["corrected"], corrected.flip(0).flip(1), atol=0, rtol=0)
    torch.testing.assert_close(strategy.precondition(state, grads[-1], 12), before, atol=1e-10, rtol=1e-10)


def test_qr_refreshes_converge_to_the_eigh_basis_direction():
    eigh_strategy, qr_strategy = soap("eigh"), soap("qr")
    state_eigh, grads = accumulate(eigh_strategy, (5, 3), 20)
    state_qr, _ = accumulate(qr_strategy, (5, 3), 20)
    compute_inverses([(eigh_strategy, state_eigh)], 20)
    state_qr["basis_0"].copy_(torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64)).Q)
    for _ in range(200):
        compute_inverses([(qr_strategy, state_qr)], 20)
    for k in (0, 1):
        basis, reference = state_qr[f"basis_{k}"], state_eigh[f"basis_{k}"]
        overlap = (basis.T @ reference).abs()  # a signed permutation matrix when the spans agree
        torch.testing.assert_close(overlap.max(dim=1).values, torch.ones(basis.shape[0], dtype=torch.float64),
                                   atol=1e-8, rtol=0)


def test_first_refresh_uses_eigh(monkeypatch):
    strategy = soap("qr")
    state, _ = accumulate(strategy, (4, 3), 5)
    calls = []
    real = kronecker.warm_started_eigenbasis
    monkeypatch.setattr(kronecker, "warm_started_eigenbasis", lambda *a: calls.append(1) or real(*a))
    compute_inverses([(strategy, state)], 5, initial=True)
    assert calls == []
    compute_inverses([(strategy, state)], 5)
    assert len(calls) == 2


def test_newton_refresh_matches_eigh_roots():
    options = dict(beta2=0.999, epsilon=1e-10, factor_dtype=torch.float64)
    eigh_strategy = KroneckerFactors((0.25, 0.25), **options)
    newton_strategy = KroneckerFactors((0.25, 0.25), refresh_method="newton", **options)
    state_eigh, _ = accumulate(eigh_strategy, (6, 4), 15)
    state_newton, _ = accumulate(newton_strategy, (6, 4), 15)
    compute_inverses([(eigh_strategy, state_eigh)], 15)
    compute_inverses([(newton_strategy, state_newton)], 15)
    for k in (0, 1):
        torch.testing.assert_close(state_newton[f"root_{k}"], state_eigh[f"root_{k}"], atol=1e-8, rtol=1e-8)


def test_newton_falls_back_to_eigh_for_non_integer_roots_and_failures(monkeypatch):
    options = dict(beta2=0.999, epsilon=1e-10, factor_dtype=torch.float64)
    state_eigh, _ = accumulate(KroneckerFactors((0.3, 0.25), **options), (6, 4), 15)
    newton = KroneckerFactors((0.3, 0.25), refresh_method="newton", **options)
    state_newton, _ = accumulate(newton, (6, 4), 15)
    compute_inverses([(KroneckerFactors((0.3, 0.25), **options), state_eigh)], 15)
    monkeypatch.setattr(kronecker, "coupled_newton_inverse_root",
                        lambda matrix, root, **_: (matrix * math.nan, math.nan))
    assert compute_inverses([(newton, state_newton)], 15) == [True]
    for k in (0, 1):
        torch.testing.assert_close(state_newton[f"root_{k}"], state_eigh[f"root_{k}"], atol=1e-12, rtol=0)


def test_non_finite_factor_keeps_the_previous_basis_and_counts():
    strategy = soap("qr")
    state, _ = accumulate(strategy, (4, 3), 5)
    compute_inverses([(strategy, state)], 5, initial=True)
    basis, corrected = state["basis_0"].clone(), state["corrected"].clone()
    state["factor_0"][1, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="kept the previous basis_0"):
        assert compute_inverses([(strategy, state)], 5) == [False]
    torch.testing.assert_close(state["basis_0"], basis, atol=0, rtol=0)
    assert int(state["failed"]) == 1
    assert torch.isfinite(state["corrected"]).all() and state["corrected"].shape == corrected.shape


@pytest.mark.parametrize("method,corrected", [("qr", False), ("newton", True), ("lanczos", False)])
def test_invalid_refresh_method(method, corrected):
    with pytest.raises(ValueError, match="Invalid refresh_method"):
        KroneckerFactors((0.5,), beta2=0.9, epsilon=1e-8, eigenvalue_corrected=corrected, refresh_method=method)


# ----- sync-free skipping of non-finite blocks (keep masks) -------------------------------

def test_finite_or_zero_flags_and_cleans_without_touching_finite_tensors():
    from secondorder.precond.linalg import finite_or_zero

    good, nan, inf = torch.randn(3, 2), torch.randn(4), torch.randn(2, 2)
    nan[1], inf[0, 1] = float("nan"), float("-inf")
    cleaned, keep = finite_or_zero([good, nan, inf])
    assert keep.tolist() == [True, False, False]
    assert cleaned[0] is not None and torch.equal(cleaned[0], good)
    assert torch.equal(cleaned[1], torch.zeros(4)) and torch.equal(cleaned[2], torch.zeros(2, 2))
    plus_inf, empty = torch.randn(5), torch.empty(0)
    plus_inf[4] = float("inf")
    assert finite_or_zero([plus_inf, empty, good.bfloat16()])[1].tolist() == [False, True, True]
    # read_on_cpu: all finite -> the tensors themselves (no copies); otherwise as without it
    same, keep = finite_or_zero([good, empty], read_on_cpu=True)
    assert keep.tolist() == [True, True] and same[0] is good
    cleaned, keep = finite_or_zero([good, nan], read_on_cpu=True)
    assert keep.tolist() == [True, False] and cleaned[0] is not good and torch.equal(cleaned[1], torch.zeros(4))


@pytest.mark.parametrize("corrected,beta2,shape", [(False, 0.99, (5, 4)), (False, 1.0, (5, 4)), (True, 0.95, (5, 4)),
                                                   (False, 0.99, (3, 2, 4))])
def test_keep_mask_leaves_state_exactly_or_updates_it(corrected, beta2, shape):
    exponents = (0.5,) * len(shape) if corrected else (1 / (2 * len(shape)),) * len(shape)
    strategy = KroneckerFactors(exponents, beta2=beta2, epsilon=1e-8, eigenvalue_corrected=corrected,
                                factor_dtype=torch.float64)
    state, grads = accumulate(strategy, shape, 4)
    compute_inverses([(strategy, state)], 4, initial=True)
    reference = {key: value.clone() for key, value in state.items()}
    grad = torch.randn(shape, dtype=torch.float64)
    strategy.update_stats(state, torch.zeros(shape, dtype=torch.float64), 5, keep=torch.tensor(False))
    if corrected:
        strategy.update_correction(state, torch.zeros(shape, dtype=torch.float64), keep=torch.tensor(False))
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    strategy.update_stats(state, grad, 5, keep=torch.tensor(True))
    if corrected:
        strategy.update_correction(state, grad, keep=torch.tensor(True))
    plain_state = {key: value.clone() for key, value in reference.items()}
    strategy.update_stats(plain_state, grad, 5)
    if corrected:
        strategy.update_correction(plain_state, grad)
    for key in reference:
        torch.testing.assert_close(state[key], plain_state[key], atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "adagrad"])
def test_second_moments_keep_mask(kind):
    from secondorder.precond.diagonal import update_second_moments

    moments = [torch.rand(3, 2), torch.rand(4)]
    before = [m.clone() for m in moments]
    grads = [torch.randn(3, 2), torch.zeros(4)]
    update_second_moments(kind, moments, grads, 0.9, keep=torch.tensor([True, False]))
    assert torch.equal(moments[1], before[1])
    expected = [before[0].clone()]
    update_second_moments(kind, expected, grads[:1], 0.9)
    torch.testing.assert_close(moments[0], expected[0], atol=1e-7, rtol=1e-7)


# ----- packed factors ---------------------------------------------------------------------

def test_pack_upper_round_trip():
    from secondorder.precond.linalg import pack_upper, unpack_upper

    matrix = random_spd(7)
    matrix = (matrix + matrix.T) / 2  # exactly symmetric
    packed = pack_upper(matrix)
    assert packed.shape == (28,)
    torch.testing.assert_close(packed, matrix[torch.triu_indices(7, 7).unbind()], atol=0, rtol=0)
    torch.testing.assert_close(unpack_upper(packed), matrix, atol=0, rtol=0)


@pytest.mark.parametrize("options", [dict(), dict(refresh_method="newton"),
                                     dict(eigenvalue_correction=True), dict(eigenvalue_correction=True,
                                                                             refresh_method="qr")])
def test_packed_factors_give_the_same_steps_with_less_state(options):
    from torch import nn

    from secondorder import Shampoo

    results, sizes = [], []
    for packed in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(6, 5, dtype=torch.float64)),
                  nn.Parameter(torch.randn(4, 3, 2, dtype=torch.float64))]
        optimizer = Shampoo(params, lr=0.05, precondition_frequency=2, factor_dtype=torch.float64,
                            packed_factors=packed, **options)
        generator = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in params]))
        sizes.append(sum(v.numel() for state in optimizer.state.values() for block in state.values()
                         if isinstance(block, dict) for v in block.values()))
    # Newton's forward error grows with the factors' conditioning (1e6 here, the ridge), so
    # the packed factor's last-bit differences show at 1e-9; eigh's at 1e-14.
    tolerance = 1e-8 if options.get("refresh_method") == "newton" else 1e-12
    torch.testing.assert_close(results[1], results[0], atol=tolerance, rtol=tolerance)
    assert sizes[1] < sizes[0]
