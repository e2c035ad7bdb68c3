"""Checkpoint directories that are complete or absent: atomic commit, markers, pruning, preflight.

A save never writes into the directory it names. Every rank writes its DCP files into a
sibling ``.<name>.partial``; when all ranks are done (a barrier), rank 0 writes a completion
marker (:data:`MARKER`, JSON: the step, world size, and every file with its size), fsyncs
it, and renames the partial directory into place (``os.replace`` — atomic on POSIX, after
which the parent directory is fsynced). A checkpoint that already exists under the name is
first renamed aside to ``.<name>.old`` and removed only once the new one is in place.

So a rank killed at any moment of a save leaves either the previous checkpoint or the new
one, each complete, and possibly hidden debris: loading goes by the marker, never by the
directory name. :func:`latest_checkpoint` picks the complete checkpoint with the largest
step (ties: the latest commit), hidden ones included — a save killed between its two renames
leaves the old checkpoint as ``.<name>.old`` and the new complete one as ``.<name>.partial``.
Debris is removed by the next save's pruning (:func:`prune_checkpoints`).

Why not DCP's own ``.metadata`` as the marker: it is written by the coordinator while other
ranks may still be flushing, and a save *over* an existing directory leaves the old
``.metadata`` beside half-rewritten data — which loads silently as a mix of two runs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from typing import Any

MARKER = "COMPLETE.json"
_PARTIAL = ".partial"
_OLD = ".old"
_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the cause."""


def partial_path(checkpoint_dir: str) -> str:
    """The hidden sibling every rank writes into before the commit."""
    parent, name = os.path.split(os.path.abspath(checkpoint_dir))
    return os.path.join(parent, f".{name}{_PARTIAL}")


def _old_path(checkpoint_dir: str) -> str:
    parent, name = os.path.split(os.path.abspath(checkpoint_dir))
    return os.path.join(parent, f".{name}{_OLD}")


def prepare(checkpoint_dir: str) -> str:
    """Rank 0, before the ranks write: a fresh, empty partial directory (stale ones removed)."""
    staging = partial_path(checkpoint_dir)
    if os.path.lexists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


def commit(checkpoint_dir: str, step: int | None, world_size: int) -> None:
    """Rank 0, after every rank has written: marker, fsync, rename into place.

    Args:
        checkpoint_dir: the final path.
        step: the training step the checkpoint holds (orders checkpoints; ``None``: unknown).
        world_size: ranks that wrote it.
    """
    staging = partial_path(checkpoint_dir)
    files = {}
    for name in sorted(os.listdir(staging)):
        path = os.path.join(staging, name)
        if os.path.isfile(path):
            _fsync_file(path)
            files[name] = os.path.getsize(path)
    marker = {
        "format": _FORMAT,
        "step": step,
        "world_size": world_size,
        "committed_ns": time.time_ns(),
        "files": files,
    }
    temporary = os.path.join(staging, MARKER + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(marker, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(staging, MARKER))
    _fsync_dir(staging)
    final = os.path.abspath(checkpoint_dir)
    old = _old_path(final)
    if os.path.lexists(final):
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(os.path.dirname(final))
    if os.path.lexists(old):
        shutil.rmtree(old)


def read_marker(checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The completion marker of ``checkpoint_dir`` if it is complete and intact, else ``None``.

    Intact: every file the marker lists exists with the recorded size (a truncated or
    deleted shard makes the checkpoint incomplete).
    """
    path = os.fspath(checkpoint_dir)
    try:
        with open(os.path.join(path, MARKER)) as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _FORMAT:
        return None
    for name, size in marker.get("files", {}).items():
        try:
            if os.path.getsize(os.path.join(path, name)) != size:
                return None
        except OSError:
            return None
    return marker


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """Every complete checkpoint directly under ``root``, oldest first (by step, then commit)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            marker = read_marker(path)
            if marker is not None:
                found.append((path, marker))
    found.sort(key=lambda item: (_step_key(item[1]), item[1]["committed_ns"]))
    return found


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The newest complete checkpoint directly under ``root`` (``None`` if there is none).

    Newest: the largest recorded step, ties broken by commit time. Interrupted saves
    (no marker, or a listed file missing or truncated) are never returned.
    """
    found = complete_checkpoints(root)
    return found[-1][0] if found else None


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[str]:
    """Rank 0 after a commit: keep the ``keep_last`` newest complete checkpoints under ``root``.

    Older complete checkpoints and the hidden debris of interrupted saves (``.<name>.partial``,
    ``.<name>.old``) are removed; other files and directories are left alone.

    Returns:
        The removed paths.
    """
    if keep_last < 1:
        raise ValueError(f"Invalid keep_last: {keep_last} (expected an integer >= 1)")
    root = os.fspath(root)
    complete = complete_checkpoints(root)
    doomed = [path for path, _ in complete[:-keep_last]]
    kept = {path for path, _ in complete[-keep_last:]}
    for name in os.listdir(root):
        path = os.path.join(root, name)
        hidden_debris = name.startswith(".") and name.endswith((_PARTIAL, _OLD))
        if hidden_debris and path not in kept and os.path.isdir(path):
            doomed.append(path)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def check_writable(root: str | os.PathLike, required_bytes: int = 0) -> None:
    """Raise a :class:`CheckpointError` naming the cause unless ``root`` can take a checkpoint.

    Creates ``root`` if needed, writes, fsyncs and removes a probe file, and compares the free
    space with ``required_bytes`` (e.g. :func:`~secondorder.distributed.checkpoint.checkpoint_bytes`).
    """
    root = os.fspath(root)
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as handle:
            handle.write(b"0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        os.remove(probe)
    except OSError as error:
        raise CheckpointError(f"checkpoint directory {root!r} is not writable: {describe(error, root)}") from error
    free = shutil.disk_usage(root).free
    if free < required_bytes:
        raise CheckpointError(
            f"checkpoint directory {root!r}: no space for a checkpoint "
            f"(needs about {_mib(required_bytes)}, {_mib(free)} free)"
        )


def describe(error: BaseException, directory: str) -> str:
    """The cause of a failed write in words: no space, read-only, permission, or the error."""
    for item in _chain(error):
        if isinstance(item, OSError) and item.errno is not None:
            if item.errno in (errno.ENOSPC, errno.EDQUOT):
                return f"no space left on the device ({item})"
            if item.errno == errno.EROFS:
                return f"read-only file system ({item})"
            if item.errno in (errno.EACCES, errno.EPERM):
                return f"permission denied ({item})"
            return str(item)
    # torch.save reports a full disk without errno ("unexpected pos ..."): look at the disk.
    probe = directory if os.path.isdir(directory) else os.path.dirname(directory) or "."
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"no space left on the device ({_mib(free)} free; the writer said: {error})"
    if not os.access(probe, os.W_OK):
        return f"read-only or not writable ({error})"
    return str(error)


def _chain(error: BaseException) -> list[BaseException]:
    """``error``, its causes and contexts, and the per-rank failures of a DCP exception."""
    seen, stack, out = set(), [error], []
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        out.append(item)
        stack += [item.__cause__, item.__context__]
        for failure in getattr(item, "failures", {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return out


def _step_key(marker: dict[str, Any]) -> int:
    step = marker.get("step")
    return -1 if step is None else int(step)


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
