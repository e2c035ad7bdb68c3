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
``rotated_``   block shape            the optimizer's first moment in the eigenbasis,
``average``                           ``Qᵀ m Q`` (EC mode with β₁ > 0, kept by Shampoo)
``failed``     ``()`` int64           amortised computations that failed (root kept)
============== ===================== ==============================================
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from secondorder.precond.base import BlockState
from secondorder.precond.eigen_corrected import (
    precondition_in_eigenbasis,
    project_from_eigenbasis,
    project_to_eigenbasis,
)
from secondorder.precond.linalg import (
    EigenFailure,
    NumericalWarning,
    apply_kronecker,
    bias_correction,
    coupled_newton_inverse_root,
    cpu_threads,
    inverse_root_from_eigh,
    keep_where,
    pack_upper,
    shifted_eigenvalues,
    stable_eigh,
    unpack_upper,
    warm_started_eigenbasis,
)

#: How an amortised step refreshes a factor's root or basis (``refresh_method``):
#: ``"eigh"`` a full eigendecomposition (both modes); ``"qr"`` (eigenvalue-corrected mode) one
#: warm-started orthogonal-iteration step from the previous basis, with ``Λ`` permuted along;
#: ``"newton"`` (root mode) the coupled Newton iteration for integer roots ``1/e_k``, falling
#: back to ``eigh`` for other exponents or when it does not converge.
REFRESH_METHODS = ("eigh", "qr", "newton")
#: Largest ``max|X^p F − I|`` a Newton root may end with before ``eigh`` replaces it.
NEWTON_ACCEPTED_RESIDUAL = 1e-3


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
        correction_exponent: eigenvalue-corrected mode: the power ``e`` of the denominator
            ``(Λ/c₂)^e + ε`` (½: Adam; distributed_shampoo's SOAP ``inverse_exponent_override``).
        packed: store factors (and roots) as their upper triangles, ``d(d+1)/2`` entries
            (:func:`~secondorder.precond.linalg.pack_upper`): about half their memory, paid for
            by an unpack of every root each step and of every factor at each update and
            refresh (distributed_shampoo's ``use_symmetric_packing``). Bases stay square.
        refresh_method: one of :data:`REFRESH_METHODS`. The first refresh of a basis
            (``initial=True`` in :func:`compute_inverses`) is always an ``eigh``: one QR step
            from the identity is only a crude basis.
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
        refresh_method: str = "eigh",
        correction_exponent: float = 0.5,
        packed: bool = False,
    ) -> None:
        if refresh_method not in REFRESH_METHODS:
            raise ValueError(f"Invalid refresh_method: {refresh_method!r} (expected one of {REFRESH_METHODS})")
        if refresh_method == ("newton" if eigenvalue_corrected else "qr"):
            needed = "root-inverse" if eigenvalue_corrected else "eigenvalue-corrected"
            raise ValueError(f"Invalid refresh_method: {refresh_method!r} needs the {needed} mode")
        self.refresh_method = refresh_method
        self.correction_exponent = correction_exponent
        self.exponents = tuple(exponents)

        self.factored = tuple(k for k, exponent in enumerate(self.exponents) if exponent > 0)
        self.beta2 = beta2
        self.epsilon = epsilon
        self.relative_epsilon = relative_epsilon
        self.eigenvalue_corrected = eigenvalue_corrected
        self.factor_dtype = factor_dtype
        self.use_bias_correction = use_bias_correction
        self.packed = packed

    # -- protocol ---------------------------------------------------------------------------
    def init_state(self, block: Tensor) -> BlockState:
        """Zero factors, identity roots/bases, zero ``Λ``; ``block`` gives shape and device."""
        options = {"dtype": self.factor_dtype, "device": block.device}
        state: BlockState = {"failed": torch.zeros((), dtype=torch.int64)}
        for k in self.factored:
            d = block.shape[k]
            identity, zeros = torch.eye(d, **options), torch.zeros(d, d, **options)
            state[f"factor_{k}"] = pack_upper(zeros) if self.packed else zeros
            packed_root = self.packed and not self.eigenvalue_corrected  # bases are never packed
            state[f"{self._inverse_key}_{k}"] = pack_upper(identity) if packed_root else identity
        if self.eigenvalue_corrected:
            state["corrected"] = torch.zeros(block.shape, **options)
        return state

    def update_stats(self, state: BlockState, grad: Tensor, step: int, keep: Tensor | None = None) -> None:
        """Fold ``C_k(grad)`` into every factor (``grad`` is the raw block gradient).

        ``keep`` (optional 0-d bool tensor, see :func:`~secondorder.precond.linalg.finite_or_zero`):
        where False the factors are left exactly as they are, with no host synchronisation;
        ``grad`` must then be finite (zeros). Costs one extra pass over each factor.
        """
        grad = grad.to(self.factor_dtype)
        weight = 1.0 if self.beta2 == 1.0 else 1.0 - self.beta2
        decay = None
        if keep is not None and self.beta2 != 1.0:
            decay = keep_where(keep, self.beta2, 1.0, self.factor_dtype)
        for k in self.factored:
            factor = state[f"factor_{k}"]
            if self.packed:  # C_k formed square, its upper triangle folded in
                if decay is not None or self.beta2 != 1.0:
                    factor.mul_(self.beta2 if decay is None else decay)
                factor.add_(pack_upper(factor_statistic(grad, k)), alpha=weight)
                continue
            if grad.dim() == 2 and decay is None:  # fused β₂F + w·GGᵀ: no temporary d×d product
                left, right = (grad, grad.T) if k == 0 else (grad.T, grad)
                factor.addmm_(left, right, beta=self.beta2, alpha=weight)
                continue
            if decay is not None:
                factor.mul_(decay)  # a zero gradient then adds nothing: F unchanged
            elif self.beta2 != 1.0:
                factor.mul_(self.beta2)
            if grad.dim() == 2:
                left, right = (grad, grad.T) if k == 0 else (grad.T, grad)
                factor.addmm_(left, right, alpha=weight)
            else:
                factor.add_(factor_statistic(grad, k), alpha=weight)

    def compute_inverse(self, state: BlockState, step: int, *, initial: bool = False) -> bool:
        """Recompute roots (or bases) of this block; see :func:`compute_inverses`."""
        return compute_inverses([(self, state)], step, initial=initial)[0]

    def refresh_factor(self, state: BlockState, k: int, step: int, *, initial: bool = False) -> None:
        """Recompute ``root_k`` or ``basis_k`` from ``factor_k`` (the amortised work of dim ``k``).

        The state is written only once the result is known to be finite, so a failure
        leaves the previous root/basis in place.

        Raises:
            EigenFailure: the factor is not finite or no method produced a usable result.
        """
        factor = self._square(state, f"factor_{k}")
        if self.eigenvalue_corrected:
            basis = state[f"basis_{k}"]
            if self.refresh_method == "qr" and not initial:
                # Bias correction and ε rescale and shift F: neither changes the iteration.
                _, new_basis, order = warm_started_eigenbasis(factor, basis)
                basis.copy_(new_basis)
                corrected = state["corrected"]
                corrected.copy_(corrected.index_select(k, order))  # Λ follows its columns
                return
            _, vectors = stable_eigh(self._regularised(factor, step), symmetrize_input=False)
            basis.copy_(vectors)
            return
        exponent, root = self.exponents[k], state[f"root_{k}"]
        matrix = self._regularised(factor, step)
        power = 1.0 / exponent
        if self.refresh_method == "newton" and abs(power - round(power)) < 1e-9:
            if self.relative_epsilon:
                matrix.diagonal().add_(self.relative_epsilon * _largest_eigenvalue(matrix))
            # float64 factors ask for float64 accuracy (one more quadratic step than float32's).
            tolerance = 1e-12 if matrix.dtype == torch.float64 else 1e-6
            newton_root, residual = coupled_newton_inverse_root(matrix, round(power), tolerance=tolerance)
            if residual <= NEWTON_ACCEPTED_RESIDUAL:
                root.copy_(pack_upper(newton_root) if self.packed else newton_root)
                return
            matrix = self._regularised(factor, step)  # not converged (or not PSD): eigh instead
        values, vectors = stable_eigh(matrix, symmetrize_input=False)
        values = shifted_eigenvalues(values, self.epsilon)
        if self.relative_epsilon:
            values = values + self.relative_epsilon * values.max()
        # values >= ε > 0 and checked eigenpairs: the root is finite by construction.
        new_root = inverse_root_from_eigh(values, vectors, exponent, check_finite=False)
        root.copy_(pack_upper(new_root) if self.packed else new_root)

    def update_correction(self, state: BlockState, grad: Tensor, keep: Tensor | None = None) -> Tensor:
        """Eigenvalue-corrected mode: ``Λ ← β₂Λ + w (Qᵀ G)²`` with the current bases.

        ``keep``: as in :meth:`update_stats` (False leaves ``Λ`` unchanged, ``grad`` zeros).
        Returns the rotated gradient ``Qᵀ G`` (``factor_dtype``), so that a first moment kept
        in the eigenbasis (:meth:`rotate_average`) needs no rotation of its own. It is always
        a new tensor, never ``grad``: the caller may overwrite it (Shampoo writes the rotated
        direction's numerator into it, saving a block-sized allocation per step).
        """
        rotated = project_to_eigenbasis(grad.to(self.factor_dtype), self._bases(state))
        if rotated is grad:  # no basis on any dim and the gradient already in factor_dtype
            rotated = rotated.clone()
        weight = 1.0 if self.beta2 == 1.0 else 1.0 - self.beta2
        corrected = state["corrected"]
        if keep is not None and self.beta2 != 1.0:
            corrected.mul_(keep_where(keep, self.beta2, 1.0, corrected.dtype))
        elif self.beta2 != 1.0:
            corrected.mul_(self.beta2)
        corrected.addcmul_(rotated, rotated, value=weight)
        return rotated

    def rotate_average(self, state: BlockState, average: Tensor) -> None:
        """Set ``rotated_average = Qᵀ m Q`` from the first moment ``m`` (after a basis change).

        Between refreshes the bases are fixed, so the optimizer can then update the rotated
        copy with the rotated gradient of :meth:`update_correction`
        (``Qᵀ m_t Q = β₁ Qᵀ m_{t−1} Q + (1 − β₁) Qᵀ G_t Q``, linear): the per-step rotation of
        ``m`` — two of the eight ``d³`` products of a SOAP step — is paid only at refreshes.
        """
        # a copy even where no dim has a basis (the projection is then the identity)
        state["rotated_average"] = project_to_eigenbasis(average.to(self.factor_dtype, copy=True), self._bases(state))

    def precondition_rotated(
        self, state: BlockState, rotated: Tensor, step: int, dtype: torch.dtype, workspace: Tensor | None = None
    ) -> Tensor:
        """``Q (rotated / (sqrt(Λ/c₂) + ε))`` in ``dtype``: the EC direction of a numerator that is
        already in the eigenbasis (block shape, ``factor_dtype``). ``rotated`` is divided in
        place (a per-step working buffer of the caller's, not state). ``workspace``: optional
        flat ``factor_dtype`` buffer of at least ``rotated.numel()`` entries that receives the
        denominator (overwritten), instead of a new block-sized tensor each step."""
        out = None if workspace is None else workspace[: rotated.numel()].view(state["corrected"].shape)
        return project_from_eigenbasis(rotated.div_(self._denominator(state, step, out)), self._bases(state)).to(dtype)

    def precondition(self, state: BlockState, grad: Tensor, step: int) -> Tensor:
        """``R_0 G R_1`` (root mode) or ``Q((QᵀG) / (sqrt(Λ/c₂) + ε))`` (EC mode); dtype kept."""
        work = grad.to(self.factor_dtype)
        if self.eigenvalue_corrected:
            result = precondition_in_eigenbasis(work, self._bases(state), self._denominator(state, step))
        else:
            result = apply_kronecker(work, self._roots(state, work.dim()))
        # A block without factors (all exponents 0) is the identity: still a new tensor.
        return result.clone() if result is grad else result.to(grad.dtype)

    def to_dense(self, state: BlockState, step: int) -> Tensor:
        """The block's preconditioner as an ``(n, n)`` matrix on the row-major ``vec`` of a block."""
        shape = state["corrected"].shape if self.eigenvalue_corrected else self._shape(state)
        if self.eigenvalue_corrected:
            basis = _kron(self._bases(state), shape, self.factor_dtype)
            inverse_diagonal = 1.0 / self._denominator(state, step).reshape(-1)
            return basis @ torch.diag(inverse_diagonal) @ basis.T
        return _kron(self._roots(state, len(shape)), shape, self.factor_dtype)

    # -- helpers ----------------------------------------------------------------------------
    @property
    def _inverse_key(self) -> str:
        return "basis" if self.eigenvalue_corrected else "root"

    def _bases(self, state: BlockState) -> list[Tensor | None]:
        return [state.get(f"basis_{k}") for k in range(len(self.exponents))]

    def _shape(self, state: BlockState) -> tuple[int, ...]:
        return tuple(self._square(state, f"factor_{k}").shape[0] if k in self.factored else 1
                     for k in range(len(self.exponents)))

    def _square(self, state: BlockState, key: str) -> Tensor:
        """``state[key]`` as a square matrix (unpacked into a new tensor when packed)."""
        return unpack_upper(state[key]) if self.packed else state[key]

    def _roots(self, state: BlockState, order: int) -> list[Tensor | None]:
        return [self._square(state, f"root_{k}") if f"root_{k}" in state else None for k in range(order)]

    def _denominator(self, state: BlockState, step: int, out: Tensor | None = None) -> Tensor:
        correction = bias_correction(self.beta2, step) if self.use_bias_correction else 1.0
        scaled = torch.div(state["corrected"], correction, out=out)
        powered = scaled.sqrt_() if self.correction_exponent == 0.5 else scaled.pow_(self.correction_exponent)
        return powered.add_(self.epsilon)

    def _regularised(self, factor: Tensor, step: int) -> Tensor:
        """``F_k / c₂ + εI`` as a new matrix: one pass over ``F_k``, ε added on the diagonal."""
        correction = bias_correction(self.beta2, step) if self.use_bias_correction else 1.0
        matrix = factor / correction if correction != 1.0 else factor.clone()
        matrix.diagonal().add_(self.epsilon)
        return matrix


def _largest_eigenvalue(matrix: Tensor, iterations: int = 20) -> Tensor:
    """Power-iteration estimate of ``λ_max`` of a symmetric PSD ``(n, n)`` matrix (0-d tensor)."""
    vector = torch.ones(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        vector = matrix @ vector
        vector = vector / vector.norm().clamp_min(torch.finfo(matrix.dtype).tiny)
    return vector @ (matrix @ vector)


def _kron(matrices: Sequence[Tensor | None], shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """``M_0 ⊗ M_1 ⊗ …`` with identities where an entry is None (dims from ``shape``)."""
    result = torch.ones(1, 1, dtype=dtype)
    for matrix, dim in zip(matrices, shape):
        factor = matrix if matrix is not None else torch.eye(dim, dtype=dtype)
        result = torch.kron(result, factor.to(dtype))
    return result


def compute_inverses(
    items: Sequence[tuple[KroneckerFactors, BlockState]], step: int, *, initial: bool = False
) -> list[bool]:
    """Amortised step for many blocks: every factor's root or basis, one factor at a time.

    Root mode stores ``R_k = Q diag(μ'^(−e_k)) Qᵀ`` (μ' shifted to at least ε) or the Newton
    root; EC mode stores ``Q_k`` (``Λ`` permuted along with a QR refresh's columns). One
    factor at a time, with no stacking: a batched ``eigh`` measured no faster than a loop and
    needs a copy of every factor. Each factor's result is checked for finiteness once. A
    factor whose refresh fails keeps its previous root/basis; the block's ``failed`` counter
    is incremented and a :class:`NumericalWarning` is issued. CPU decompositions run on one
    thread (see :func:`~secondorder.precond.linalg.cpu_threads`).

    Args:
        items: ``(strategy, state)`` per block.
        step: the blocks' step ``t`` (for the bias correction).
        initial: this is the blocks' first refresh (QR refreshes then use ``eigh``).

    Returns:
        Per block, True when every factor was refreshed.
    """
    succeeded = [True] * len(items)
    on_cpu = any(state[f"factor_{strategy.factored[0]}"].device.type == "cpu"
                 for strategy, state in items if strategy.factored)
    with cpu_threads(1 if on_cpu else None):
        for index, (strategy, state) in enumerate(items):
            for k in strategy.factored:
                try:
                    strategy.refresh_factor(state, k, step, initial=initial)
                except EigenFailure as error:
                    succeeded[index] = False
                    warnings.warn(f"Shampoo kept the previous {strategy._inverse_key}_{k} of a block: {error}",
                                  NumericalWarning, stacklevel=3)
    for (_, state), ok in zip(items, succeeded):
        if not ok:
            state["failed"].add_(1)
    return succeeded
