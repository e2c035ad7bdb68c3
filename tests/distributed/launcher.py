"""Run a function on ``world_size`` forked gloo ranks and collect each rank's result.

Forked children start in ~1 s (no re-import of torch, unlike ``mp.spawn``), which keeps the
whole distributed test set within the suite's time budget on 2 cores. Each child:

* sets one torch thread first (a forked child running an OpenMP op after a parent that
  already used the OpenMP pool hangs; reference/pytorch_conventions.md §12);
* joins a gloo process group through a ``FileStore`` in a fresh temporary directory;
* reports either its (serialised) return value or its own formatted traceback over a queue,
  so a failure names the rank that raised, not a peer's "connection closed".

Children are daemons and are killed on timeout, so a hung collective cannot hang pytest.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import queue as queue_module
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class ForkedRankError(AssertionError):
    """One or more forked ranks raised (or timed out); the message holds every traceback."""


def _child(
    rank: int,
    world_size: int,
    store_path: str,
    fn: Callable[..., Any],
    args: tuple,
    results,
    timeout: float,
) -> None:
    try:
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, buffer.getvalue(), None))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, None, traceback.format_exc()))


def run_forked(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    timeout: float = 90.0,
    grace: float = 10.0,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks.

    Args:
        fn: the per-rank body; the default process group is initialised when it runs.
            Its return value must be ``torch.save``-able (tensors, dicts, lists, numbers).
        world_size: number of ranks (≥ 1).
        args: extra positional arguments for ``fn`` (inherited by fork, never pickled).
        timeout: seconds to wait for all ranks before killing them.
        grace: seconds the surviving ranks get, once one rank died or raised, before they
            are killed (fault-injection tests shorten it).

    Returns:
        ``fn``'s return value of every rank, indexed by rank.

    Raises:
        ForkedRankError: with each failing rank's traceback (or the ranks that timed out).
    """
    # torch.optim.Optimizer.__init__ imports torch._dynamo on first use (5-10 s on a loaded
    # 2-core machine): import it once here so every forked child inherits it.
    import torch._dynamo  # noqa: F401

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="secondorder-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        children = [
            context.Process(
                target=_child,
                args=(rank, world_size, store_path, fn, args, results, timeout),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for child in children:
            child.start()
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        died_at: float | None = None
        try:
            while len(values) + len(errors) < world_size and time.monotonic() < deadline:
                try:
                    rank, payload, error = results.get(timeout=0.2)
                except queue_module.Empty:
                    # A rank that died without reporting (e.g. a signal), or one that raised,
                    # leaves its peers failing fast or hanging: give them a short grace period.
                    if died_at is None and (
                        errors or any(c.exitcode not in (None, 0) for c in children)
                    ):
                        died_at = time.monotonic()
                    if died_at is not None and time.monotonic() - died_at > grace:
                        break
                    continue
                if error is not None:
                    errors[rank] = error
                else:
                    values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        finally:
            for child in children:
                child.join(timeout=5)
                if child.is_alive():
                    child.kill()
                    child.join(timeout=5)
    if errors or len(values) != world_size:
        missing = sorted(set(range(world_size)) - set(values) - set(errors))
        parts = [f"--- rank {rank} ---\n{text}" for rank, text in sorted(errors.items())]
        if missing:
            codes = [children[rank].exitcode for rank in missing]
            parts.append(
                f"ranks {missing} reported nothing (exit codes {codes}; None = hung, killed)"
            )
        raise ForkedRankError("\n".join(parts))
    return [values[rank] for rank in range(world_size)]
