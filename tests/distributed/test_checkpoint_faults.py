"""Checkpoints that survive faults: atomic commits, newest-complete loading, pruning, causes.

The kill tests run 2 forked gloo ranks and SIGKILL one of them (``os.kill(getpid(), SIGKILL)``,
a real kill: no Python cleanup runs) at a chosen point of ``save_checkpoint``: in the middle of
its own DCP data file, or on rank 0 inside the commit (before the marker, between the two
renames of an overwrite). Whatever the point, the folder then holds complete checkpoints
only, and loading gives bitwise the parameters of one save — never a mix.
"""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch

from secondorder.distributed import checkpoint_files
from secondorder.distributed.checkpoint import (
    CheckpointError,
    RNGStates,
    check_checkpoint_dir,
    checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from secondorder.optimizers.ekfac import EKFAC
from secondorder.optimizers.shampoo import Shampoo
from tests.distributed.launcher import ForkedRankError, run_forked
from tests.distributed.training import make_batches, make_model, parameters_of, train, wrap_ddp

pytestmark = pytest.mark.distributed

F64 = torch.float64


def _build(name: str, world_size: int):
    model = make_model(dtype=F64)
    if name == "EKFAC":
        optimizer = EKFAC(
            model.parameters(), model=model, lr=1e-2, stats_every=1, precondition_frequency=2,
            distributor=world_size > 1,
        )
    else:
        optimizer = Shampoo(
            model.parameters(), lr=1e-2, precondition_frequency=2, max_preconditioner_dim=8,
            distributor=world_size > 1,
        )
    return model, (wrap_ddp(model) if world_size > 1 else model), optimizer


# -- the commit protocol, one process ---------------------------------------------------------
def _save_one(root, name: str, step: int, keep_last=None):
    model, wrapped, optimizer = _build("Shampoo", 1)
    train(wrapped, optimizer, make_batches(step, F64))
    path = save_checkpoint(os.path.join(root, name), wrapped, optimizer,
                           extra={"step": torch.tensor(step)}, keep_last=keep_last)
    return path, parameters_of(model)


def test_commit_writes_a_marker_and_no_debris(tmp_path):
    path, _ = _save_one(tmp_path, "step_2", 2)
    assert sorted(os.listdir(tmp_path)) == ["step_2"]
    marker = json.loads((tmp_path / "step_2" / checkpoint_files.MARKER).read_text())
    assert marker["step"] == 2 and marker["world_size"] == 1
    assert set(marker["files"]) == {f for f in os.listdir(path) if f != checkpoint_files.MARKER}


def test_latest_skips_interrupted_and_truncated_saves(tmp_path):
    _save_one(tmp_path, "step_2", 2)
    newer, _ = _save_one(tmp_path, "step_3", 3)
    assert latest_checkpoint(tmp_path) == newer
    # A save that never committed: data and DCP metadata, no marker.
    (tmp_path / "step_9").mkdir()
    (tmp_path / "step_9" / ".metadata").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == newer
    # A committed checkpoint whose data file was truncated afterwards is incomplete too.
    data = next(f for f in os.listdir(newer) if f.endswith(".distcp"))
    with open(os.path.join(newer, data), "r+b") as handle:
        handle.truncate(10)
    assert latest_checkpoint(tmp_path).endswith("step_2")
    model, _, optimizer = _build("Shampoo", 1)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "step_9", model, optimizer)


