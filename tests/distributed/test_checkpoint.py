"""DCP checkpoints of a distributed Shampoo: exact resume, and 2 → 1 → 2 ranks resharding."""

from __future__ import annotations

import os

import pytest
import torch

from secondorder.distributed.checkpoint import load_checkpoint, save_checkpoint
from secondorder.optimizers.ekfac import EKFAC
from secondorder.optimizers.shampoo import Shampoo
from tests.distributed.launcher import run_forked
from tests.distributed.training import make_batches, make_model, parameters_of, train, wrap_ddp

pytestmark = pytest.mark.distributed

STEPS = 20
MODES = {
    "classic": dict(lr=1e-2, precondition_frequency=3, max_preconditioner_dim=8, momentum=0.5),
    "eigenvalue_corrected": dict(
        lr=1e-2, precondition_frequency=3, max_preconditioner_dim=8, eigenvalue_correction=True
    ),
}


def _build(mode: str, world_size: int):
    """Model (DDP-wrapped when distributed) and its optimizer, freshly initialised."""
    model = make_model()
    optimizer = Shampoo(model.parameters(), **MODES[mode], distributor=world_size > 1)
    return (wrap_ddp(model) if world_size > 1 else model), optimizer


def _reference(mode: str) -> tuple[list[float], list[torch.Tensor]]:
    model, optimizer = _build(mode, 1)
    losses = train(model, optimizer, make_batches(STEPS))
    return losses, parameters_of(model)


def _segment(
    rank: int,
    world_size: int,
    mode: str,
    start: int,
    stop: int,
    load_dir: str | None,
    save_dir: str | None,
) -> tuple[list[float], list[torch.Tensor]]:
    """Build fresh, load ``load_dir`` (if any), train ``[start, stop)``, save to ``save_dir``."""
    model, optimizer = _build(mode, world_size)
    if load_dir is not None:
        extra = load_checkpoint(load_dir, model, optimizer, extra={"step": torch.tensor(0)})
        assert int(extra["step"]) == start
    losses = train(model, optimizer, make_batches(STEPS)[start:stop])
    if save_dir is not None:
        save_checkpoint(save_dir, model, optimizer, extra={"step": torch.tensor(stop)})
    return losses, parameters_of(model)


def _round_trip_body(rank: int, world_size: int, root: str) -> dict:
    out = {}
    for mode in MODES:
        path = os.path.join(root, mode)
        first, _ = _segment(rank, world_size, mode, 0, 8, None, path)
        model, optimizer = _build(mode, world_size)
        load_checkpoint(path, model, optimizer)
        out[mode] = (first + train(model, optimizer, make_batches(STEPS)[8:]), parameters_of(model))
    return out


def test_round_trip_at_two_ranks_resumes_exactly(tmp_path):
    results = run_forked(_round_trip_body, 2, args=(str(tmp_path),))
    for mode in MODES:
        ref_losses, ref_params = _reference(mode)
        for out in results:
            losses, params = out[mode]
            assert losses == ref_losses, mode
            for got, want in zip(params, ref_params, strict=False):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    # One file per rank: each rank wrote its own blocks.
    assert sorted(f for f in os.listdir(tmp_path / "classic") if f.endswith(".distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]


def _reshard_body(
    rank: int, world_size: int, root: str, start: int, stop: int, load: str | None, save: str | None
) -> dict:
    return {
        mode: _segment(
            rank,
            world_size,
            mode,
            start,
            stop,
            None if load is None else os.path.join(root, load, mode),
            None if save is None else os.path.join(root, save, mode),
        )
        for mode in MODES
    }


def test_save_at_two_ranks_load_at_one_and_back(tmp_path):
    """Steps 0-7 on 2 ranks, 7-14 in one process, 14-20 on 2 ranks: the uninterrupted trajectory."""
    root = str(tmp_path)
    first = run_forked(_reshard_body, 2, args=(root, 0, 7, None, "a"))
    middle = run_forked(_reshard_body, 1, args=(root, 7, 14, "a", "b"))
    last = run_forked(_reshard_body, 2, args=(root, 14, STEPS, "b", None))
    for mode in MODES:
        ref_losses, ref_params = _reference(mode)
        for rank in range(2):
            losses = first[rank][mode][0] + middle[0][mode][0] + last[rank][mode][0]
            assert losses == ref_losses, (mode, rank)
            for got, want in zip(last[rank][mode][1], ref_params, strict=False):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def _owns_nothing_body(rank: int, world_size: int, directory: str) -> dict:
    """EKFAC on one Linear layer: one block, so rank 1 owns nothing and holds no state."""

    def build():
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3)
        optimizer = EKFAC(layer.parameters(), model=layer, lr=1e-2, stats_every=1, precondition_frequency=2,
                          distributor=True)
        return layer, torch.nn.parallel.DistributedDataParallel(layer), optimizer

    generator = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(8, 4, generator=generator) for _ in range(6)]

    def run(wrapped, optimizer, batch):
        for x in batch:
            optimizer.zero_grad()
            wrapped(x).pow(2).mean().backward()
            optimizer.step()

    layer, wrapped, optimizer = build()
    run(wrapped, optimizer, inputs[:3])
    optimizer.zero_grad()  # no gradients and no state on rank 1: DCP would step it alone
    save_checkpoint(directory, layer, optimizer)
    run(wrapped, optimizer, inputs[3:])
    resumed_layer, resumed_wrapped, resumed = build()
    load_checkpoint(directory, resumed_layer, resumed)
    run(resumed_wrapped, resumed, inputs[3:])
    return {"owned": len(optimizer.state), "uninterrupted": parameters_of(layer),
            "resumed": parameters_of(resumed_layer)}


def test_rank_owning_nothing_saves_and_loads(tmp_path):
    results = run_forked(_owns_nothing_body, 2, args=(os.fspath(tmp_path / "checkpoint"),), timeout=60)
    assert sorted(out["owned"] for out in results) == [0, 2]
    for out in results:
        for got, want in zip(out["resumed"], out["uninterrupted"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
