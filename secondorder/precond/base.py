"""The preconditioner protocol every curvature strategy of the suite follows.

A strategy is a *stateless* object: everything it learns lives in a plain ``dict`` of tensors
(the block's entry of ``optimizer.state[param]``), so ``state_dict``, DCP and the distributor
need no special code. The four verbs separate what runs how often:

* ``init_state(block)`` — allocate what the block needs (once);
* ``update_stats(state, stats, step)`` — cheap, every ``stats_every`` steps;
* ``compute_inverse(state, step)`` — amortised (eigendecompositions, roots), every
  ``precondition_frequency`` steps; on failure it keeps the last good result and returns False;
* ``precondition(state, grad, step)`` — every step;
* ``to_dense(state, step)`` — the preconditioner as an explicit matrix acting on the row-major
  ``vec`` of the block, for tests on small blocks.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

BlockState = dict[str, Any]


class Preconditioner(Protocol):
    """Protocol of a per-block preconditioning strategy (see the module docstring)."""

    def init_state(self, block: Tensor) -> BlockState:
        """Allocate the state of one block shaped like ``block``."""

    def update_stats(self, state: BlockState, stats: Any, step: int) -> None:
        """Fold this step's statistics (a gradient block, captured layer I/O, ...) in."""

    def compute_inverse(self, state: BlockState, step: int) -> bool:
        """Recompute the amortised part; return False (state kept) on numerical failure."""

    def precondition(self, state: BlockState, grad: Tensor, step: int) -> Tensor:
        """Return the preconditioned ``grad`` (same shape)."""

    def to_dense(self, state: BlockState, step: int) -> Tensor:
        """The ``(n, n)`` matrix ``P`` with ``vec(precondition(G)) = P vec(G)`` (row-major vec)."""
