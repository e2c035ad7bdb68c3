"""Shampoo on 2 gloo ranks equals Shampoo in one process (DDP model, AllGatherDistributor)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder.distributed.distributor import AllGatherDistributor, resolve_distributor
from secondorder.optimizers.shampoo import Shampoo
from tests.distributed.launcher import run_forked
from tests.distributed.training import (
    make_batches,
    make_model,
    parameters_of,
    state_bytes,
    train,
    wrap_ddp,
)

pytestmark = pytest.mark.distributed

STEPS = 20
MODES = {
    # f = 2 and b = 8: roots refresh often and the 16 x 16 matrices are cut into 4 blocks each.
    "classic": dict(lr=1e-2, precondition_frequency=2, max_preconditioner_dim=8),
    "eigenvalue_corrected": dict(
        lr=1e-2,
        precondition_frequency=2,
        max_preconditioner_dim=8,
        eigenvalue_correction=True,
        betas=(0.9, 0.95),
    ),
}


def _shampoo(model: nn.Module, mode: str, distributor=None, **extra) -> Shampoo:
    return Shampoo(model.parameters(), **MODES[mode], **extra, distributor=distributor)


def _owned_blocks(optimizer: Shampoo) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        (index, key): value
        for index, p in enumerate(params)
        for key, value in optimizer.state[p].items()
        if key.startswith("block_")
    }


def _single(mode: str, dtype=torch.float32, same_data=True, **extra):
    model = make_model(dtype=dtype)
    optimizer = _shampoo(model, mode, **extra)
    losses = train(model, optimizer, make_batches(STEPS, dtype), same_data=same_data)
    return losses, parameters_of(model), _owned_blocks(optimizer), state_bytes(optimizer)


def _same_data_body(rank: int, world_size: int) -> dict:
    out = {}
    for mode in MODES:
        model = wrap_ddp(make_model())
        optimizer = _shampoo(model.module, mode, AllGatherDistributor())
        losses = train(model, optimizer, make_batches(STEPS))
        out[mode] = (
            losses,
            parameters_of(model),
            _owned_blocks(optimizer),
            optimizer.distributor.rank,
        )
    return out


def test_two_ranks_equal_one_process_bitwise():
    """Same data on both ranks: every loss, parameter and owned state tensor is bitwise equal."""
    results = run_forked(_same_data_body, 2)
    for mode in MODES:
        ref_losses, ref_params, ref_blocks, _ = _single(mode)
        seen: set = set()
        for rank, out in enumerate(results):
            losses, params, blocks, reported_rank = out[mode]
            assert reported_rank == rank
            assert losses == ref_losses, mode
            for got, want in zip(params, ref_params, strict=False):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert blocks, f"rank {rank} owns no block in {mode}"
            assert not seen & blocks.keys(), "a block is owned by two ranks"
            seen |= blocks.keys()
            for key, state in blocks.items():
                for name, tensor in state.items():
                    torch.testing.assert_close(
                        tensor, ref_blocks[key][name], rtol=0, atol=0, msg=f"{mode} {key} {name}"
                    )
        assert seen == ref_blocks.keys()


def _sharded_data_body(rank: int, world_size: int) -> tuple[list[float], list[torch.Tensor]]:
    model = wrap_ddp(make_model(dtype=torch.float64))
    # distributor=True: the default group, float64 updates communicated in float64 (exact).
    optimizer = _shampoo(model.module, "classic", distributor=True, factor_dtype=torch.float64)
    assert isinstance(optimizer.distributor, AllGatherDistributor)
    return train(
        model, optimizer, make_batches(STEPS, torch.float64), same_data=False
    ), parameters_of(model)


def test_two_ranks_on_sharded_batches_match_the_full_batch():
    """Each rank sees half of every batch: only the gradient's summation order differs."""
    ref_losses, ref_params, _, _ = _single("classic", torch.float64, factor_dtype=torch.float64)
    for losses, params in run_forked(_sharded_data_body, 2):
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=1e-6
        )
        for got, want in zip(params, ref_params, strict=False):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _one_block_body(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(6, 3, bias=False)
    wrapped = wrap_ddp(model)
    optimizer = Shampoo(model.parameters(), **MODES["classic"], distributor=AllGatherDistributor())
    batches = [(x, y) for x, y in make_batches(STEPS)]
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(wrapped(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    low = Shampoo(
        model.parameters(),
        **MODES["classic"],
        distributor=AllGatherDistributor(communication_dtype=torch.bfloat16),
    )
    for x, y in batches[:3]:
        low.zero_grad()
        torch.nn.functional.mse_loss(wrapped(x), y).backward()
        low.step()
    return {
        "losses": losses,
        "blocks": len(_owned_blocks(optimizer)),
        "weight": model.weight.detach().clone(),
    }


def test_a_rank_owning_no_block():
    """One 3 x 6 block: rank 1 owns nothing, still steps (and joins the all-gather) correctly."""
    results = run_forked(_one_block_body, 2)
    assert [r["blocks"] for r in results] == [1, 0]
    torch.manual_seed(0)
    model = nn.Linear(6, 3, bias=False)
    optimizer = Shampoo(model.parameters(), **MODES["classic"])
    ref = []
    for x, y in make_batches(STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        ref.append(float(loss.detach()))
    assert results[0]["losses"] == ref == results[1]["losses"]
    # After 3 more steps with bf16 communication, replicas are still identical.
    torch.testing.assert_close(results[0]["weight"], results[1]["weight"], rtol=0, atol=0)


def _memory_body(rank: int, world_size: int) -> int:
    model = wrap_ddp(make_model(width=32))
    optimizer = Shampoo(
        model.module.parameters(),
        lr=1e-2,
        precondition_frequency=2,
        max_preconditioner_dim=16,
        distributor=AllGatherDistributor(),
    )
    train(model, optimizer, make_batches(3))
    return state_bytes(optimizer)


def test_per_rank_state_is_about_half():
    """Per-rank optimizer state bytes at 2 ranks: each ≤ 0.55 of the one-process total."""
    model = make_model(width=32)
    optimizer = Shampoo(
        model.parameters(), lr=1e-2, precondition_frequency=2, max_preconditioner_dim=16
    )
    train(model, optimizer, make_batches(3))
    total = state_bytes(optimizer)
    per_rank = run_forked(_memory_body, 2)
    assert max(per_rank) / total <= 0.55, (per_rank, total)
    # Nothing is lost or duplicated beyond the replicated per-parameter step counters.
    replicated = 8 * sum(1 for p in model.parameters() if "step" in optimizer.state[p])
    assert sum(per_rank) == total + replicated


def test_resolve_distributor_arguments():
    assert resolve_distributor(None).world_size == 1
    assert resolve_distributor(False).world_size == 1
    with pytest.raises(TypeError, match="distributor"):
        resolve_distributor("yes")