def test_overwrite_replaces_only_when_complete_and_keep_last_prunes(tmp_path):
    _save_one(tmp_path, "step_1", 1)
    _save_one(tmp_path, "step_2", 2)
    (tmp_path / ".step_5.partial").mkdir()  # debris of an interrupted save
    (tmp_path / "notes.txt").write_text("kept")
    path, params = _save_one(tmp_path, "step_2", 3, keep_last=1)  # overwrite + prune
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "step_2"]
    model, _, optimizer = _build("Shampoo", 1)
    extra = load_checkpoint(tmp_path, model, optimizer, extra={"step": torch.tensor(0)})
    assert int(extra["step"]) == 3
    for got, want in zip(parameters_of(model), params, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Invalid keep_last"):
        _save_one(tmp_path, "step_4", 1, keep_last=0)


def test_preflight_names_the_cause(tmp_path):
    check_checkpoint_dir(tmp_path / "new")  # created, writable
    assert (tmp_path / "new").is_dir()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(CheckpointError, match="not writable"):
        check_checkpoint_dir(tmp_path / "a_file")
    with pytest.raises(CheckpointError, match="no space for a checkpoint"):
        check_checkpoint_dir(tmp_path, required_bytes=1 << 62)
    model, wrapped, optimizer = _build("Shampoo", 1)
    before = checkpoint_bytes(model, optimizer)
    train(wrapped, optimizer, make_batches(2, F64))
    assert checkpoint_bytes(model, optimizer) > before > 0


@pytest.mark.parametrize(
    ("raised", "cause"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
         "no space left"),
    ],
)
def test_failed_save_names_the_cause_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, raised, cause):
    _, params = _save_one(tmp_path, "step_1", 1)

    def failing_write(*args, **kwargs):
        raise raised

    monkeypatch.setattr("torch.distributed.checkpoint.filesystem._write_item", failing_write)
    if isinstance(raised, RuntimeError):  # torch.save's full-disk error carries no errno
        usage = checkpoint_files.shutil.disk_usage(tmp_path)
        monkeypatch.setattr(checkpoint_files.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(CheckpointError, match=cause):
        _save_one(tmp_path, "step_2", 2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).endswith("step_1")
    model, _, optimizer = _build("Shampoo", 1)
    load_checkpoint(tmp_path, model, optimizer)
    for got, want in zip(parameters_of(model), params, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- extra Stateful objects ------------------------------------------------------------------
class DataPosition:
    """A data loader's position: a ``Stateful`` with a Python int."""

    def __init__(self, index: int = 0) -> None:
        self.index = index

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def _stateful_body(rank: int, world_size: int, root: str) -> dict:
    model, wrapped, optimizer = _build("Shampoo", world_size)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    train(wrapped, optimizer, make_batches(3, F64), same_data=False)
    for _ in range(3):
        scheduler.step()
    torch.manual_seed(100 + rank)  # a different random stream per rank
    extras = {"scheduler": scheduler, "data": DataPosition(3 * 16), "rng": RNGStates()}
    save_checkpoint(os.path.join(root, "step_3"), wrapped, optimizer, extra=extras, step=3)
    expected_draw = torch.rand(3)
    model, wrapped, optimizer = _build("Shampoo", world_size)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    position = DataPosition()
    torch.manual_seed(0)
    load_checkpoint(root, wrapped, optimizer,
                    extra={"scheduler": scheduler, "data": position, "rng": RNGStates()})
    return {
        "lr": optimizer.param_groups[0]["lr"],
        "epoch": scheduler.last_epoch,
        "index": position.index,
        "draw_matches": bool(torch.equal(torch.rand(3), expected_draw)),
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_scheduler_data_position_and_rng_states_round_trip(tmp_path, world_size):
    for out in run_forked(_stateful_body, world_size, args=(str(tmp_path),)):
        assert out == {"lr": 1e-2 * 0.5, "epoch": 3, "index": 48, "draw_matches": True}


# -- real SIGKILLs during a save, 2 ranks ------------------------------------------------------
def _arm_kill(point: str, rank: int) -> None:
    """Make this process SIGKILL itself at ``point`` of the next save."""
    import torch.distributed.checkpoint.filesystem as filesystem

    if point == "rank1_mid_data" and rank == 1:
        original = filesystem._write_item
        calls = [0]

        def write_then_die(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:  # two items written, the file half done
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        filesystem._write_item = write_then_die
    elif point.startswith("rank0_commit_") and rank == 0:
        # commit's os.replace calls: 1 marker into place, 2 old checkpoint aside, 3 new into place.
        fatal = {"rank0_commit_before_marker": 1, "rank0_commit_between_renames": 3}[point]
        original_replace = os.replace
        calls = [0]

        def replace_or_die(source, target):
            calls[0] += 1
            if calls[0] == fatal:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_replace(source, target)

        checkpoint_files.os.replace = replace_or_die


def _killed_save_body(rank: int, world_size: int, root: str, name: str, point: str, target: str):
    model, wrapped, optimizer = _build(name, world_size)
    batches = make_batches(8, F64)
    train(wrapped, optimizer, batches[:4], same_data=False)
    save_checkpoint(os.path.join(root, "step_4"), wrapped, optimizer, step=4)
    if rank == 0:
        torch.save(parameters_of(model), os.path.join(root, "params_4.pt"))
    train(wrapped, optimizer, batches[4:], same_data=False)
    if rank == 0:
        torch.save(parameters_of(model), os.path.join(root, "params_8.pt"))
    _arm_kill(point, rank)
    save_checkpoint(os.path.join(root, target), wrapped, optimizer, step=8)
    return "survived"


def _load_body(rank: int, world_size: int, root: str, name: str):
    model, wrapped, optimizer = _build(name, world_size)
    load_checkpoint(root, wrapped, optimizer)
    return parameters_of(model)


KILLS = [
    # (where the kill lands, the directory saved into, the parameters a load must give)
    ("rank1_mid_data", "step_8", 4),  # into a new directory
    ("rank1_mid_data", "step_4", 4),  # over the existing checkpoint
    ("rank0_commit_before_marker", "step_4", 4),
    ("rank0_commit_between_renames", "step_4", 8),  # the new one is complete, only hidden
]


@pytest.mark.parametrize("name", ["EKFAC", "Shampoo"])
@pytest.mark.parametrize(("point", "target", "survivor"), KILLS)
def test_sigkill_during_save_never_leaves_a_mix(tmp_path, name, point, target, survivor):
    root = str(tmp_path)
    with pytest.raises(ForkedRankError, match="reported nothing"):
        run_forked(_killed_save_body, 2, args=(root, name, point, target), timeout=60, grace=1.0)
    for path, marker in checkpoint_files.complete_checkpoints(root):
        assert marker["step"] in (4, 8), path
    want = torch.load(os.path.join(root, f"params_{survivor}.pt"))
    for params in run_forked(_load_body, 2, args=(root, name), timeout=60):
        for got, expected in zip(params, want, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # A later save cleans the debris up and keeps the newest complete checkpoint.
    newest = latest_checkpoint(root)
    checkpoint_files.prune_checkpoints(root, keep_last=1)
    assert [p for p, _ in checkpoint_files.complete_checkpoints(root)] == [newest]
    assert not [n for n in os.listdir(root) if n.endswith((".partial", ".old")) and
                os.path.join(root, n) != newest]
