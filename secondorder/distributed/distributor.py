"""Where preconditioner blocks live, and how their updates reach every rank.

An optimizer hands the distributor the ordered list of its blocks' costs; the distributor says
which rank owns each block. Each rank keeps state for, and computes the update of, only its
own blocks; :meth:`Distributor.all_gather_updates` then gives every rank every block's update
so replicas stay identical. At world size 1 everything is owned locally and nothing is
communicated: the same code path, one owner.

Two implementations share one interface:

* :class:`Distributor` — one process (rank 0 owns everything, nothing moves);
* :class:`AllGatherDistributor` — ``torch.distributed`` data parallelism (DDP-style, the
  ZeRO-1-like scheme of distributed_shampoo, Shi et al. 2023 §3): blocks are assigned to
  ranks by cost (LPT), each rank computes only its own blocks, and one flat
  ``all_gather_into_tensor`` per step (per parameter dtype) gives every rank every update,
  exactly (in the blocks' own dtype) unless a lossy ``communication_dtype`` is asked for. A rank may own no
  block (it still takes part in the collective with an empty, padded slice).

Statistics that differ per rank (layer inputs / output gradients captured on each rank's
micro-batch) reach the owner through :meth:`Distributor.gather_to_owners` (concatenate the
per-rank examples, exact) or :meth:`Distributor.reduce_to_owners` (average per-rank
statistics, or sum them with ``op="sum"``). Gradients already all-reduced by DDP need neither.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from secondorder.distributed.collectives import OwnerLayout, all_gather_flat, reduce_scatter_flat

_COMMUNICATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_REDUCE_OPS = ("mean", "sum")


def assign_owners(
    costs: Sequence[float], world_size: int, sizes: Sequence[float] | None = None
) -> list[int]:
    """Deterministic balanced (LPT) assignment of blocks to ranks.

    With ``costs`` only: blocks are taken largest cost first (ties keep list order, which
    comes from param_groups order only) and each goes to the currently least-loaded rank
    (ties to the lowest rank).

    With ``sizes`` too (each block's optimizer-state bytes), both are balanced: each block
    counts as its share of the total cost and of the total size, blocks are taken by the
    larger of their two shares, and each goes to the rank whose larger resulting share,
    ``max(cost share, size share)``, is smallest (ties: the smaller sum of the two, then the
    lowest rank). Compute-heavy blocks then no longer pile up memory on one rank (a
    ``d³`` eigendecomposition cost says little about the ``d²`` state).

    Args:
        costs: one non-negative cost per block, in global block order.
        world_size: number of ranks.
        sizes: optionally one non-negative state size per block.

    Returns:
        The owner rank of every block.
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}")
    if sizes is not None and len(sizes) != len(costs):
        raise ValueError(f"Invalid sizes: {len(sizes)} sizes for {len(costs)} blocks")
    owners = [0] * len(costs)
    if sizes is None:
        loads = [(0.0, rank) for rank in range(world_size)]
        order = sorted(range(len(costs)), key=lambda index: -costs[index])
        for index in order:
            load, rank = heapq.heappop(loads)
            owners[index] = rank
            heapq.heappush(loads, (load + costs[index], rank))
        return owners
    total_cost, total_size = float(sum(costs)) or 1.0, float(sum(sizes)) or 1.0
    shares = [(c / total_cost, b / total_size) for c, b in zip(costs, sizes, strict=True)]
    order = sorted(range(len(costs)), key=lambda index: -max(shares[index]))
    cost_loads, size_loads = [0.0] * world_size, [0.0] * world_size
    for index in order:
        cost, size = shares[index]
        rank = min(
            range(world_size),
            key=lambda r: (
                max(cost_loads[r] + cost, size_loads[r] + size),
                cost_loads[r] + size_loads[r],
                r,
            ),
        )
        owners[index] = rank
        cost_loads[rank] += cost
        size_loads[rank] += size
    return owners


