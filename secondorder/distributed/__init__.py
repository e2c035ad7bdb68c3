"""Blocks and their distribution over ranks (DESIGN.md, "Blocks and distribution").

* :mod:`~secondorder.distributed.blocking` — cutting parameters into blocks;
* :mod:`~secondorder.distributed.distributor` — owner assignment and the per-step
  collectives (:class:`Distributor` for one process, :class:`AllGatherDistributor` for
  ``torchrun`` data parallelism);
* :mod:`~secondorder.distributed.ownership` — layer ownership for the capture-based optimizers,
  and :mod:`~secondorder.distributed.state_gather` — every layer's state on every rank
  (influence factors from a distributed EK-FAC);
* :mod:`~secondorder.distributed.elastic` — joining the process group under ``torchrun`` so
  that restarts reconnect and lost or frozen peers end in bounded time;
* :mod:`~secondorder.distributed.full_view` / :mod:`~secondorder.distributed.sharding` —
  FSDP2 (DTensor) parameters: owner views (each parameter whole on its owner only: the
  capture optimizers' layers, lossless Shampoo's parameters), full views for other layouts,
  per-shard state for Shampoo's ``fsdp_mode="local_shard"``, and
  :mod:`~secondorder.distributed.fsdp_shampoo` — Shampoo's two FSDP2 modes;
* :mod:`~secondorder.distributed.checkpoint` — DCP save/load with resharding, and
  :mod:`~secondorder.distributed.checkpoint_files` — atomic commits, completion markers,
  newest-complete lookup, pruning and preflight checks.

Every optimizer of the suite takes ``distributor=`` (see :func:`resolve_distributor`)::

    torch.distributed.init_process_group()          # under torchrun
    model = DDP(model)
    optimizer = secondorder.Shampoo(model.parameters(), lr=1e-3, distributor=True)
"""

from secondorder.distributed.checkpoint import (
    CheckpointError,
    RNGStates,
    check_checkpoint_dir,
    checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from secondorder.distributed.distributor import (
    AllGatherDistributor,
    Distributor,
    assign_owners,
    resolve_distributor,
)

__all__ = [
    "AllGatherDistributor",
    "CheckpointError",
    "Distributor",
    "RNGStates",
    "assign_owners",
    "check_checkpoint_dir",
    "checkpoint_bytes",
    "latest_checkpoint",
    "load_checkpoint",
    "resolve_distributor",
    "save_checkpoint",
]
