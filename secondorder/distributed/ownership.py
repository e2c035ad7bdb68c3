"""Layer ownership for optimizers whose block is a layer (EK-FAC, AdaFisher, SINGD).

Such optimizers update every layer independently: the layer's statistics, factors, inverses
and momentum touch no other layer. :class:`LayerOwnership` distributes them without any
optimizer-specific code:

1. **Blocks.** Each tracked layer (weight and bias together) is one block; every other
   parameter of the param groups (the optimizers' Adam-style fallback) is a block of its own.
   Blocks are listed in param_groups order and assigned by cost (LPT,
   :func:`~secondorder.distributed.distributor.assign_owners`; a layer costs
   ``d_out³ + d_in'³`` for its eigendecompositions plus its parameter count (AdaFisher's
   diagonal factors: ``d_out + d_in'`` plus its parameter count), and its state
   size — ``2(d_in'² + d_out²) + d_out·d_in'`` plus its parameters, diagonal factors for
   AdaFisher — is balanced too). An optimizer whose layer keeps smaller factors (EK-FAC's
   blocked ``A``, SINGD's structured ``K``/``C``) says so through ``_layer_footprint(layer)``:
   ``(cost, state size)`` of its factors, or ``None`` for the dense estimate).
2. **Statistics.** :meth:`gather_stats` hands each owner the layer inputs and output
   gradients captured on *every* rank's micro-batch, concatenated along the example
   dimension (rank order), so the owner's statistics are those of the global batch;
   non-owned layers' statistics are dropped.
3. **The step.** Between :meth:`begin` and :meth:`finish` the gradients of blocks owned by
   other ranks are hidden (set to ``None``, so the optimizer skips those parameters and keeps
   no state for them); :meth:`finish` restores them and one all-gather of the owners'
   updated parameter values (in the parameters' own dtype, so lossless) gives every rank the
   new parameters.
4. **Schedules.** :meth:`agree` ORs a flag over ranks, so the capture records when *some*
   owner needs statistics.

At world size 1 (:class:`~secondorder.distributed.distributor.Distributor`) the same calls
hide nothing, gather nothing and copy nothing. Requirements: gradients identical on every
rank (DDP) and the same sequence length ``T`` per layer on every rank (inputs are
concatenated along the example dim only). Couplings across layers (EK-FAC's ``kl_clip``)
cannot be distributed this way.

FSDP2 (``fully_shard``: DTensor parameters and gradients, ``Shard(0)``). What is
preconditioned is the *full layer*, exactly as under DDP: a Kronecker factor on the output
side mixes the rows FSDP2 shards. :meth:`owned_step` therefore hands each layer's owner the
whole layer (:func:`~secondorder.distributed.full_view.owner_view`): one ``all_to_all`` per
dtype (``gather_to_owners``)
concatenates every rank's rows of the owned parameters and of their (already
reduce-scattered) gradients on the owner, where plain full tensors stand in for the DTensors
(param groups, ``optimizer.state``, the capture's layers, the block table); owners update
them, and a second ``all_to_all`` (``scatter_rows_from_owners``) sends every rank its rows of
the new values. Per step a rank receives about ``2/W`` of the model (its layers' parameters
and gradients) plus ``1/W`` (its rows), and holds full copies of its own layers only; there
is no full-model gather. Layouts other than FSDP2's (several meshes, other placements, blocks
mixing DTensor and plain parameters) fall back to
:func:`~secondorder.distributed.full_view.full_view`, where every rank gathers every
parameter and gradient and the owners' values are all-gathered. Either way the result equals
single-process training on the global batch, and the optimizer state is plain, full-size
and held by the owner only (checkpoints behave as under DDP). A multi-rank ``distributor``
is required (``distributor=True``); with the single-process default the step raises
``ValueError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from secondorder.distributed.distributor import Distributor
from secondorder.distributed.full_view import dtensor_params, full_view, owner_view, row_layout

__all__ = ["LayerOwnership"]


class LayerOwnership:
    """Ownership of layers (and fallback parameters) for a per-layer optimizer.

    Args:
        optimizer: the optimizer (its ``param_groups`` give the parameter order).
        distributor: where blocks live (``Distributor()`` at world size 1).
        layers: returns the tracked layers (objects with ``weight``, ``bias``, ``kind``,
            ``in_features``, ``out_features``, e.g.
            :class:`~secondorder.precond.capture.CapturedLayer`), in a rank-independent order.
        capture: returns the :class:`~secondorder.precond.capture.LayerCapture` owning the
            layers (its ``swap_params`` keeps its parameter lookup right while DTensor
            parameters are replaced by full tensors); without it only the layers' ``weight``
            and ``bias`` attributes are swapped.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        distributor: Distributor,
        layers: Callable[[], Sequence[Any]],
        *,
        capture: Callable[[], Any] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.distributor = distributor
        self._layers = layers
        self._capture = capture
        self._key: tuple[int, ...] | None = None
        self._blocks: list[list[Tensor]] = []
        self._owners: list[int] = []
        self._owner_of: dict[int, int] = {}
        self._hidden: list[tuple[Tensor, Tensor]] = []
        self._active: list[bool] = []
        self._sharded_blocks: set[int] = set()  # blocks whose new values the owner view scatters

    # -- blocks and owners ------------------------------------------------------------------
    def blocks(self) -> tuple[list[list[Tensor]], list[int]]:
        """``(blocks, owners)``: per block its parameters, and its owner rank (cached)."""
        layers = list(self._layers())
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        key = tuple(id(p) for p in params) + (-1,) + tuple(id(layer.weight) for layer in layers)
        if key != self._key:
            by_weight = {id(layer.weight): layer for layer in layers}
            in_layer = {
                id(p) for layer in layers for p in (layer.weight, layer.bias) if p is not None
            }
            blocks, costs, sizes = [], [], []
            diagonal = _keeps_diagonal_factors(self.optimizer)
            footprint = getattr(self.optimizer, "_layer_footprint", None)
            for param in params:
                layer = by_weight.get(id(param))
                if layer is not None:
                    members = [p for p in (layer.weight, layer.bias) if p is not None]
                    blocks.append(members)
                    numel = sum(p.numel() for p in members)
                    estimate = footprint(layer) if footprint is not None else None
                    if estimate is None:
                        estimate = (_layer_cost(layer, diagonal), _layer_state_size(layer, diagonal))
                    costs.append(estimate[0] + numel)
                    sizes.append(estimate[1] + numel)
                elif id(param) not in in_layer:
                    blocks.append([param])
                    costs.append(float(param.numel()))
                    sizes.append(2.0 * param.numel())  # the Adam-style fallback's two moments
            self._key, self._blocks = key, blocks
            # Cost and state size both balanced: a layer's d³ eigendecomposition cost says
            # little about its d² factors, so cost alone can pile memory up on one rank.
            self._owners = self.distributor.assign(costs, sizes)
            self._owner_of = {
                id(p): owner
                for block, owner in zip(blocks, self._owners, strict=True)
                for p in block
            }
        return self._blocks, self._owners

    def is_owned(self, param: Tensor) -> bool:
        """Whether this rank owns ``param``'s block."""
        self.blocks()
        return self._owner_of.get(id(param), self.distributor.rank) == self.distributor.rank

    def owned_layers(self, layers: Sequence[Any]) -> list[Any]:
        """The members of ``layers`` whose block this rank owns (order kept)."""
        return [layer for layer in layers if self.is_owned(layer.weight)]

    # -- statistics -------------------------------------------------------------------------
    def gather_stats(self, stats: dict[Any, Any]) -> dict[Any, Any]:
        """Owned layers' statistics over the global batch; others dropped.

        Args:
            stats: ``{layer: LayerStats}`` captured on this rank (the same layers on every
                rank): ``inputs`` ``(N_rank, T, ...)``, ``output_grads`` ``(N_rank, T, ...)``,
                ``num_examples`` and ``num_positions``.

        Returns:
            ``{layer: LayerStats}`` for owned layers only, with ``inputs`` / ``output_grads``
            concatenated over ranks (rank order) and counts summed.
        """
        if self.distributor.world_size == 1:
            return stats
        self.blocks()
        layers = [layer for layer in self._layers() if layer in stats]
        tensors, owners = [], []
        for layer in layers:
            owner = self._owner_of[id(layer.weight)]
            item = stats[layer]
            counts = torch.tensor(
                [[item.num_examples, item.num_positions]],
                dtype=torch.long,
                device=item.output_grads.device,
            )
            tensors += [item.inputs, item.output_grads, counts]
            owners += [owner] * 3
        gathered = self.distributor.gather_to_owners(tensors, owners)
        result = {}
        for index, layer in enumerate(layers):
            inputs, grads, counts = gathered[3 * index : 3 * index + 3]
            if inputs is None:
                continue
            item = stats[layer]
            totals = counts.sum(dim=0).tolist()
            result[layer] = type(item)(
                inputs=inputs,
                output_grads=grads,
                num_examples=int(totals[0]),
                num_positions=int(totals[1]),
            )
        return result

    def agree(self, flag: bool) -> bool:
        """``flag`` OR-ed over ranks (a collective at world size > 1)."""
        return self.distributor.any(flag)

    # -- the step ---------------------------------------------------------------------------
    def begin(self) -> None:
        """Hide the gradients of blocks other ranks own (the optimizer then skips them)."""
        blocks, owners = self.blocks()
        self._active = [any(p.grad is not None for p in block) for block in blocks]
        self._hidden = []
        for block, owner in zip(blocks, owners, strict=False):
            if owner == self.distributor.rank:
                continue
            for param in block:
                if param.grad is not None:
                    self._hidden.append((param, param.grad))
                    param.grad = None

    @contextlib.contextmanager
    def owned_step(self) -> Iterator[None]:
        """``begin()`` … ``finish()`` around an optimizer step's body; DTensor (FSDP2) parameters
        are seen whole by their owners (:meth:`_owner_view`) or, for layouts it does not cover,
        by every rank (:func:`~secondorder.distributed.full_view.full_view`).

        If the body raises, the hidden gradients are still given back (no all-gather then)
        and DTensor parameters are restored unchanged, so a failed step never leaves the
        user's ``.grad`` missing or a full tensor in the optimizer's place.
        """
        sharded = dtensor_params(self.optimizer)
        rows = self._row_layout(sharded) if sharded else None
        if rows is not None:
            view = self._owner_view(sharded, rows)
        else:
            view = full_view(self.optimizer, self.distributor, self._swap_params)
        with view:
            self.begin()
            try:
                yield
            except BaseException:
                self._restore_gradients()
                raise
            self.finish()

    # -- FSDP2: each owner gathers only its own layers --------------------------------------
    def _row_layout(self, params: list[DTensor]) -> dict[int, list[int]] | None:
        """:func:`~secondorder.distributed.full_view.row_layout`, and ``None`` where a block
        mixes DTensor and plain parameters."""
        blocks, _ = self.blocks()
        if any(len({isinstance(p, DTensor) for p in block}) > 1 for block in blocks):
            return None
        return row_layout(params, self.distributor)

    @contextlib.contextmanager
    def _owner_view(self, params: list[DTensor], rows: dict[int, list[int]]) -> Iterator[None]:
        """:func:`~secondorder.distributed.full_view.owner_view` over the layers' owners; the
        owner view's blocks are left out of :meth:`finish`'s all-gather (it scatters them)."""
        self.blocks()
        owners = [self._owner_of[id(p)] for p in params]
        self._sharded_blocks = {
            index for index, block in enumerate(self._blocks) if isinstance(block[0], DTensor)
        }
        try:
            with owner_view(self.optimizer, self.distributor, params, owners, rows, self._swap_params):
                yield
        finally:
            self._sharded_blocks = set()

    def _swap_params(self, mapping: Mapping[int, Tensor]) -> None:
        """Replace each tensor whose ``id`` is in ``mapping`` in the layers and the block table."""
        capture = self._capture() if self._capture is not None else None
        if capture is not None:
            capture.swap_params(mapping)
        else:
            for layer in self._layers():
                layer.weight = mapping.get(id(layer.weight), layer.weight)
                if layer.bias is not None:
                    layer.bias = mapping.get(id(layer.bias), layer.bias)
        if self._key is None:
            return
        self._blocks = [[mapping.get(id(p), p) for p in block] for block in self._blocks]
        self._owner_of = {_new_id(key, mapping): owner for key, owner in self._owner_of.items()}
        self._key = tuple(_new_id(key, mapping) for key in self._key)

    def _restore_gradients(self) -> None:
        for param, grad in self._hidden:
            param.grad = grad
        self._hidden = []

    def finish(self) -> None:
        """Restore hidden gradients; all-gather owned blocks' new values onto every rank."""
        self._restore_gradients()
        if self.distributor.world_size == 1:
            return
        blocks, owners = self.blocks()
        flat = [  # the owner view's sharded blocks reach the ranks by its own scatter
            torch.cat([p.detach().reshape(-1) for p in block])
            if active and index not in self._sharded_blocks else None
            for index, (block, active) in enumerate(zip(blocks, self._active, strict=False))
        ]
        rank = self.distributor.rank
        values = [v if owner == rank else None for v, owner in zip(flat, owners, strict=True)]
        gathered = self.distributor.all_gather_values(values, owners, flat)
        for block, owner, value in zip(blocks, owners, gathered, strict=False):
            if owner == self.distributor.rank or value is None:
                continue
            offset = 0
            for param in block:
                param.detach().copy_(value[offset : offset + param.numel()].view(param.shape))
                offset += param.numel()