class Distributor:
    """Single-process distributor: every block is owned by rank 0; nothing to communicate."""

    rank: int = 0
    world_size: int = 1

    def assign(self, costs: Sequence[float], sizes: Sequence[float] | None = None) -> list[int]:
        """Owner rank of each block, balancing costs (and state sizes when given; see
        :func:`assign_owners`)."""
        return assign_owners(costs, self.world_size, sizes)

    def all_gather_updates(
        self,
        updates: Sequence[Tensor | None],
        owners: Sequence[int],
        like: Sequence[Tensor | None] | None = None,
    ) -> list[Tensor | None]:
        """Give every rank every block's update.

        Args:
            updates: per block, its update on the owner rank (``None`` where this rank does
                not own it, or where the owner skipped the block this step).
            owners: per block, its owner rank.
            like: per block, a tensor of the block's shape and dtype (e.g. the parameter
                block), or ``None`` where the block takes no part this step on *every* rank
                (its parameter has no gradient). Needed by multi-rank distributors, whose
                non-owners must know what they receive; ignored here.

        Returns:
            Per block, the owner's update (``None`` where the owner skipped the block).
        """
        _check_lengths(updates, owners, like)
        return list(updates)

    def reduce_to_owners(
        self, stats: Sequence[Tensor | None], owners: Sequence[int], op: str = "mean"
    ) -> list[Tensor | None]:
        """Average (or sum) per-rank statistics over ranks, delivered to each block's owner.

        Args:
            stats: per block, this rank's statistic (same shape and dtype on every rank;
                ``None`` where the block has none this step, on every rank).
            owners: per block, its owner rank.
            op: ``"mean"`` (default) or ``"sum"`` over ranks (e.g. sums of per-example
                statistics over data shards, normalised later by a global count).

        Returns:
            Per block, the mean (or sum) over ranks on the owner, ``None`` elsewhere.
        """
        _check_reduce_op(op)
        _check_lengths(stats, owners, None)
        return list(stats)

    def gather_to_owners(
        self, tensors: Sequence[Tensor | None], owners: Sequence[int]
    ) -> list[Tensor | None]:
        """Concatenate per-rank example tensors along dim 0, delivered to each block's owner.

        Args:
            tensors: per block, this rank's ``(N_rank, *rest)`` tensor (``rest`` and dtype equal
                on every rank; ``None`` where the block has none this step, on every rank).
            owners: per block, its owner rank.

        Returns:
            Per block, ``(Σ_rank N_rank, *rest)`` in rank order on the owner; ``None`` elsewhere.
        """
        _check_lengths(tensors, owners, None)
        return list(tensors)

    def scatter_rows_from_owners(
        self,
        values: Sequence[Tensor | None],
        owners: Sequence[int],
        rows: Sequence[Sequence[int]],
        like: Sequence[Tensor],
    ) -> list[Tensor]:
        """The inverse of :meth:`gather_to_owners`: each rank receives its rows of each block.

        Args:
            values: per block, on its owner, the whole ``(Σ_r rows[i][r], *rest)`` tensor
                (``None`` elsewhere).
            owners: per block, its owner rank.
            rows: per block, the number of rows each rank receives (rank order; the owner's
                tensor is cut into consecutive pieces of these sizes).
            like: per block, this rank's destination ``(rows[i][rank], *rest)`` (shape and dtype).

        Returns:
            Per block, this rank's rows (exact: sent in the values' own dtype).
        """
        _check_lengths(values, owners, like)
        return [values[i].narrow(0, 0, rows[i][0]) for i in range(len(values))]

    def all_gather_values(
        self, values: Sequence[Tensor | None], owners: Sequence[int], like: Sequence[Tensor | None]
    ) -> list[Tensor | None]:
        """Like :meth:`all_gather_updates`, but lossless: sent in the ``like`` tensors' dtype.

        For owners' new *parameter values* (``like[i]``: a flat tensor of the block's values
        on every rank, ``None`` where the block is absent everywhere).
        """
        _check_lengths(values, owners, like)
        return list(values)

    def any(self, flag: bool) -> bool:
        """``flag`` OR-ed over ranks."""
        return bool(flag)

    def communication_device(self) -> torch.device:
        """Where tensors handed to the collectives must live (the CPU here)."""
        return torch.device("cpu")


