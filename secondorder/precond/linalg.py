"""Pure linear algebra shared by every preconditioner.

Plain functions over tensors; nothing here keeps state or imports ``torch.distributed``.
Each function is tested against ``torch.linalg`` / ``torch.kron`` in float64
(``tests/precond/test_linalg.py``).

Failure policy: functions that can fail numerically raise :class:`EigenFailure` (a
``RuntimeError``); the *caller* keeps its last good result, counts the failure and warns with
:class:`NumericalWarning`. Nothing here writes files or stops training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor


class NumericalWarning(RuntimeWarning):
    """Warned when a numerical failure was survived (last good preconditioner kept)."""


class EigenFailure(RuntimeError):
    """An eigendecomposition (or a root built from it) failed or was not finite."""


def symmetrize(matrix: Tensor) -> Tensor:
    """Return ``(M + Mᵀ) / 2`` over the last two dims. Shape ``(..., n, n)`` kept."""
    return (matrix + matrix.transpose(-1, -2)) / 2


def stable_eigh(matrix: Tensor, *, retry_float64: bool = True) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition that survives what LAPACK does not.

    Args:
        matrix: ``(..., n, n)``, symmetric up to rounding (it is symmetrised first).
        retry_float64: when ``eigh`` raises in a lower precision, retry in float64 and cast
            the result back.

    Returns:
        ``(eigenvalues (..., n) ascending, eigenvectors (..., n, n))`` in ``matrix.dtype``
        (bf16/fp16 inputs are computed in float32 and cast back).

    Raises:
        EigenFailure: the input is not finite, or eigh failed in float64 too, or the result
            is not finite.
    """
    if not torch.isfinite(matrix).all():
        raise EigenFailure("matrix has non-finite entries")
    dtype = matrix.dtype
    work = symmetrize(matrix.float() if dtype in (torch.bfloat16, torch.float16) else matrix)
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(work)
    except RuntimeError as error:
        if not retry_float64 or work.dtype == torch.float64:
            raise EigenFailure(f"eigh failed: {error}") from error
        try:
            eigenvalues, eigenvectors = torch.linalg.eigh(work.double())
        except RuntimeError as error64:
            raise EigenFailure(f"eigh failed in float64 too: {error64}") from error64
    if not (torch.isfinite(eigenvalues).all() and torch.isfinite(eigenvectors).all()):
        raise EigenFailure("eigh returned non-finite values")
    return eigenvalues.to(dtype), eigenvectors.to(dtype)


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` (None: leave as is), then restore.

    Multi-threaded LAPACK ``eigh`` collapses (100x and worse) on small shared CPU machines
    as soon as another process holds a core, while one thread degrades gracefully
    (reference/pytorch_conventions.md, appendix), so amortised eigendecompositions default
    to one thread. Only CPU work is affected.
    """
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def batched_eigh(matrices: Sequence[Tensor], *, num_threads: int | None = 1) -> list[tuple[Tensor, Tensor] | None]:
    """Eigendecompose many symmetric matrices, one ``eigh`` call per (shape, dtype, device).

    Same-shape matrices are stacked into one batched call (LAPACK loops inside C++ instead of
    Python). If a stacked call fails, its members are retried one by one, so one bad matrix
    cannot take the others down.

    Args:
        matrices: ``n_i x n_i`` matrices.
        num_threads: CPU threads for the decompositions (see :func:`cpu_threads`).

    Returns:
        One entry per input: ``(eigenvalues (n_i,), eigenvectors (n_i, n_i))``, or ``None``
        where that matrix failed (see :func:`stable_eigh`).
    """
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(matrices)
    groups: dict[tuple, list[int]] = {}
    for index, matrix in enumerate(matrices):
        groups.setdefault((tuple(matrix.shape), matrix.dtype, matrix.device), []).append(index)
    with cpu_threads(num_threads if any(m.device.type == "cpu" for m in matrices) else None):
        for indices in groups.values():
            _eigh_group(matrices, indices, results)
    return results


def _eigh_group(matrices: Sequence[Tensor], indices: list[int], results: list) -> None:
    """One stacked ``eigh`` for same-shape ``matrices[indices]``; failures retried one by one."""
    if len(indices) == 1:
        try:
            results[indices[0]] = stable_eigh(matrices[indices[0]])
        except EigenFailure:
            results[indices[0]] = None
        return
    try:
        values, vectors = stable_eigh(torch.stack([matrices[i] for i in indices]))
        for position, index in enumerate(indices):
            results[index] = (values[position], vectors[position])
    except EigenFailure:
        for index in indices:
            _eigh_group(matrices, [index], results)


def shifted_eigenvalues(eigenvalues: Tensor, epsilon: float) -> Tensor:
    """Regularise eigenvalues of ``F + εI`` the way distributed_shampoo does.

    ``eigenvalues`` are those of ``F + εI`` (shape ``(..., n)``). If the smallest is below
    ``ε`` (F is not PSD in floating point), the spectrum is shifted to ``λ − λ_min + ε`` so
    every eigenvalue is at least ``ε``.
    """
    smallest = eigenvalues.min(dim=-1, keepdim=True).values
    return torch.where(smallest < epsilon, eigenvalues - smallest + epsilon, eigenvalues)


def inverse_root_from_eigh(eigenvalues: Tensor, eigenvectors: Tensor, exponent: float) -> Tensor:
    """``Q · diag(μ^(−exponent)) · Qᵀ``.

    Args:
        eigenvalues: ``(..., n)``, all positive (regularise first, e.g. :func:`shifted_eigenvalues`).
        eigenvectors: ``(..., n, n)``, columns are eigenvectors.
        exponent: the root power ``e`` (e.g. 1/4 for Shampoo's matrix blocks, 1 for an inverse).

    Returns:
        ``(..., n, n)`` symmetric matrix ``F^(−e)``.

    Raises:
        EigenFailure: the root is not finite.
    """
    scaled = eigenvectors * eigenvalues.pow(-exponent).unsqueeze(-2)
    root = scaled @ eigenvectors.transpose(-1, -2)
    if not torch.isfinite(root).all():
        raise EigenFailure("inverse root is not finite")
    return root


def matrix_inverse_root(matrix: Tensor, exponent: float, epsilon: float) -> Tensor:
    """``(M + εI)^(−exponent)`` with distributed_shampoo's shift-to-ε rule.

    Args:
        matrix: ``(..., n, n)`` symmetric PSD (up to rounding).
        exponent: root power ``e > 0``.
        epsilon: added to the diagonal before the eigendecomposition; eigenvalues below it
            are shifted up (see :func:`shifted_eigenvalues`).

    Returns:
        ``(..., n, n)``.
    """
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    eigenvalues, eigenvectors = stable_eigh(matrix + epsilon * identity)
    return inverse_root_from_eigh(shifted_eigenvalues(eigenvalues, epsilon), eigenvectors, exponent)


def damped_inverse(eigenvalues: Tensor, eigenvectors: Tensor, damping: float) -> Tensor:
    """``(F + λI)⁻¹`` from the eigenpairs of ``F``; shapes ``(..., n)``, ``(..., n, n)`` → ``(..., n, n)``.

    Negative eigenvalues from rounding are clamped at 0 before damping.
    """
    return inverse_root_from_eigh(eigenvalues.clamp(min=0) + damping, eigenvectors, 1.0)


def mode_product(tensor: Tensor, matrix: Tensor, dim: int) -> Tensor:
    """Contract dim ``dim`` of ``tensor`` with dim 0 of ``matrix``; the result stays at ``dim``.

    For a matrix ``G``: ``mode_product(G, A, 0) = Aᵀ G`` and ``mode_product(G, B, 1) = G B``.

    Args:
        tensor: ``(d_0, ..., d_k, ..., d_{o-1})``.
        matrix: ``(d_k, m)``.

    Returns:
        ``(d_0, ..., m, ..., d_{o-1})``.
    """
    moved = torch.tensordot(tensor, matrix, dims=([dim], [0]))  # contracted dim goes last
    return moved.movedim(-1, dim)


def apply_kronecker(tensor: Tensor, matrices: Sequence[Tensor | None]) -> Tensor:
    """Apply one matrix per dimension without forming the Kronecker product.

    Computes ``tensor ×₀ M₀ ×₁ M₁ … `` (see :func:`mode_product`); ``None`` entries leave that
    dimension untouched. For a matrix ``G`` and symmetric ``L, R`` this is ``L G R``; for
    eigenbases ``apply_kronecker(G, [Q_L, Q_R]) = Q_Lᵀ G Q_R``.

    Equivalently, on the row-major flattening ``vec(G)``: ``(M₀ᵀ ⊗ M₁ᵀ ⊗ …) vec(G)``.

    Args:
        tensor: order-``o`` tensor ``(d_0, …, d_{o-1})``.
        matrices: ``o`` entries, each ``(d_k, m_k)`` or ``None``.

    Returns:
        ``(m_0, …, m_{o-1})`` (``d_k`` where the entry is ``None``).
    """
    if len(matrices) != tensor.dim():
        raise ValueError(f"Invalid matrices: {len(matrices)} given for a tensor of order {tensor.dim()}")
    if tensor.dim() == 2 and all(m is not None for m in matrices):
        return matrices[0].transpose(0, 1) @ tensor @ matrices[1]
    for dim, matrix in enumerate(matrices):
        if matrix is not None:
            tensor = mode_product(tensor, matrix, dim)
    return tensor


def cholesky_solve_with_jitter(
    matrix: Tensor, rhs: Tensor, *, initial_jitter: float = 0.0, max_tries: int = 8
) -> Tensor:
    """Solve ``M X = B`` for symmetric positive (semi)definite ``M`` by Cholesky.

    If the factorisation fails, ``jitter·I`` is added, starting at ``initial_jitter`` (or
    ``1e-10 · mean(diag M)`` when that is 0) and growing ×10 per try.

    Args:
        matrix: ``(..., n, n)``.
        rhs: ``(..., n, k)`` or ``(..., n)``.

    Returns:
        ``X`` with the shape of ``rhs``.

    Raises:
        EigenFailure: no jitter within ``max_tries`` made ``M`` factorisable.
    """
    vector_rhs = rhs.dim() == matrix.dim() - 1
    rhs_matrix = rhs.unsqueeze(-1) if vector_rhs else rhs
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().mean().item() or 1.0
    jitter = initial_jitter
    for _ in range(max_tries + 1):
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * identity if jitter else matrix)
        if not bool(info.any()):
            solution = torch.cholesky_solve(rhs_matrix, factor)
            return solution.squeeze(-1) if vector_rhs else solution
        jitter = jitter * 10 if jitter else 1e-10 * scale
    raise EigenFailure(f"Cholesky failed even with jitter {jitter / 10:.3g}")


def randomized_low_rank(
    operator: Tensor | Callable[[Tensor], Tensor],
    rank: int,
    *,
    size: int | None = None,
    oversample: int = 10,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

    Args:
        operator: an ``(m, n)`` matrix, or a function ``X (n, k) -> A X (m, k)`` for a
            *symmetric* ``n x n`` operator (then ``size`` = n is required).
        rank: number of singular triplets ``r`` to return.
        oversample: extra random directions for accuracy.
        power_iterations: subspace iterations (each sharpens a slowly decaying spectrum).

    Returns:
        ``(U (m, r), S (r,), V (n, r))`` with ``A ≈ U diag(S) Vᵀ``.
    """
    if rank < 1:
        raise ValueError(f"Invalid rank: {rank} (must be >= 1)")
    if callable(operator) and not isinstance(operator, Tensor):
        if size is None:
            raise ValueError("Invalid size: required when operator is a function")
        apply, apply_t, n = operator, operator, size
        work_dtype = dtype or torch.get_default_dtype()
        device = None
    else:
        matrix = operator
        apply, apply_t, n = (lambda x: matrix @ x), (lambda x: matrix.transpose(0, 1) @ x), matrix.shape[1]
        work_dtype, device = matrix.dtype, matrix.device
    k = min(rank + oversample, n)
    probe = torch.randn(n, k, generator=generator, dtype=work_dtype, device=device)
    basis, _ = torch.linalg.qr(apply(probe))
    for _ in range(power_iterations):
        basis, _ = torch.linalg.qr(apply_t(basis))
        basis, _ = torch.linalg.qr(apply(basis))
    small = apply_t(basis).transpose(0, 1)  # (k, n) = Qᵀ A
    u_small, singular, vh = torch.linalg.svd(small, full_matrices=False)
    return (basis @ u_small)[:, :rank], singular[:rank], vh[:rank].transpose(0, 1)


def bias_correction(beta: float, step: int | float) -> float:
    """``1 − β^t`` (1 when ``β`` is 0 or 1, where no correction applies)."""
    if beta in (0.0, 1.0):
        return 1.0
    return 1.0 - math.pow(beta, step)
