"""Shampoo on FSDP2 ``fully_shard`` parameters (2 gloo ranks), ``fsdp_mode="local_shard"``: each
rank preconditions its shard (the lossless default is tested in test_fsdp_shampoo_lossless.py).

Under FSDP2 a parameter is a DTensor whose local tensor is a contiguous range of rows; Shampoo
cuts *that shard* into blocks and keeps their state on the rank that holds it (nothing is
all-gathered). The result is therefore single-process Shampoo with every matrix split at the
shard boundaries: with ``max_preconditioner_dim = 8`` and 16-row weights the single-process
blocks are exactly the two ranks' shards, so the runs must agree (float64, each rank on half
of every batch; FSDP2 averages the gradients).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from secondorder.distributed.checkpoint import load_checkpoint, save_checkpoint
from secondorder.optimizers.shampoo import Shampoo
from tests.distributed.launcher import run_forked

pytestmark = pytest.mark.distributed

F64 = torch.float64
STEPS = 12
MODES = {
    "classic": dict(
        lr=1e-2, precondition_frequency=2, max_preconditioner_dim=8, weight_decay=0.01, fsdp_mode="local_shard"
    ),
    "eigenvalue_corrected": dict(
        lr=1e-2, precondition_frequency=2, max_preconditioner_dim=8, eigenvalue_correction=True, betas=(0.9, 0.95),
        fsdp_mode="local_shard",
    ),
}


def _model() -> nn.Sequential:
    """6 → 16 → 16 → 1: the last weight (1, 16) sits wholly on rank 0 (rank 1's shard is empty)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(F64)


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(6, 1, generator=generator, dtype=F64)
    batches = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=generator, dtype=F64)
        batches.append((x, torch.tanh(x @ teacher)))
    return batches


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches, rank: int = 0, world: int = 1) -> None:
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank])
        loss.backward()
        optimizer.step()


def _shard(model: nn.Sequential) -> nn.Sequential:
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _fsdp_body(rank: int, world: int) -> dict:
    out = {}
    for mode, options in MODES.items():
        model = _shard(_model())
        optimizer = Shampoo(model.parameters(), **options)
        _train(model, optimizer, _batches(STEPS), rank, world)
        keys = sorted(key for p in model.parameters() for key in optimizer.state.get(p, {}) if key != "step")
        out[mode] = (_full(model), keys)
    return out


def test_fsdp2_shards_equal_single_process_split_at_shard_boundaries():
    results = run_forked(_fsdp_body, 2)
    for mode, options in MODES.items():
        model = _model()
        _train(model, Shampoo(model.parameters(), **options), _batches(STEPS))
        for rank, out in enumerate(results):
            params, keys = out[mode]
            for got, want in zip(params, model.parameters(), strict=True):
                torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-12)
            # Block state is keyed by this rank's shard: rows [8·rank, 8·rank + 8) of the 16-row weights.
            assert f"shard@{8 * rank},0:8x6_block_0" in keys
            assert f"shard@{8 * rank},0:8x16_block_1" in keys
            assert ("shard@0,0:1x16_block_1" in keys) == (rank == 0)  # rank 1's shard of (1, 16) is empty


def _checkpoint_body(rank: int, world: int, directory: str) -> dict:
    options = MODES["classic"]
    batches = _batches(8)
    model = _shard(_model())
    optimizer = Shampoo(model.parameters(), **options)
    _train(model, optimizer, batches[:4], rank, world)
    save_checkpoint(directory, model, optimizer)
    _train(model, optimizer, batches[4:], rank, world)
    uninterrupted = _full(model)

    resumed_model = _shard(_model())
    resumed = Shampoo(resumed_model.parameters(), **options)
    load_checkpoint(directory, resumed_model, resumed)
    _train(resumed_model, resumed, batches[4:], rank, world)
    return {"uninterrupted": uninterrupted, "resumed": _full(resumed_model)}


def _other_world_body(rank: int, world: int, directory: str) -> str:
    model = _shard(_model())
    optimizer = Shampoo(model.parameters(), **MODES["classic"])
    try:
        load_checkpoint(directory, model, optimizer)
    except ValueError as error:
        return str(error)
    return "loaded"


def test_fsdp2_checkpoint_resumes_and_refuses_other_shard_boundaries(tmp_path):
    directory = os.fspath(tmp_path / "checkpoint")
    for out in run_forked(_checkpoint_body, 2, args=(directory,)):
        for got, want in zip(out["resumed"], out["uninterrupted"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # One rank holds whole parameters: the per-shard preconditioners cannot be mapped onto it.
    (message,) = run_forked(_other_world_body, 1, args=(directory,))
    assert "Invalid checkpoint" in message and "same shard boundaries" in message, message
