"""Shampoo and SOAP on FSDP2 ``fully_shard`` parameters in the default ``fsdp_mode="lossless"``.

Each FSDP2 parameter is gathered whole on its owner only (never the whole model on every rank:
the full view is refused in these runs) and preconditioned exactly as under DDP: the run
must equal the single-process split-batch baseline of ``test_exactness.py`` (each rank on its
share of every batch; ``Σ_r g_r / W`` accumulated in one process) within 1e-12 relative in
float64, at 2 and 4 gloo ranks, on the toy MLP (uneven shards: the 3-row output layer leaves
rank 3 an empty shard at 4 ranks; a layer that never gets a gradient). DCP checkpoints: save
after half the steps, resume at 2 FSDP2 ranks and in one plain process, both on the
uninterrupted trajectory; a local-shard checkpoint is refused by a lossless optimizer.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from secondorder.distributed.checkpoint import load_checkpoint, save_checkpoint
from secondorder.optimizers.shampoo import Shampoo
from tests.distributed.launcher import run_forked
from tests.distributed.test_exactness import OPTIMIZERS, STEPS, relative_gap, split_batch_baseline
from tests.distributed.training import make_batches, make_model, parameters_of, train

pytestmark = pytest.mark.distributed

F64 = torch.float64
NAMES = ("Shampoo", "SOAP")


def _shard(model: nn.Module) -> nn.Module:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_fsdp(model: nn.Module, optimizer, batches) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        optimizer.step()


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().full_tensor().clone() for p in model.parameters()]


def _refuse_full_view(*args, **kwargs):
    raise AssertionError("full_view used: every rank gathered the whole model")


def _train_body(rank: int, world_size: int) -> dict:
    from secondorder.optimizers import shampoo

    shampoo.full_view = _refuse_full_view  # FSDP2's layout: each owner gathers its own parameters only
    out = {}
    for name in NAMES:
        model = _shard(make_model(dtype=F64))
        optimizer = OPTIMIZERS[name](model, None)  # no distributor: the mesh's group is used
        _train_fsdp(model, optimizer, make_batches(STEPS, F64))
        keys = {key for entry in optimizer.state.values() for key in entry if key.startswith(("block_", "shard@"))}
        out[name] = {
            "params": _full(model),
            "dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
            "keys": keys,
            "keys_are_params": all(any(key is p for p in model.parameters()) for key in optimizer.state),
            "state_numel": sum(
                value.numel()
                for entry in optimizer.state.values()
                for block in entry.values()
                if isinstance(block, dict)
                for value in block.values()
                if isinstance(value, torch.Tensor)
            ),
        }
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_lossless_fsdp2_equals_single_process(world_size):
    results = run_forked(_train_body, world_size, timeout=240)
    for name in NAMES:
        _, want = split_batch_baseline(name, F64, world_size)
        for rank, out in enumerate(results):
            got = out[name]
            gap = relative_gap(got["params"], want)
            print(f"{name} at {world_size} ranks, rank {rank}: gap {gap:.1e}")
            assert gap <= 1e-12, (name, world_size, rank, gap)
            assert got["dtensors"] and got["keys_are_params"], name
            # Whole-parameter blocks under DDP's keys, never per-shard ones.
            assert got["keys"] and not any(key.startswith("shard@") for key in got["keys"]), got["keys"]
        # Blocks are shared out: no rank holds all of them, together they hold each once.
        sizes = [out[name]["state_numel"] for out in results]
        assert sum(1 for size in sizes if size > 0) >= 2, (name, sizes)


def _segment_body(rank: int, world_size: int, root: str, start: int, stop: int, load, save) -> dict:
    out = {}
    for name in NAMES:
        model = make_model(dtype=F64)
        if world_size > 1:
            model = _shard(model)
        optimizer = OPTIMIZERS[name](model, None)
        if load is not None:
            load_checkpoint(os.path.join(root, load, name), model, optimizer)
        batches = make_batches(STEPS, F64)[start:stop]
        if world_size > 1:
            _train_fsdp(model, optimizer, batches)
        else:
            train(model, optimizer, batches)
        if save is not None:
            save_checkpoint(os.path.join(root, save, name), model, optimizer)
        out[name] = _full(model) if world_size > 1 else parameters_of(model)
    return out


def test_lossless_fsdp2_checkpoint_round_trip(tmp_path):
    """Save after 6 steps at 2 FSDP2 ranks; resume at 2 ranks (bitwise to the uninterrupted
    run) and in one plain process (the whole-parameter state reshards; the remaining steps run
    on whole batches there, so the baseline is the 2-share split for 6 steps, then 1 share)."""
    root, half = str(tmp_path), STEPS // 2
    run_forked(_segment_body, 2, args=(root, 0, half, None, "a"))
    uninterrupted = run_forked(_segment_body, 2, args=(root, 0, STEPS, None, None))
    resumed = run_forked(_segment_body, 2, args=(root, half, STEPS, "a", None))
    for name in NAMES:
        _, want = split_batch_baseline(name, F64, 2)
        for rank in range(2):
            assert relative_gap(resumed[rank][name], uninterrupted[rank][name]) == 0.0, (name, rank)
            assert relative_gap(resumed[rank][name], want) <= 1e-12, (name, rank)
    (single,) = run_forked(_segment_body, 1, args=(root, half, STEPS, "a", None))
    for name in NAMES:
        # One process on whole batches after the resume: compare with a baseline that also
        # switches at the half (its first half split in 2 shares, as the saved run was).
        want = _switching_baseline(name, half)
        gap = relative_gap(single[name], want)
        assert gap <= 1e-12, (name, gap)


def _other_mode_body(rank: int, world_size: int, directory: str, fsdp_mode: str) -> str:
    model = _shard(make_model(dtype=F64))
    optimizer = Shampoo(model.parameters(), lr=1e-2, max_preconditioner_dim=8, fsdp_mode=fsdp_mode)
    try:
        load_checkpoint(directory, model, optimizer)
    except ValueError as error:
        return str(error)
    return "loaded"


def test_checkpoints_of_the_other_fsdp_mode_are_refused(tmp_path):
    """Whole-parameter blocks and per-shard blocks are different state: loading one into the
    other mode raises on every rank instead of restarting the preconditioners silently."""
    for mode, other in (("lossless", "local_shard"), ("local_shard", "lossless")):
        directory = os.fspath(tmp_path / mode)
        run_forked(_save_mode_body, 2, args=(directory, mode))
        for message in run_forked(_other_mode_body, 2, args=(directory, other)):
            assert message.startswith("Invalid checkpoint") and f"fsdp_mode='{mode}'" in message, message


def _save_mode_body(rank: int, world_size: int, directory: str, fsdp_mode: str) -> None:
    model = _shard(make_model(dtype=F64))
    optimizer = Shampoo(model.parameters(), lr=1e-2, max_preconditioner_dim=8, fsdp_mode=fsdp_mode)
    _train_fsdp(model, optimizer, make_batches(2, F64))
    save_checkpoint(directory, model, optimizer)


def _switching_baseline(name: str, half: int) -> list[torch.Tensor]:
    """One process: 2-share split batches for ``half`` steps, then whole batches."""
    model = make_model(dtype=F64)
    optimizer = OPTIMIZERS[name](model, None)
    for index, (x, y) in enumerate(make_batches(STEPS, F64)):
        optimizer.zero_grad(set_to_none=True)
        shares = 2 if index < half else 1
        for x_share, y_share in zip(x.chunk(shares), y.chunk(shares), strict=True):
            (nn.functional.mse_loss(model(x_share), y_share) / shares).backward()
        optimizer.step()
    return parameters_of(model)


def test_fsdp_mode_is_checked():
    with pytest.raises(ValueError, match="^Invalid fsdp_mode"):
        Shampoo(make_model(dtype=F64).parameters(), fsdp_mode="sharded")
