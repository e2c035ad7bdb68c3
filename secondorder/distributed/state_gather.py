"""Every rank gets the optimizer state of every layer, whichever rank owns it.

Under an :class:`~secondorder.distributed.distributor.AllGatherDistributor` a capture-based
optimizer (EK-FAC, AdaFisher, SINGD) keeps each layer's state on the layer's owner only. Tools
that read the state of *all* layers after training — influence factors
(:meth:`secondorder.influence.InfluenceFactors.from_optimizer`), inspection — call
:func:`gather_layer_states` on every rank: one ``all_gather_object`` of each rank's owned
layers' tensors, exact (the tensors travel pickled, in their own dtype, through the CPU).
A factor kept in diagonal blocks (EK-FAC's ``max_factor_dim``: ``activation_factor_block_<j>``,
``activation_basis_block_<j>``) is handed over assembled as well, ``activation_factor`` /
``activation_basis`` ``(1, d_in', d_in')`` block-diagonal, so readers of the dense layout work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["gather_layer_states"]


def gather_layer_states(
    optimizer: torch.optim.Optimizer, layers: Sequence[Any], keys: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The state entry of each layer's weight, gathered from its owner (collective when the
    optimizer is distributed over several ranks: every rank must call it).

    Args:
        optimizer: an optimizer keeping per-weight state (``optimizer.state[layer.weight]``);
            its ``distributor`` (if any) says whether the state is spread over ranks.
        layers: objects with ``name`` and ``weight`` (e.g. ``optimizer.capture.layers``), the
            same list in the same order on every rank.
        keys: the state entries wanted (default: all of them).

    Returns:
        ``{layer.name: {key: value}}`` for every layer with state on some rank (its owner); the
        same on every rank. In one process the values are the optimizer's own tensors; gathered
        ones are CPU copies. Assembled block-diagonal factors (module docstring) are new tensors.
    """
    distributor = getattr(optimizer, "distributor", None)
    world_size = getattr(distributor, "world_size", 1)

    def own_entries(copy: bool) -> dict[str, dict[str, Any]]:
        entries = {}
        for layer in layers:
            state = optimizer.state.get(layer.weight)
            if not state:
                continue
            chosen = {k: v for k, v in state.items() if keys is None or k in keys}
            if copy:
                chosen = {
                    k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                    for k, v in chosen.items()
                }
            entries[layer.name] = chosen
        return entries

    if world_size == 1:
        return {name: _assemble_blocks(state) for name, state in own_entries(copy=False).items()}
    group = getattr(distributor, "process_group", None)
    gathered: list[dict[str, dict[str, Any]] | None] = [None] * world_size
    dist.all_gather_object(gathered, own_entries(copy=True), group=group)
    merged: dict[str, dict[str, Any]] = {}
    for entries in gathered:
        for name, state in (entries or {}).items():
            merged.setdefault(name, state)  # one owner per layer; the lowest rank wins a tie
    return {name: _assemble_blocks(state) for name, state in merged.items()}


def _assemble_blocks(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` plus the dense block-diagonal ``activation_factor`` / ``activation_basis`` of a
    blocked input factor (module docstring); unchanged when there is none."""
    for name in ("activation_factor", "activation_basis"):
        blocks = []
        while f"{name}_block_{len(blocks)}" in state:
            blocks.append(state[f"{name}_block_{len(blocks)}"])
        if blocks and name not in state:
            squares = (b.reshape(b.shape[-1], b.shape[-1]) for b in blocks)
            state = {**state, name: torch.block_diag(*squares).unsqueeze(0)}
    return state
