"""Shampoo's Kronecker factors: one factor per tensor dimension of a block.

For a block ``G`` of order ``o`` with dims ``d_0 … d_{o-1}`` (Gupta, Koren & Singer 2018,
"Shampoo: Preconditioned Stochastic Tensor Optimization"), each dim ``k`` keeps a factor

    F_k ← β₂ F_k + w · C_k(G),   C_k(G) = G_(k) G_(k)ᵀ  (G contracted with itself over all dims but k)

with ``w = 1 − β₂`` for an EMA (``w = 1`` when ``β₂ = 1``, the AdaGrad sum). Two ways to use them:

* **root-inverse** (classic Shampoo): ``R_k = (F_k / c₂ + εI)^(−e_k)`` every
  ``precondition_frequency`` steps, ``P(G) = G ×₀ R_0 ×₁ R_1 …`` (``R_L G R_R`` for a
  matrix). ``c₂ = 1 − β₂^t`` is the bias correction, ``e_k = 1/(2o)`` by default;
  eigenvalues below ε are shifted up (distributed_shampoo's rule, see
  :func:`~secondorder.precond.linalg.shifted_eigenvalues`).
* **eigenvalue-corrected** (EC-Shampoo / SOAP, Vyas et al. 2024; Eschenhagen et al. 2025):
  keep only the eigenbases ``Q_k`` of ``F_k / c₂ + εI`` and an EMA ``Λ`` of the squared
  rotated gradient; ``P(G) = Q ((Qᵀ G) / (sqrt(Λ / c₂) + ε))`` — Adam in Shampoo's eigenbasis.

State of one block (a plain dict; ``k`` runs over the dims that have a factor):

============== ===================== ==============================================
key            shape                  meaning
============== ===================== ==============================================
``factor_k``   ``(d_k, d_k)``         ``F_k`` in ``factor_dtype``
``root_k``     ``(d_k, d_k)``         ``R_k`` (root-inverse mode), identity at first
``basis_k``    ``(d_k, d_k)``         ``Q_k`` (eigenvalue-corrected mode), identity at first
``corrected``  block shape            ``Λ`` (eigenvalue-corrected mode)
``failed``     ``()`` int64           amortised computations that failed (root kept)
============== ===================== ==============================================
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from secondorder.precond.base import BlockState
from secondorder.precond.eigen_corrected import precondition_in_eigenbasis, project_to_eigenbasis
from secondorder.precond.linalg import (
    EigenFailure,
    NumericalWarning,
    apply_kronecker,
    batched_eigh,
    bias_correction,
    inverse_root_from_eigh,
    shifted_eigenvalues,
)


def factor_statistic(grad: Tensor, dim: int) -> Tensor:
    """``C_k(G)``: contract ``grad`` with itself over every dim except ``dim``.

    Args:
        grad: ``(d_0, …, d_{o-1})``.
        dim: ``k``.

    Returns:
        ``(d_k, d_k)`` symmetric PSD; ``G Gᵀ`` (k = 0) or ``Gᵀ G`` (k = 1) for a matrix.
    """
    if grad.dim() == 1:
        return torch.outer(grad, grad)
    if grad.dim() == 2:
        return grad @ grad.T if dim == 0 else grad.T @ grad
    others = [d for d in range(grad.dim()) if d != dim]
    return torch.tensordot(grad, grad, dims=(others, others))


class KroneckerFactors:
    """Stateless Shampoo strategy for one block (see the module docstring).

    Args:
        exponents: per dim of the block, the root power ``e_k`` (0 = no factor on that dim).
        beta2: factor EMA rate; 1.0 sums the factors (AdaGrad style).
        epsilon: added as ``εI`` before the eigendecomposition (root mode) and to the
            denominator ``sqrt(Λ/c₂) + ε`` (eigenvalue-corrected mode).
        relative_epsilon: root mode only: a further ``ε_rel · λ_max`` is added to every
            eigenvalue of ``F_k/c₂ + εI`` after the shift (Anil et al. 2020's scale-free
            ridge). It bounds how much a rank-deficient factor amplifies rounding noise in its
            null space; 0 reproduces distributed_shampoo.
        eigenvalue_corrected: SOAP-style mode instead of root-inverse.
        factor_dtype: dtype of factors, roots, bases and ``Λ``.
        use_bias_correction: divide factors (and ``Λ``) by ``1 − β₂^t``.
    """

    def __init__(
        self,
        exponents: Sequence[float],
        *,
        beta2: float,
        epsilon: float,
        relative_epsilon: float = 0.0,
        eigenvalue_corrected: bool = False,
        factor_dtype: torch.dtype = torch.float32,
        use_bias_correction: bool = True,
    ) -> None:
        self.exponents = tuple(exponents)
        self.factored = tuple(k for k, exponent in enumerate(self.exponents) if exponent > 0)
        self.beta2 = beta2
        self.epsilon = epsilon
        self.relative_epsilon = relative_epsilon
        self.eigenvalue_corrected = eigenvalue_corrected
        self.factor_dtype = factor_dtype
        self.use_bias_correction = use_bias_correction

    # -- protocol ---------------------------------------------------------------------------
    def init_state(self, block: Tensor) -> BlockState:
        """Zero factors, identity roots/bases, zero ``Λ``; ``block`` gives shape and device."""
        options = {"dtype": self.factor_dtype, "device": block.device}
        state: BlockState = {"failed": torch.zeros((), dtype=torch.int64)}
        for k in self.factored:
            d = block.shape[k]
            state[f"factor_{k}"] = torch.zeros(d, d, **options)
            state[f"{self._inverse_key}_{k}"] = torch.eye(d, **options)
        if self.eigenvalue_corrected:
            state["corrected"] = torch.zeros(block.shape, **options)
        return state

    def update_stats(self, state: BlockState, grad: Tensor, step: int) -> None:
        """Fold ``C_k(grad)`` into every factor (``grad`` is the raw block gradient)."""
        grad = grad.to(self.factor_dtype)
        weight = 1.0 if self.beta2 == 1.0 else 1.0 - self.beta2
        for k in self.factored:
            factor = state[f"factor_{k}"]
            if grad.dim() == 2:  # fused β₂F + w·GGᵀ: no temporary d×d product
                left, right = (grad, grad.T) if k == 0 else (grad.T, grad)
                factor.addmm_(left, right, beta=self.beta2, alpha=weight)
                continue
            if self.beta2 != 1.0:
                factor.mul_(self.beta2)
            factor.add_(factor_statistic(grad, k), alpha=weight)

    def compute_inverse(self, state: BlockState, step: int) -> bool:
        """Recompute roots (or bases) of this block; see :func:`compute_inverses`."""
        return compute_inverses([(self, state)], step)[0]

    def update_correction(self, state: BlockState, grad: Tensor) -> None:
        """Eigenvalue-corrected mode: ``Λ ← β₂Λ + w (Qᵀ G)²`` with the current bases."""
        rotated = project_to_eigenbasis(grad.to(self.factor_dtype), self._bases(state))
        weight = 1.0 if self.beta2 == 1.0 else 1.0 - self.beta2
        corrected = state["corrected"]
        if self.beta2 != 1.0:
            corrected.mul_(self.beta2)
        corrected.addcmul_(rotated, rotated, value=weight)

    def precondition(self, state: BlockState, grad: Tensor, step: int) -> Tensor:
        """``R_0 G R_1`` (root mode) or ``Q((QᵀG) / (sqrt(Λ/c₂) + ε))`` (EC mode); dtype kept."""
        work = grad.to(self.factor_dtype)
        if self.eigenvalue_corrected:
            result = precondition_in_eigenbasis(work, self._bases(state), self._denominator(state, step))
        else:
            roots = [state.get(f"root_{k}") for k in range(work.dim())]
            result = apply_kronecker(work, roots)
        return result.to(grad.dtype)

    def to_dense(self, state: BlockState, step: int) -> Tensor:
        """The block's preconditioner as an ``(n, n)`` matrix on the row-major ``vec`` of a block."""
        shape = state["corrected"].shape if self.eigenvalue_corrected else self._shape(state)
        if self.eigenvalue_corrected:
            basis = _kron(self._bases(state), shape, self.factor_dtype)
            inverse_diagonal = 1.0 / self._denominator(state, step).reshape(-1)
            return basis @ torch.diag(inverse_diagonal) @ basis.T
        return _kron([state.get(f"root_{k}") for k in range(len(shape))], shape, self.factor_dtype)

    # -- helpers ----------------------------------------------------------------------------
    @property
    def _inverse_key(self) -> str:
        return "basis" if self.eigenvalue_corrected else "root"

    def _bases(self, state: BlockState) -> list[Tensor | None]:
        return [state.get(f"basis_{k}") for k in range(len(self.exponents))]

    def _shape(self, state: BlockState) -> tuple[int, ...]:
        return tuple(state[f"factor_{k}"].shape[0] if k in self.factored else 1 for k in range(len(self.exponents)))

    def _denominator(self, state: BlockState, step: int) -> Tensor:
        correction = bias_correction(self.beta2, step) if self.use_bias_correction else 1.0
        return (state["corrected"] / correction).sqrt_().add_(self.epsilon)

    def inverse_inputs(self, state: BlockState, step: int) -> list[tuple[str, Tensor, float]]:
        """``(state key, F_k / c₂ + εI, e_k)`` for every factor, ready for a batched eigh."""
        correction = bias_correction(self.beta2, step) if self.use_bias_correction else 1.0
        inputs = []
        for k in self.factored:
            factor = state[f"factor_{k}"]
            identity = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
            matrix = factor / correction + self.epsilon * identity
            inputs.append((f"{self._inverse_key}_{k}", matrix, self.exponents[k]))
        return inputs