class AllGatherDistributor(Distributor):
    """Data-parallel distributor over a ``torch.distributed`` process group.

    Every rank must call the optimizer step (the collectives are symmetric); the model's
    gradients must already be identical on every rank (DDP's all-reduce, or
    ``torch.distributed.all_reduce`` by hand). Blocks are owned by cost (LPT,
    :func:`assign_owners`); each rank keeps state for its blocks only, and
    :meth:`all_gather_updates` runs one flat all-gather per parameter dtype per step. Every
    rank — the owner included — applies the *gathered* update, so replicas stay bitwise
    identical even with a low-precision ``communication_dtype``.

    Exact by default: updates travel in each block's own dtype (a float64 model's updates in
    float64), which is the dtype the optimizer rounds them to before ``W ← W − lr·U``, so
    the run equals a single-process run bitwise on identical data. Compression is opt-in:
    with ``communication_dtype=d`` every update is rounded to ``d`` before it is sent, a
    relative error per update element of at most the unit roundoff of ``d`` when ``d`` is
    narrower than the block: 2⁻⁸ ≈ 3.9e-3 for ``bfloat16``, 2⁻¹¹ ≈ 4.9e-4 for ``float16``
    (whose range also ends at 65504; larger updates become ``inf``), 2⁻²⁴ ≈ 6e-8 for
    ``float32`` on a float64 model. Measured after 12 float64 Shampoo / SOAP steps on the
    test MLP at 2 ranks (``tests/distributed/test_exactness.py``): parameters off by 5e-9 to
    7e-9 relative with float32 communication, 3e-4 to 6e-4 with bfloat16; the issue measured
    7e-3 to 2e-2 after 20 float32-communicated steps on conv nets, since the errors feed back
    through the preconditioner statistics. Nothing is lost where ``d`` is at least as wide as the block.

    Args:
        process_group: the group to distribute over (``None``: the default group, which must
            be initialised, e.g. by ``torchrun`` + ``init_process_group``).
        communication_dtype: ``None`` (default, exact): each block's own dtype, one flat
            all-gather per parameter dtype; or ``torch.bfloat16`` / ``torch.float16``
            (half the bytes of float32), ``torch.float32``, ``torch.float64``: every update
            rounded to it (one all-gather; lossy where narrower than a block, see above).
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        communication_dtype: torch.dtype | None = None,
    ) -> None:
        if communication_dtype is not None and communication_dtype not in _COMMUNICATION_DTYPES:
            raise ValueError(
                f"Invalid communication_dtype: {communication_dtype} "
                f"(expected one of {_COMMUNICATION_DTYPES} or None)"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "Invalid process_group: torch.distributed is not initialised "
                "(call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        self.process_group = process_group
        self.communication_dtype = communication_dtype
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)

    def all_gather_updates(
        self,
        updates: Sequence[Tensor | None],
        owners: Sequence[int],
        like: Sequence[Tensor | None] | None = None,
    ) -> list[Tensor | None]:
        """Flat all-gathers of every owner's updates (:meth:`Distributor.all_gather_updates`).

        Rank ``r``'s slice holds, per block it owns (global order), a presence flag followed by
        the flattened update (zeros when the owner skipped the block). Returned tensors are
        views of the gathered buffer, shaped like ``like[i]``, in ``like[i]``'s dtype (exact
        mode) or the communication dtype. Exact mode runs one all-gather per distinct dtype
        of the present blocks (one for a model of a single dtype).
        """
        if like is None:
            raise ValueError("Invalid like: AllGatherDistributor needs each block's shape (like=)")
        _check_lengths(updates, owners, like)
        present = [block for block in like if block is not None]
        if not present:
            return [None] * len(updates)
        if self.communication_dtype is not None:
            return self._gather(updates, owners, like, self.communication_dtype)
        result: list[Tensor | None] = [None] * len(updates)
        for dtype in sorted({block.dtype for block in present}, key=str):
            chosen = [block is not None and block.dtype == dtype for block in like]
            gathered = self._gather(
                [u if keep else None for u, keep in zip(updates, chosen, strict=True)],
                owners,
                [b if keep else None for b, keep in zip(like, chosen, strict=True)],
                dtype,
            )
            for index, keep in enumerate(chosen):
                if keep:
                    result[index] = gathered[index]
        return result

    def all_gather_values(
        self, values: Sequence[Tensor | None], owners: Sequence[int], like: Sequence[Tensor | None]
    ) -> list[Tensor | None]:
        """One flat all-gather in the promoted dtype of ``like`` (lossless for parameter values)."""
        _check_lengths(values, owners, like)
        present = [block for block in like if block is not None]
        if not present:
            return [None] * len(values)
        dtype = present[0].dtype
        for block in present:
            dtype = torch.promote_types(dtype, block.dtype)
        return self._gather(values, owners, like, dtype)

    def any(self, flag: bool) -> bool:
        """``flag`` OR-ed over ranks (one all-reduce of one element)."""
        if self.world_size == 1:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(value.item() > 0)

    def communication_device(self) -> torch.device:
        """Where tensors handed to the collectives must live: the current CUDA device under
        NCCL (which moves CUDA tensors only), else the CPU."""
        return self._device()

    def _device(self) -> torch.device:
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _gather(
        self,
        updates: Sequence[Tensor | None],
        owners: Sequence[int],
        like: Sequence[Tensor | None],
        dtype: torch.dtype,
    ) -> list[Tensor | None]:
        present = [block for block in like if block is not None]
        layout = OwnerLayout.build(
            owners, [None if b is None else b.numel() for b in like], self.world_size, header=True
        )
        local = torch.zeros(max(layout.slice_size, 1), dtype=dtype, device=present[0].device)
        for index, (update, owner) in enumerate(zip(updates, owners, strict=False)):
            if owner != self.rank or like[index] is None or update is None:
                continue
            start, numel = layout.offsets[index], layout.numels[index]
            local[start] = 1
            local[start + 1 : start + 1 + numel].copy_(update.reshape(-1))
        gathered = all_gather_flat(local, self.world_size, self.process_group).view(
            self.world_size, -1
        )
        flags = (
            gathered[
                torch.tensor(owners, dtype=torch.long, device=gathered.device),
                torch.tensor(
                    [max(o, 0) for o in layout.offsets], dtype=torch.long, device=gathered.device
                ),
            ].tolist()
            if owners
            else []
        )
        result: list[Tensor | None] = []
        for index, block in enumerate(like):
            if block is None or flags[index] == 0:
                result.append(None)
                continue
            start = layout.offsets[index] + 1
            result.append(
                gathered[owners[index], start : start + layout.numels[index]].view(block.shape)
            )
        return result

    def reduce_to_owners(
        self, stats: Sequence[Tensor | None], owners: Sequence[int], op: str = "mean"
    ) -> list[Tensor | None]:
        """One flat reduce-scatter: the mean (``op="sum"``: the sum) over ranks lands on each
        block's owner. Reduced in the statistics' dtype promoted with float32 (float64 stays
        float64)."""
        _check_reduce_op(op)
        _check_lengths(stats, owners, None)
        present = [s for s in stats if s is not None]
        if not present:
            return [None] * len(stats)
        dtype = torch.promote_types(present[0].dtype, torch.float32)
        for tensor in present:
            dtype = torch.promote_types(dtype, tensor.dtype)
        layout = OwnerLayout.build(
            owners, [None if s is None else s.numel() for s in stats], self.world_size
        )
        size = max(layout.slice_size, 1)
        full = torch.zeros(self.world_size, size, dtype=dtype, device=present[0].device)
        for index, tensor in enumerate(stats):
            if tensor is not None:
                start = layout.offsets[index]
                full[owners[index], start : start + layout.numels[index]].copy_(tensor.reshape(-1))
        mine = reduce_scatter_flat(full.view(-1), self.world_size, self.process_group)
        if op == "mean":
            mine = mine.div_(self.world_size)
        result: list[Tensor | None] = []
        for index, tensor in enumerate(stats):
            if tensor is None or owners[index] != self.rank:
                result.append(None)
                continue
            start = layout.offsets[index]
            result.append(
                mine[start : start + layout.numels[index]].view(tensor.shape).to(tensor.dtype)
            )
        return result

    def gather_to_owners(
        self, tensors: Sequence[Tensor | None], owners: Sequence[int]
    ) -> list[Tensor | None]:
        """Per dtype: one all-gather of leading sizes, then one ``all_to_all_single`` to owners."""
        _check_lengths(tensors, owners, None)
        result: list[Tensor | None] = [None] * len(tensors)
        dtypes = sorted({t.dtype for t in tensors if t is not None}, key=str)
        for dtype in dtypes:
            indices = [i for i, t in enumerate(tensors) if t is not None and t.dtype == dtype]
            for index, tensor in zip(
                indices,
                self._gather_same_dtype(
                    [tensors[i] for i in indices], [owners[i] for i in indices]
                ),
                strict=False,
            ):
                result[index] = tensor
        return result

    def scatter_rows_from_owners(
        self,
        values: Sequence[Tensor | None],
        owners: Sequence[int],
        rows: Sequence[Sequence[int]],
        like: Sequence[Tensor],
    ) -> list[Tensor]:
        """Per dtype: one ``all_to_all_single`` from the owners to every rank
        (:meth:`Distributor.scatter_rows_from_owners`)."""
        _check_lengths(values, owners, like)
        result: list[Tensor | None] = [None] * len(like)
        for dtype in sorted({t.dtype for t in like}, key=str):
            indices = [i for i, t in enumerate(like) if t.dtype == dtype]
            pieces = self._scatter_same_dtype(values, owners, rows, like, indices)
            for index, tensor in zip(indices, pieces, strict=True):
                result[index] = tensor
        return result

    # -- helpers ----------------------------------------------------------------------------
    def _scatter_same_dtype(
        self,
        values: Sequence[Tensor | None],
        owners: Sequence[int],
        rows: Sequence[Sequence[int]],
        like: Sequence[Tensor],
        indices: list[int],
    ) -> list[Tensor]:
        mine = [i for i in indices if owners[i] == self.rank]
        starts = {i: [sum(rows[i][:r]) for r in range(self.world_size)] for i in mine}
        send = [
            values[i].narrow(0, starts[i][target], rows[i][target]).reshape(-1)
            for target in range(self.world_size)
            for i in mine
        ]
        send_splits = [
            sum(rows[i][target] * _row_numel(like[i]) for i in mine) for target in range(self.world_size)
        ]
        receive_splits = [
            sum(rows[i][self.rank] * _row_numel(like[i]) for i in indices if owners[i] == source)
            for source in range(self.world_size)
        ]
        device, dtype = like[indices[0]].device, like[indices[0]].dtype
        payload = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
        output = torch.empty(sum(receive_splits), dtype=dtype, device=device)
        dist.all_to_all_single(output, payload, receive_splits, send_splits, group=self.process_group)
        received: dict[int, Tensor] = {}
        cursor = 0
        for source in range(self.world_size):
            for i in indices:
                if owners[i] == source:
                    count = rows[i][self.rank] * _row_numel(like[i])
                    received[i] = output[cursor : cursor + count].view(like[i].shape)
                    cursor += count
        return [received[i] for i in indices]

    def _gather_same_dtype(self, tensors: list[Tensor], owners: list[int]) -> list[Tensor | None]:
        device = tensors[0].device
        leading = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long, device=device)
        sizes = (
            all_gather_flat(leading, self.world_size, self.process_group)
            .view(self.world_size, -1)
            .tolist()
        )
        rows = [_row_numel(t) for t in tensors]
        send = [
            t.reshape(-1)
            for owner in range(self.world_size)
            for t, o in zip(tensors, owners, strict=False)
            if o == owner
        ]
        send_splits = [
            sum(t.numel() for t, o in zip(tensors, owners, strict=False) if o == owner)
            for owner in range(self.world_size)
        ]
        mine = [i for i, o in enumerate(owners) if o == self.rank]
        receive_splits = [
            sum(sizes[source][i] * rows[i] for i in mine) for source in range(self.world_size)
        ]
        output = torch.empty(sum(receive_splits), dtype=tensors[0].dtype, device=device)
        payload = torch.cat(send) if send else torch.empty(0, dtype=tensors[0].dtype, device=device)
        if self.world_size == 1:
            output = payload
        else:
            dist.all_to_all_single(
                output, payload, receive_splits, send_splits, group=self.process_group
            )
        pieces: dict[int, list[Tensor]] = {i: [] for i in mine}
        cursor = 0
        for source in range(self.world_size):
            for i in mine:
                count = sizes[source][i] * rows[i]
                pieces[i].append(
                    output[cursor : cursor + count].view(sizes[source][i], *tensors[i].shape[1:])
                )
                cursor += count
        return [torch.cat(pieces[i]) if i in pieces else None for i in range(len(tensors))]


def resolve_distributor(distributor: Distributor | dist.ProcessGroup | bool | None) -> Distributor:
    """The ``distributor=`` argument every optimizer of the suite accepts, resolved.

    Args:
        distributor: ``None`` / ``False``: one process (:class:`Distributor`); ``True``: an
            :class:`AllGatherDistributor` over the default process group; a
            ``ProcessGroup``: an :class:`AllGatherDistributor` over it; a
            :class:`Distributor` instance: used as is.

    Returns:
        The distributor the optimizer keeps as ``optimizer.distributor``.
    """
    if distributor is None or distributor is False:
        return Distributor()
    if distributor is True:
        return AllGatherDistributor()
    if isinstance(distributor, Distributor):
        return distributor
    if dist.is_available() and isinstance(distributor, dist.ProcessGroup):
        return AllGatherDistributor(process_group=distributor)
    raise TypeError(
        f"Invalid distributor: expected None, a bool, a ProcessGroup or a Distributor, "
        f"got {type(distributor).__name__}"
    )


def _row_numel(tensor: Tensor) -> int:
    """Elements per dim-0 row of ``tensor``."""
    return math.prod(tensor.shape[1:])


def _check_reduce_op(op: str) -> None:
    if op not in _REDUCE_OPS:
        raise ValueError(f"Invalid op: {op!r} (expected one of {_REDUCE_OPS})")


def _check_lengths(values: Sequence, owners: Sequence[int], like: Sequence | None) -> None:
    if len(values) != len(owners):
        raise ValueError(f"Invalid owners: {len(owners)} owners for {len(values)} blocks")
    if like is not None and len(like) != len(owners):
        raise ValueError(f"Invalid like: {len(like)} entries for {len(owners)} blocks")
