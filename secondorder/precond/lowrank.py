"""Damped Gauss-Newton solves in the batch dimension (and their parameter-space twin).

Notation (reference/gauss_newton.md §2): a mini-batch of ``b`` examples with ``c`` outputs each;
``J ∈ ℝ^{bc×p}`` the Jacobian of the stacked outputs (rows ordered example-major: row
``n·c + k`` is output ``k`` of example ``n``); ``K = J Jᵀ ∈ ℝ^{bc×bc}`` its Gram matrix;
``Q = blkdiag(Q_1, …, Q_b)`` the Hessian of the per-example loss with respect to the outputs
(``c × c`` PSD blocks); ``g_f ∈ ℝ^{bc}`` the output gradients; ``λ > 0`` the damping.

The Levenberg-Marquardt direction on the mean loss ``L = (1/b) Σ ℓ_n`` is
``d = −(JᵀQJ/b + λI_p)⁻¹ ∇L`` with ``∇L = Jᵀg_f/b``. The push-through (Duncan-Guttman)
identity ``(JᵀQJ + bλI)⁻¹Jᵀ = Jᵀ(QJJᵀ + bλI)⁻¹`` turns it into

    x = (Q K + bλ I_{bc})⁻¹ g_f ,     d = −Jᵀ x                      (Korbit et al. 2024, eq. 7)

so only a ``bc × bc`` system is solved. ``QK`` is not symmetric; :func:`damped_batch_solve`
solves it through the symmetric positive definite ``M = S K S + bλI`` with ``S = Q^{1/2}``
(Cholesky, jitter if needed; LU on ``QK + bλI`` as the last resort). Singular ``Q`` (softmax
blocks have rank ``c − 1``; saturated sigmoids underflow to 0) is handled exactly by splitting
``g_f`` into its part in ``range(Q)`` and its part in ``null(Q)`` (see the function).

:func:`woodbury_solve` is the general ``(D + U Uᵀ)⁻¹ v`` (influence queries reuse it) and
:func:`damped_parameter_solve` the ``p × p`` solve used when ``p < bc``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secondorder.precond.linalg import EigenFailure, cholesky_solve_with_jitter

__all__ = [
    "OutputHessianRoot",
    "output_hessian_root",
    "apply_output_blocks",
    "damped_batch_solve",
    "damped_parameter_solve",
    "woodbury_solve",
]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (LAPACK has no bf16/fp16 Cholesky), else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def apply_output_blocks(blocks: Tensor, vectors: Tensor) -> Tensor:
    """Multiply each example's ``c``-vector by its block: ``out[n] = B_n v[n]``.

    Args:
        blocks: ``(b, c)`` (diagonal blocks) or ``(b, c, c)`` (dense blocks).
        vectors: ``(b, c)`` or ``(b, c, k)`` (``k`` vectors per example).

    Returns:
        The shape of ``vectors``.
    """
    if blocks.dim() == 2:
        return blocks * vectors if vectors.dim() == 2 else blocks.unsqueeze(-1) * vectors
    if vectors.dim() == 2:
        return (blocks @ vectors.unsqueeze(-1)).squeeze(-1)
    return blocks @ vectors


class OutputHessianRoot:
    """``S = Q^{1/2}``, its pseudo-inverse ``S⁺`` and the projector ``I − SS⁺`` onto ``null(Q)``.

    All three are stored per example as ``(b, c)`` diagonals when ``Q`` is diagonal, else as
    ``(b, c, c)`` blocks. Build with :func:`output_hessian_root`.
    """

    def __init__(self, root: Tensor, pseudo_inverse: Tensor, null_projector: Tensor) -> None:
        self.root = root
        self.pseudo_inverse = pseudo_inverse
        self.null_projector = null_projector

    @property
    def singular(self) -> bool:
        """Whether some block has a (numerically) zero eigenvalue."""
        return bool(self.null_projector.abs().max() > 0) if self.null_projector.numel() else False

    def scale_gram(self, gram: Tensor) -> Tensor:
        """``S K S`` for ``K`` of shape ``(bc, bc)`` (example-major rows); returns ``(bc, bc)``."""
        b, c = self.root.shape[0], self.root.shape[1]
        blocks = gram.reshape(b, c, b, c)
        if self.root.dim() == 2:
            scaled = blocks * self.root.reshape(b, c, 1, 1) * self.root.reshape(1, 1, b, c)
        else:
            left = torch.bmm(self.root, gram.reshape(b, c, b * c))  # rows: S_i K_i·
            right = torch.bmm(
                left.reshape(b * c, b, c).transpose(0, 1), self.root
            )  # columns: ·S_j (symmetric)
            scaled = right.transpose(0, 1)
        return scaled.reshape(b * c, b * c)


def output_hessian_root(hessian: Tensor, *, rtol: float | None = None) -> OutputHessianRoot:
    """Square root of the block-diagonal output Hessian ``Q`` (PSD blocks).

    Eigenvalues at or below ``rtol · max_n ‖Q_n‖`` (default ``c · 10 · eps(dtype)``, relative
    to the largest eigenvalue of the whole batch) count as zero; negative rounding is clamped.

    Args:
        hessian: ``(b, c)`` diagonal blocks (MSE, sigmoid BCE) or ``(b, c, c)`` symmetric PSD
            blocks (softmax cross-entropy, user losses).

    Returns:
        :class:`OutputHessianRoot` in the work dtype (float32 for half inputs).

    Raises:
        EigenFailure: ``hessian`` is not finite.
    """
    hessian = hessian.to(_work_dtype(hessian.dtype))
    if not torch.isfinite(hessian).all():
        raise EigenFailure("non-finite output Hessian")
    if hessian.dim() not in (2, 3) or (hessian.dim() == 3 and hessian.shape[1] != hessian.shape[2]):
        raise ValueError(
            f"Invalid hessian: expected (b, c) or (b, c, c), got {tuple(hessian.shape)}"
        )
    c = hessian.shape[1]
    if rtol is None:
        rtol = 10.0 * c * torch.finfo(hessian.dtype).eps
    if hessian.dim() == 2:
        values = hessian.clamp(min=0)
        keep = values > rtol * values.max().clamp(min=torch.finfo(values.dtype).tiny)
        root = values.sqrt()
        inverse = torch.where(
            keep, 1.0 / torch.where(keep, root, torch.ones_like(root)), torch.zeros_like(root)
        )
        return OutputHessianRoot(root, inverse, (~keep).to(values.dtype))
    # c × c blocks are cheap: decompose in float64, where float32 denormals (saturated softmax
    # probabilities) are normal numbers; LAPACK's float32 eigh returns NaN on them.
    work = hessian.double()
    eigenvalues, eigenvectors = torch.linalg.eigh((work + work.transpose(-1, -2)) / 2)
    if not (torch.isfinite(eigenvalues).all() and torch.isfinite(eigenvectors).all()):
        raise EigenFailure("eigh of the output Hessian blocks is not finite")
    eigenvalues = eigenvalues.clamp(min=0)
    keep = eigenvalues > rtol * eigenvalues.max().clamp(min=torch.finfo(eigenvalues.dtype).tiny)
    root_values = torch.where(keep, eigenvalues.sqrt(), torch.zeros_like(eigenvalues))
    inverse_values = torch.where(
        keep, 1.0 / torch.where(keep, root_values, torch.ones_like(root_values)), 0.0
    )

    def assemble(values: Tensor) -> Tensor:
        return ((eigenvectors * values.unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)).to(
            hessian.dtype
        )

    return OutputHessianRoot(
        assemble(root_values), assemble(inverse_values), assemble((~keep).to(eigenvalues.dtype))
    )


def damped_batch_solve(
    gram: Tensor,
    hessian: Tensor | OutputHessianRoot,
    rhs: Tensor,
    shift: float,
    *,
    method: str = "cholesky",
) -> Tensor:
    """Solve ``(Q K + μ I) x = g`` in the batch dimension (Korbit et al. 2024; module docstring).

    With ``S = Q^{1/2}``, ``Π = SS⁺`` and ``r = (I − Π) g`` (the part of ``g`` that ``Q``
    cannot see), the exact solution is

        x = S M⁻¹ (S⁺ g − S K r / μ) + r / μ ,      M = S K S + μ I   (SPD),

    because ``(QK + μI) S M⁻¹ S⁺ g = S S⁺ g = Π g`` and, by the push-through identity,
    ``(μI + S·SK)⁻¹ = (I − S M⁻¹ S K)/μ``. ``r`` is orthogonal to ``range(S)``, so nothing
    cancels when ``μ`` is tiny. For positive definite ``Q`` (MSE, BCE) ``r = 0``.

    Args:
        gram: ``K = J Jᵀ``, ``(bc, bc)`` symmetric PSD, example-major.
        hessian: ``Q`` as ``(b, c)`` / ``(b, c, c)`` blocks, or its :func:`output_hessian_root`.
        rhs: ``g_f``, ``(b, c)``.
        shift: ``μ = b·λ > 0``.
        method: ``"cholesky"`` (the SPD form; falls back to LU if Cholesky fails even with
            jitter) or ``"lu"`` (``torch.linalg.solve`` on ``QK + μI`` directly).

    Returns:
        ``x`` of shape ``(b, c)`` in ``rhs.dtype``.

    Raises:
        EigenFailure: the system could not be solved (non-finite input or singular LU).
    """
    if shift <= 0:
        raise ValueError(f"Invalid shift: {shift} (must be > 0: the damping λ has to be positive)")
    if method not in ("cholesky", "lu"):
        raise ValueError(f"Invalid method: {method!r} (expected 'cholesky' or 'lu')")
    b, c = rhs.shape
    if gram.shape != (b * c, b * c):
        raise ValueError(f"Invalid gram: expected {(b * c, b * c)}, got {tuple(gram.shape)}")
    dtype = _work_dtype(rhs.dtype)
    gram, rhs_work = gram.to(dtype), rhs.to(dtype)
    if not (torch.isfinite(gram).all() and torch.isfinite(rhs_work).all()):
        raise EigenFailure("non-finite Gram matrix or right-hand side")
    root = hessian if isinstance(hessian, OutputHessianRoot) else output_hessian_root(hessian)
    if method == "cholesky":
        try:
            null_part = apply_output_blocks(root.null_projector, rhs_work) / shift  # r / μ, (b, c)
            projected = apply_output_blocks(root.pseudo_inverse, rhs_work)  # S⁺ g
            if root.singular:
                k_null = (gram @ null_part.reshape(-1)).reshape(b, c)
                projected = projected - apply_output_blocks(root.root, k_null)
            system = root.scale_gram(gram)
            system = system + shift * torch.eye(b * c, dtype=dtype, device=rhs.device)
            y = cholesky_solve_with_jitter(system, projected.reshape(-1))
            x = apply_output_blocks(root.root, y.reshape(b, c)) + null_part
            if torch.isfinite(x).all():
                return x.to(rhs.dtype)
        except EigenFailure:
            pass
    return _lu_batch_solve(gram, root, rhs_work, shift).to(rhs.dtype)


def _lu_batch_solve(gram: Tensor, root: OutputHessianRoot, rhs: Tensor, shift: float) -> Tensor:
    """``(QK + μI)⁻¹ g`` by LU (``Q = S S`` from the root); shapes as :func:`damped_batch_solve`."""
    b, c = rhs.shape
    q_times_k = apply_output_blocks(
        root.root, apply_output_blocks(root.root, gram.reshape(b, c, b * c))
    )
    system = q_times_k.reshape(b * c, b * c) + shift * torch.eye(
        b * c, dtype=gram.dtype, device=gram.device
    )
    solution, info = torch.linalg.solve_ex(system, rhs.reshape(-1))
    if bool(info.any()) or not torch.isfinite(solution).all():
        raise EigenFailure("LU solve of the damped batch system failed")
    return solution.reshape(b, c)


def damped_parameter_solve(
    jacobian: Tensor,
    hessian: Tensor | OutputHessianRoot,
    rhs: Tensor,
    damping: float,
    batch_size: int,
) -> Tensor:
    """Solve ``(JᵀQJ / b + λ I_p) z = v`` in parameter space (the ``p < bc`` case).

    Gives the same direction as :func:`damped_batch_solve` (``d = −z`` with ``v = ∇L``) at
    ``O(p³ + bcp²)`` instead of ``O((bc)³ + (bc)²p)``.

    Args:
        jacobian: ``J``, ``(bc, p)``, example-major rows.
        hessian: ``Q`` as ``(b, c)`` / ``(b, c, c)`` blocks, or its root.
        rhs: ``v``, ``(p,)``.
        damping: ``λ > 0``.
        batch_size: ``b``.

    Returns:
        ``z``, ``(p,)`` in ``rhs.dtype``.

    Raises:
        EigenFailure: Cholesky (with jitter) and LU both failed.
    """
    if damping <= 0:
        raise ValueError(f"Invalid damping: {damping} (must be > 0)")
    dtype = _work_dtype(rhs.dtype)
    root = hessian if isinstance(hessian, OutputHessianRoot) else output_hessian_root(hessian)
    b = batch_size
    c = jacobian.shape[0] // b
    scaled = apply_output_blocks(root.root, jacobian.to(dtype).reshape(b, c, -1)).reshape(
        b * c, -1
    )  # S J
    system = scaled.transpose(0, 1) @ scaled / b
    system = system + damping * torch.eye(system.shape[0], dtype=dtype, device=rhs.device)
    rhs_work = rhs.to(dtype)
    if not (torch.isfinite(system).all() and torch.isfinite(rhs_work).all()):
        raise EigenFailure("non-finite Gauss-Newton matrix or right-hand side")
    try:
        return cholesky_solve_with_jitter(system, rhs_work).to(rhs.dtype)
    except EigenFailure:
        solution, info = torch.linalg.solve_ex(system, rhs_work)
        if bool(info.any()) or not torch.isfinite(solution).all():
            raise EigenFailure("LU solve of the damped Gauss-Newton system failed") from None
        return solution.to(rhs.dtype)


def woodbury_solve(diagonal: Tensor | float, factor: Tensor, rhs: Tensor) -> Tensor:
    """``(D + U Uᵀ)⁻¹ v`` by the Woodbury identity, with ``D`` diagonal positive.

    ``(D + UUᵀ)⁻¹ = D⁻¹ − D⁻¹U (I_r + UᵀD⁻¹U)⁻¹ UᵀD⁻¹``: one ``r × r`` SPD solve
    (Cholesky with jitter) instead of an ``n × n`` one.

    Args:
        diagonal: ``D`` as a positive scalar or an ``(n,)`` tensor of positive entries.
        factor: ``U``, ``(n, r)``.
        rhs: ``v``, ``(n,)`` or ``(n, k)``.

    Returns:
        The shape of ``rhs``.

    Raises:
        EigenFailure: the inner ``r × r`` system could not be factorised.
    """
    diag = torch.as_tensor(diagonal, dtype=factor.dtype, device=factor.device)
    if bool((diag <= 0).any()):
        raise ValueError("Invalid diagonal: every entry must be > 0")
    vector_rhs = rhs.dim() == 1
    rhs_matrix = rhs.unsqueeze(-1) if vector_rhs else rhs
    inv_diag = (1.0 / diag).reshape(-1, 1) if diag.dim() else 1.0 / diag
    scaled_factor = inv_diag * factor  # D⁻¹U, (n, r)
    scaled_rhs = inv_diag * rhs_matrix  # D⁻¹v, (n, k)
    inner = factor.transpose(0, 1) @ scaled_factor
    inner = inner + torch.eye(inner.shape[0], dtype=inner.dtype, device=inner.device)
    correction = cholesky_solve_with_jitter(inner, factor.transpose(0, 1) @ scaled_rhs)
    result = scaled_rhs - scaled_factor @ correction
    return result.squeeze(-1) if vector_rhs else result
