"""Joining the process group under ``torchrun`` so that restarts work and hangs end.

:func:`init_process_group` is ``torch.distributed.init_process_group`` with two fixes for jobs
that must survive a lost rank:

* **Restarts.** ``torchrun --max-restarts=N`` restarts every rank after one fails. On torch
  2.13 (``--standalone`` / c10d rendezvous) the agent shares one TCP store with all attempts,
  so a restarted gloo rank reads its peers' *previous* addresses there and fails to connect
  (``Gloo connectFullMesh failed ... Connection refused``), or waits forever. Here each
  attempt uses its own key prefix (``TORCHELASTIC_RESTART_COUNT``) in the agent's store.
  (Launching with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` also avoids it: the agent then
  builds a fresh store per attempt.)
* **Bounded waits.** ``timeout`` bounds every collective: when a peer is killed its
  connections close and the survivors fail at once; when a peer freezes (stopped,
  deadlocked) they fail after ``timeout`` instead of torch's default 30 minutes.
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

__all__ = ["init_process_group", "is_peer_failure"]


def init_process_group(backend: str, timeout: float = 300.0) -> None:
    """Join the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``).

    Args:
        backend: ``"gloo"`` or ``"nccl"``.
        timeout: seconds any collective waits for its peers before raising.
    """
    if timeout <= 0:
        raise ValueError(f"Invalid timeout: {timeout} (expected seconds > 0)")
    limit = datetime.timedelta(seconds=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend, timeout=limit)
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    world_size = int(os.environ["WORLD_SIZE"])
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=limit,
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"secondorder_attempt_{attempt}", agent_store),
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=limit,
    )


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because a peer rank died or stalled."""
    text = str(error).lower()
    markers = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")
    return isinstance(error, RuntimeError) and any(marker in text for marker in markers)
