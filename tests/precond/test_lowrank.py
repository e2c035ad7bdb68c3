"""Batch-space Gauss-Newton solves (secondorder.precond.lowrank) against dense float64 solves."""

import pytest
import torch
from torch.testing import assert_close

from secondorder.precond import lowrank
from secondorder.precond.linalg import EigenFailure
from secondorder.precond.lowrank import (
    apply_output_blocks,
    damped_batch_solve,
    damped_parameter_solve,
    output_hessian_root,
    woodbury_solve,
)

DTYPE = torch.float64


def dense_blocks(hessian: torch.Tensor) -> torch.Tensor:
    """Block-diagonal ``(bc, bc)`` matrix from ``(b, c)`` diagonals or ``(b, c, c)`` blocks."""
    blocks = torch.diag_embed(hessian) if hessian.dim() == 2 else hessian
    return torch.block_diag(*blocks)


def softmax_blocks(b: int, c: int, scale: float = 1.0) -> torch.Tensor:
    prob = torch.softmax(scale * torch.randn(b, c, dtype=DTYPE), dim=1)
    return torch.diag_embed(prob) - prob.unsqueeze(-1) * prob.unsqueeze(-2)


def low_rank_psd_blocks(b: int, c: int, rank: int) -> torch.Tensor:
    factor = torch.randn(b, c, rank, dtype=DTYPE)
    return factor @ factor.transpose(-1, -2)


def hessians(b: int, c: int) -> dict[str, torch.Tensor]:
    saturated = torch.rand(b, c, dtype=DTYPE) + 0.1
    saturated[0, 0] = 0.0  # a sigmoid that underflowed: Q has an exact zero
    return {
        "identity": torch.full((b, c), 2.0 / c, dtype=DTYPE),
        "diagonal": torch.rand(b, c, dtype=DTYPE) + 0.05,
        "diagonal_with_zero": saturated,
        "softmax": softmax_blocks(b, c),
        "softmax_peaked": softmax_blocks(b, c, scale=12.0),
        "psd_rank_deficient": low_rank_psd_blocks(b, c, max(1, c - 2)),
    }


@pytest.mark.parametrize("name", list(hessians(2, 3)))
def test_output_hessian_root_properties(name):
    q = hessians(5, 4)[name]
    root = output_hessian_root(q)
    dense_q = dense_blocks(q)
    s, s_pinv, null = (
        dense_blocks(t) for t in (root.root, root.pseudo_inverse, root.null_projector)
    )
    assert_close(s @ s, dense_q, atol=1e-12, rtol=0)
    assert_close(s, s.T)
    assert_close(s @ s_pinv @ s, s, atol=1e-12, rtol=0)
    projector = s @ s_pinv
    assert_close(projector + null, torch.eye(20, dtype=DTYPE), atol=1e-12, rtol=0)
    assert_close(null @ dense_q, torch.zeros_like(dense_q), atol=1e-12, rtol=0)
    assert root.singular == (name not in ("identity", "diagonal"))


@pytest.mark.parametrize("name", list(hessians(2, 3)))
@pytest.mark.parametrize("method", ["cholesky", "lu"])
@pytest.mark.parametrize("rows", [4, 40])  # K full rank (p > bc) and rank-deficient (p < bc)
def test_batch_solve_matches_dense(name, method, rows):
    b, c = 5, 4
    q = hessians(b, c)[name]
    jac = torch.randn(b * c, rows, dtype=DTYPE)
    gram = jac @ jac.T
    rhs = torch.randn(b, c, dtype=DTYPE)  # deliberately also outside range(Q)
    shift = 0.3
    x = damped_batch_solve(gram, q, rhs, shift, method=method)
    expected = torch.linalg.solve(
        dense_blocks(q) @ gram + shift * torch.eye(b * c, dtype=DTYPE), rhs.reshape(-1)
    )
    assert_close(x.reshape(-1), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["identity", "diagonal", "softmax"])
def test_batch_solve_tiny_shift_is_stable(name):
    """μ = 1e-10 with K well conditioned: the residual stays tiny (no cancellation)."""
    b, c = 4, 3
    q = hessians(b, c)[name]
    jac = torch.randn(b * c, 50, dtype=DTYPE)
    gram = jac @ jac.T
    rhs = apply_output_blocks(q, torch.randn(b, c, dtype=DTYPE))  # inside range(Q)
    shift = 1e-10
    x = damped_batch_solve(gram, q, rhs, shift)
    residual = apply_output_blocks(q, (gram @ x.reshape(-1)).reshape(b, c)) + shift * x - rhs
    assert residual.abs().max() < 1e-9 * rhs.abs().max()


