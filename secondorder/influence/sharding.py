"""How influence fitting splits its work over ranks, through the suite's distributor.

Under ``torch.distributed`` every rank fits a contiguous shard of the data
(:func:`~secondorder.influence.collect.shard`); what follows is per tracked layer, and each layer
has one **owner** rank, chosen by :meth:`~secondorder.distributed.distributor.Distributor.assign`
(LPT on the eigendecomposition cost ``groups·(d_out³ + d_in'³)``, ties in tracked-module order,
so every rank computes the same owners):

* :meth:`LayerSharding.reduce`: the per-rank sums of every layer reach its owner, summed over
  ranks in float64 (one flat ``reduce_to_owners(..., op="sum")``);
* the owner alone does the layer's per-layer work (the eigendecomposition);
* :meth:`LayerSharding.gather`: every owner's results reach every rank (one flat, lossless
  ``all_gather_values`` in float64), since scoring and the eigenvalue correction need every
  layer everywhere.

With one process (the plain :class:`~secondorder.distributed.distributor.Distributor`) rank 0
owns every layer and nothing is copied or communicated. Scoring
(:mod:`~secondorder.influence.scores`) shards the training examples the same way and gathers
the scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from secondorder.distributed.distributor import (
    AllGatherDistributor,
    Distributor,
    resolve_distributor,
)
from secondorder.precond.capture_layers import CapturedLayer

__all__ = ["LayerSharding", "eigendecomposition_cost", "influence_distributor"]

Layers = dict[str, dict[str, Tensor]]


def influence_distributor(
    distributor: Distributor | torch.distributed.ProcessGroup | bool | None,
) -> Distributor:
    """The ``distributor=`` argument of ``fit_factors`` and of the scoring functions, resolved.

    ``None`` distributes over the default process group when ``torch.distributed`` is
    initialised with more than one rank (so a script under ``torchrun`` shards its fit without
    being told), else one process; anything else as
    :func:`~secondorder.distributed.distributor.resolve_distributor` (``False``: this process
    fits alone, even under ``torchrun``).
    """
    if distributor is None:
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        if initialised and torch.distributed.get_world_size() > 1:
            return AllGatherDistributor()
        return Distributor()
    return resolve_distributor(distributor)


def eigendecomposition_cost(layer: CapturedLayer) -> float:
    """``groups · (d_out³ + d_in'³)`` flops-ish of one layer's ``eigh`` calls (an embedding's
    activation factor is diagonal: no ``eigh``)."""
    cubic_in = 0 if layer.kind == "embedding" else layer.in_features**3
    return float(layer.groups * (layer.out_features**3 + cubic_in))


class LayerSharding:
    """Owners of the tracked layers and the two collectives that move their tensors.

    Args:
        distributor: the resolved distributor (its ``rank`` / ``world_size`` also decide the
            data shard of this rank).
        layers: the tracked layers, in the model's order (equal on every rank).

    Attributes:
        names: the layer names, in order.
        owners: per layer, its owner rank.
    """

    def __init__(self, distributor: Distributor, layers: Sequence[CapturedLayer]) -> None:
        self.distributor = distributor
        self.rank, self.world_size = distributor.rank, distributor.world_size
        self.names = [layer.name for layer in layers]
        self.owners = distributor.assign([eigendecomposition_cost(layer) for layer in layers])

    def owned(self) -> list[str]:
        """The names of the layers this rank owns (in model order; may be empty)."""
        pairs = zip(self.names, self.owners, strict=True)
        return [name for name, owner in pairs if owner == self.rank]

    def barrier(self) -> None:
        """Wait for every rank (any collective synchronises: the distributor's ``any``)."""
        self.distributor.any(False)

    def everywhere(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (ranks that must take one branch together)."""
        return not self.distributor.any(not flag)

    def reduce(self, sums: Mapping[str, Mapping[str, Tensor]]) -> Layers:
        """Sum every layer's per-rank tensors over ranks, onto its owner.

        Args:
            sums: ``{layer: {tensor name: this rank's sum}}`` for every layer (shapes equal
                on every rank).

        Returns:
            ``{layer: {tensor name: Σ_ranks}}`` for the layers this rank owns, in each tensor's
            dtype; the sum itself runs in float64 (as a float64 ``all_reduce`` would).
        """
        if self.world_size == 1:
            return {name: dict(tensors) for name, tensors in sums.items()}
        device = self.distributor.communication_device()
        flat = [_pack(sums[name], sums[name], device) for name in self.names]
        reduced = self.distributor.reduce_to_owners(flat, self.owners, op="sum")
        return {
            name: _unpack(values, sums[name])
            for name, values in zip(self.names, reduced, strict=True)
            if values is not None
        }

    def gather(
        self, owned: Mapping[str, Mapping[str, Tensor]], like: Mapping[str, Mapping[str, Tensor]]
    ) -> Layers:
        """Give every rank every layer's tensors, each from the layer's owner.

        Args:
            owned: ``{layer: {tensor name: tensor}}`` for (at least) the layers this rank owns.
            like: for every layer, ``{tensor name: a tensor of its shape and dtype}`` (e.g. on
                the ``meta`` device), equal on every rank; it fixes the names and the order.

        Returns:
            ``{layer: {tensor name: tensor}}`` for every layer, on the CPU, in ``like``'s
            dtypes. Sent in float64, so every dtype up to float64 arrives unchanged.
        """
        if self.world_size == 1:
            return {name: {key: owned[name][key] for key in like[name]} for name in self.names}
        device = self.distributor.communication_device()
        values = [
            _pack(owned[name], like[name], device) if owner == self.rank else None
            for name, owner in zip(self.names, self.owners, strict=True)
        ]
        # The distributor reads only shape, dtype and device from ``like``: a zero-stride
        # view gives it those without allocating each layer's size.
        shapes = [
            torch.zeros((), dtype=torch.float64, device=device).expand(_numel(like[name]))
            for name in self.names
        ]
        gathered = self.distributor.all_gather_values(values, self.owners, shapes)
        return {
            name: _unpack(flat, like[name]) for name, flat in zip(self.names, gathered, strict=True)
        }


def _numel(tensors: Mapping[str, Tensor]) -> int:
    return sum(tensor.numel() for tensor in tensors.values())


def _pack(
    tensors: Mapping[str, Tensor], like: Mapping[str, Tensor], device: torch.device
) -> Tensor:
    """``like``'s tensors of ``tensors``, flattened into one float64 vector on ``device``."""
    return torch.cat(
        [tensors[key].reshape(-1).to(device=device, dtype=torch.float64) for key in like]
    )


def _unpack(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split :func:`_pack`'s vector back into ``like``'s shapes and dtypes (own CPU copies,
    so no result keeps the communication buffer alive or shares its storage)."""
    result, start = {}, 0
    for key, template in like.items():
        count = template.numel()
        result[key] = (
            flat[start : start + count]
            .reshape(template.shape)
            .to(device="cpu", dtype=template.dtype, copy=True)
        )
        start += count
    return result