def _new_id(key: int, mapping: Mapping[int, Tensor]) -> int:
    """``key`` (a tensor's ``id``) after the swap ``mapping``."""
    return id(mapping[key]) if key in mapping else key


def _keeps_diagonal_factors(optimizer: Any) -> bool:
    """AdaFisher keeps diagonal Kronecker factors (EK-FAC and SINGD keep full ones)."""
    from secondorder.optimizers.adafisher import AdaFisher  # the optimizers import this module

    return isinstance(optimizer, AdaFisher)


def _layer_state_size(layer: Any, diagonal: bool) -> float:
    """Estimated floats of a layer's factor state: ``A`` and ``G`` with their bases (or
    inverses) and EK-FAC's ``d_out × d_in`` correction for full factors; two vectors each
    for diagonal ones. A diagonal input side (embeddings, norms) keeps a vector."""
    d_in, d_out = int(layer.in_features), int(layer.out_features)
    groups = int(getattr(layer, "groups", 1))
    if diagonal:
        return float(groups * 2 * (d_in + d_out))
    diagonal_input = getattr(layer, "kind", "linear") in ("embedding", "layernorm", "batchnorm")
    input_size = 2 * d_in if diagonal_input else 2 * d_in * d_in
    return float(groups * (input_size + 2 * d_out * d_out + d_out * d_in))


def _layer_cost(layer: Any, diagonal: bool = False) -> float:
    """Amortised work of a layer's factors: the eigendecompositions of its two Kronecker
    factors (``d³``; diagonal for embeddings and norms), or, for diagonal factors (AdaFisher),
    their ``d_in + d_out`` entries — with no decomposition at all, what remains scales with the
    layer's parameters (added by the caller), not with ``d³``."""
    d_in, d_out = int(layer.in_features), int(layer.out_features)
    groups = int(getattr(layer, "groups", 1))
    if diagonal:
        return float(groups * (d_in + d_out))
    input_cost = (
        d_in
        if getattr(layer, "kind", "linear") in ("embedding", "layernorm", "batchnorm")
        else d_in**3
    )
    return float(groups * (d_out**3 + input_cost))