def test_batch_solve_falls_back_to_lu(monkeypatch):
    b, c = 3, 2
    q = hessians(b, c)["softmax"]
    jac = torch.randn(b * c, 9, dtype=DTYPE)
    gram, rhs = jac @ jac.T, torch.randn(b, c, dtype=DTYPE)
    expected = damped_batch_solve(gram, q, rhs, 0.5)

    def broken(*args, **kwargs):
        raise EigenFailure("forced")

    monkeypatch.setattr(lowrank, "cholesky_solve_with_jitter", broken)
    assert_close(damped_batch_solve(gram, q, rhs, 0.5), expected, atol=1e-12, rtol=1e-12)


def test_batch_solve_refuses_bad_input():
    gram = torch.eye(6, dtype=DTYPE)
    q = torch.ones(3, 2, dtype=DTYPE)
    rhs = torch.ones(3, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="shift"):
        damped_batch_solve(gram, q, rhs, 0.0)
    with pytest.raises(ValueError, match="gram"):
        damped_batch_solve(torch.eye(5, dtype=DTYPE), q, rhs, 1.0)
    with pytest.raises(ValueError, match="method"):
        damped_batch_solve(gram, q, rhs, 1.0, method="qr")
    with pytest.raises(EigenFailure):
        damped_batch_solve(gram * float("nan"), q, rhs, 1.0)


@pytest.mark.parametrize(
    "name", ["identity", "diagonal_with_zero", "softmax", "psd_rank_deficient"]
)
@pytest.mark.parametrize("params", [7, 60])  # p < bc and p > bc
def test_parameter_solve_matches_dense_and_batch_solve(name, params):
    """(JᵀQJ/b + λI)⁻¹Jᵀg/b = Jᵀ(QJJᵀ + bλI)⁻¹g/… : the push-through identity, both sizes."""
    b, c = 5, 3
    q = hessians(b, c)[name]
    jac = torch.randn(b * c, params, dtype=DTYPE)
    g = torch.randn(b, c, dtype=DTYPE)
    damping = 0.2
    gradient = jac.T @ g.reshape(-1) / b
    z = damped_parameter_solve(jac, q, gradient, damping, b)
    dense = jac.T @ dense_blocks(q) @ jac / b + damping * torch.eye(params, dtype=DTYPE)
    assert_close(z, torch.linalg.solve(dense, gradient), atol=1e-10, rtol=1e-10)
    x = damped_batch_solve(jac @ jac.T, q, g, b * damping)
    assert_close(jac.T @ x.reshape(-1), z, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("diagonal", ["scalar", "vector"])
@pytest.mark.parametrize("columns", [None, 3])
def test_woodbury_matches_dense(diagonal, columns):
    n, r = 12, 4
    factor = torch.randn(n, r, dtype=DTYPE)
    diag = 0.7 if diagonal == "scalar" else torch.rand(n, dtype=DTYPE) + 0.1
    rhs = torch.randn(n, dtype=DTYPE) if columns is None else torch.randn(n, columns, dtype=DTYPE)
    dense = torch.diag(torch.as_tensor(diag, dtype=DTYPE).expand(n)) + factor @ factor.T
    assert_close(
        woodbury_solve(diag, factor, rhs), torch.linalg.solve(dense, rhs), atol=1e-12, rtol=1e-12
    )


def test_woodbury_refuses_non_positive_diagonal():
    with pytest.raises(ValueError, match="diagonal"):
        woodbury_solve(
            torch.tensor([1.0, 0.0], dtype=DTYPE),
            torch.ones(2, 1, dtype=DTYPE),
            torch.ones(2, dtype=DTYPE),
        )


def test_apply_output_blocks_shapes():
    blocks = torch.randn(3, 2, 2, dtype=DTYPE)
    vectors = torch.randn(3, 2, dtype=DTYPE)
    assert_close(apply_output_blocks(blocks, vectors), torch.einsum("nij,nj->ni", blocks, vectors))
    many = torch.randn(3, 2, 4, dtype=DTYPE)
    assert_close(apply_output_blocks(blocks, many), blocks @ many)
    diag = torch.randn(3, 2, dtype=DTYPE)
    assert_close(apply_output_blocks(diag, many), diag.unsqueeze(-1) * many)


def test_saturated_softmax_block_in_float32_has_a_finite_root():
    """float32 LAPACK eigh gives NaN on denormals (p ≈ 1e-43): the root is taken in float64."""
    prob = torch.softmax(torch.tensor([[0.0, -99.0, -30.0, -5.0, 3.0]]), dim=1)
    assert 0 < prob[0, 1] < torch.finfo(torch.float32).tiny  # a denormal
    q = torch.diag_embed(prob) - prob.unsqueeze(-1) * prob.unsqueeze(-2)
    root = output_hessian_root(q)
    assert root.root.dtype == torch.float32 and torch.isfinite(root.root).all()
    assert_close(root.root @ root.root, q, atol=1e-7, rtol=0)
    with pytest.raises(EigenFailure):
        output_hessian_root(q * float("inf"))