def _kron(matrices: Sequence[Tensor | None], shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """``M_0 ⊗ M_1 ⊗ …`` with identities where an entry is None (dims from ``shape``)."""
    result = torch.ones(1, 1, dtype=dtype)
    for matrix, dim in zip(matrices, shape):
        factor = matrix if matrix is not None else torch.eye(dim, dtype=dtype)
        result = torch.kron(result, factor.to(dtype))
    return result


def compute_inverses(items: Sequence[tuple[KroneckerFactors, BlockState]], step: int) -> list[bool]:
    """Amortised step for many blocks at once: one batched ``eigh`` per factor shape.

    Root mode stores ``R_k = Q diag(μ'^(−e_k)) Qᵀ`` (μ' shifted to at least ε); EC mode stores
    ``Q_k``. A factor whose eigendecomposition or root fails keeps its previous root/basis;
    the block's ``failed`` counter is incremented and a :class:`NumericalWarning` is issued.

    Returns:
        Per block, True when every factor was refreshed.
    """
    jobs = [(index, key, matrix, exponent) for index, (strategy, state) in enumerate(items)
            for key, matrix, exponent in strategy.inverse_inputs(state, step)]
    results = batched_eigh([matrix for _, _, matrix, _ in jobs])
    succeeded = [True] * len(items)
    for (index, key, _, exponent), result in zip(jobs, results):
        strategy, state = items[index]
        try:
            if result is None:
                raise EigenFailure("eigendecomposition failed")
            eigenvalues, eigenvectors = result
            if strategy.eigenvalue_corrected:
                new_value = eigenvectors
            else:
                regularised = shifted_eigenvalues(eigenvalues, strategy.epsilon)
                if strategy.relative_epsilon:
                    regularised = regularised + strategy.relative_epsilon * regularised.max()
                new_value = inverse_root_from_eigh(regularised, eigenvectors, exponent)
            state[key].copy_(new_value)
        except EigenFailure as error:
            succeeded[index] = False
            warnings.warn(f"Shampoo kept the previous {key} of a block: {error}", NumericalWarning, stacklevel=3)
    for (_, state), ok in zip(items, succeeded):
        if not ok:
            state["failed"].add_(1)
    return succeeded
