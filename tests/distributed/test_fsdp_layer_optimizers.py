"""EK-FAC, AdaFisher and SINGD on FSDP2 (``fully_shard``) models at 2 gloo ranks.

Parameters and gradients are DTensors (``Shard(0)``, uneven for the 3-row output layer); the
layer optimizers step on a full view of them (secondorder.distributed.full_view). Each rank
trains on its half of every batch, so the run must equal one process on the whole batch up to
summation order (float64: FSDP2 shards and reduce-scatters float64 on gloo; tolerance 1e-6
relative, as for DDP in test_layer_optimizers.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from secondorder.distributed.checkpoint import load_checkpoint, save_checkpoint
from secondorder.distributed.distributor import resolve_distributor
from secondorder.distributed.full_view import full_view
from secondorder.optimizers.adafisher import AdaFisherW
from tests.distributed.launcher import run_forked
from tests.distributed.test_layer_optimizers import OPTIMIZERS as LAYER_OPTIMIZERS
from tests.distributed.training import make_batches, make_model, parameters_of, train

pytestmark = pytest.mark.distributed

STEPS = 12
F64 = torch.float64
OPTIMIZERS = {
    **LAYER_OPTIMIZERS,  # the DDP tests' settings: every code path runs within 12 steps
    "AdaFisherW": lambda model, distributor: AdaFisherW(
        model.parameters(), model=model, lr=1e-3, weight_decay=0.1, update_freq=2, distributor=distributor
    ),
}


def _shard(model: nn.Module) -> nn.Module:
    """FSDP2 on a 1-D CPU mesh: each Linear, then the root (parameters become DTensors)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_fsdp(model: nn.Module, optimizer, batches) -> list[float]:
    """One step per batch, rank ``r`` on the ``r``-th half; the loss averaged over ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank])
        loss.backward()
        optimizer.step()
        value = loss.detach().clone()
        dist.all_reduce(value)
        losses.append(float(value) / world)
    return losses


def _full_parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().full_tensor() for p in model.parameters()]


def _reference(name: str) -> tuple[list[float], list[torch.Tensor], int]:
    """One process on whole batches: losses, parameters, parameters with state."""
    model = make_model(dtype=F64)
    optimizer = OPTIMIZERS[name](model, None)
    losses = train(model, optimizer, make_batches(STEPS, F64))
    return losses, parameters_of(model), sum(1 for entry in optimizer.state.values() if entry)


def _max_relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(got, want, strict=True))


def _train_body(rank: int, world_size: int) -> dict:
    out = {}
    for name, make in OPTIMIZERS.items():
        model = _shard(make_model(dtype=F64))
        optimizer = make(model, True)
        losses = _train_fsdp(model, optimizer, make_batches(STEPS, F64))
        state = [(value, p) for p, entry in optimizer.state.items() for value in entry.values()]
        out[name] = {
            "losses": losses,
            "params": _full_parameters(model),
            "dtensor_params": all(isinstance(p, DTensor) for p in model.parameters()),
            "keys_are_params": all(any(key is p for p in model.parameters()) for key in optimizer.state),
            "plain_state": all(not isinstance(v, DTensor) for v, _ in state if isinstance(v, torch.Tensor)),
            "full_size_state": all(
                entry[key].shape == p.shape
                for p, entry in optimizer.state.items()
                for key in ("exp_avg", "momentum_buffer")
                if key in entry
            ),
            "owned": sum(1 for entry in optimizer.state.values() if entry),
        }
    return out


def test_fsdp_two_ranks_equal_one_process():
    results = run_forked(_train_body, 2)
    for name in OPTIMIZERS:
        ref_losses, ref_params, ref_count = _reference(name)
        counts = []
        for out in results:
            got = out[name]
            assert got["dtensor_params"] and got["keys_are_params"], name
            assert got["plain_state"] and got["full_size_state"], name
            loss_gap = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref_losses, strict=True))
            param_gap = _max_relative(got["params"], ref_params)
            print(f"{name}: loss gap {loss_gap:.2e}, parameter gap {param_gap:.2e}")
            assert loss_gap <= 1e-6 and param_gap <= 1e-6, (name, loss_gap, param_gap)
            counts.append(got["owned"])
        # Layers are split between the ranks: each holds state for some parameters, together all.
        assert all(0 < count < ref_count for count in counts) and sum(counts) == ref_count, (name, counts)


def _segment_body(rank: int, world_size: int, root: str, start: int, stop: int, load, save) -> dict:
    """Steps ``[start, stop)`` per optimizer: FSDP2 at 2 ranks, a plain model in one process."""
    out = {}
    for name, make in OPTIMIZERS.items():
        model = make_model(dtype=F64)
        if world_size > 1:
            model = _shard(model)
        optimizer = make(model, world_size > 1)
        if load is not None:
            load_checkpoint(os.path.join(root, load, name), model, optimizer)
        batches = make_batches(STEPS, F64)[start:stop]
        losses = _train_fsdp(model, optimizer, batches) if world_size > 1 else train(model, optimizer, batches)
        if save is not None:
            save_checkpoint(os.path.join(root, save, name), model, optimizer)
        params = _full_parameters(model) if world_size > 1 else parameters_of(model)
        out[name] = (losses, params)
    return out


def test_fsdp_checkpoint_round_trip(tmp_path):
    """Save after 6 FSDP2 steps; resume at 2 FSDP2 ranks, and in one plain process.

    Both resumed runs must follow the uninterrupted trajectory: owner-held, full-size state
    (EK-FAC's factors and bases, SINGD's K and C, momenta) must round-trip through DCP and
    reshard onto a different layout.
    """
    root, half = str(tmp_path), STEPS // 2
    first = run_forked(_segment_body, 2, args=(root, 0, half, None, "a"))
    resumed = run_forked(_segment_body, 2, args=(root, half, STEPS, "a", None))
    single = run_forked(_segment_body, 1, args=(root, half, STEPS, "a", None))
    for name in OPTIMIZERS:
        ref_losses, ref_params, _ = _reference(name)
        for rank, rest in ((0, resumed[0]), (1, resumed[1]), (0, single[0])):
            losses = first[rank][name][0] + rest[name][0]
            loss_gap = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
            param_gap = _max_relative(rest[name][1], ref_params)
            print(f"{name} resumed: loss gap {loss_gap:.2e}, parameter gap {param_gap:.2e}")
            assert loss_gap <= 1e-6 and param_gap <= 1e-6, (name, loss_gap, param_gap)


def _errors_body(rank: int, world_size: int) -> dict:
    """A single-process distributor is refused; a body that raises leaves everything as it was."""
    out = {}
    x, y = make_batches(1, F64)[0]
    for name, make in OPTIMIZERS.items():
        model = _shard(make_model(dtype=F64))
        before = _full_parameters(model)
        nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad for p in model.parameters()]
        try:
            make(model, None).step()
            refused = ""
        except ValueError as error:
            refused = str(error)
        optimizer = make(model, True)

        def fail(*args, **kwargs):
            raise RuntimeError("boom")

        # Raises inside the step body (after the gathers, the swap and the hiding of
        # non-owned gradients), on both ranks.
        capture = optimizer.capture if hasattr(optimizer, "capture") else optimizer._capture
        capture.has_records = fail
        try:
            optimizer.step()
            raised = False
        except RuntimeError:
            raised = True
        params = list(model.parameters())
        out[name] = {
            "refused": refused,
            "raised": raised,
            "groups_restored": [p for g in optimizer.param_groups for p in g["params"]] == params,
            "keys_restored": all(any(key is p for p in params) for key in optimizer.state),
            "grads_kept": all(p.grad is g for p, g in zip(params, grads, strict=True)),
            "layers_restored": all(
                isinstance(p, DTensor) and capture.layer_for(p) is layer
                for layer in capture.layers
                for p in (layer.weight, layer.bias)
            ),
            "unchanged": all(torch.equal(a, b) for a, b in zip(_full_parameters(model), before, strict=True)),
        }
    return out


def test_fsdp_needs_distributor_and_restores_on_error():
    for out in run_forked(_errors_body, 2):
        for name in OPTIMIZERS:
            got = out[name]
            assert "distributor" in got["refused"] and "FSDP2" in got["refused"], (name, got["refused"])
            assert got["raised"], name
            assert got["groups_restored"] and got["keys_restored"] and got["grads_kept"], (name, got)
            assert got["layers_restored"] and got["unchanged"], (name, got)


def _layouts_body(rank: int, world_size: int) -> list:
    """``full_view`` on DTensors of several layouts: gathers, swaps, writes back, restores."""
    mesh = init_device_mesh("cpu", (world_size,))
    generator = torch.Generator().manual_seed(3)
    layouts = [  # (global shape, placement, dtype): uneven, empty shard, Shard(1), fallback
        ((5, 3), Shard(0), F64),
        ((1, 4), Shard(0), F64),
        ((3, 5), Shard(1), torch.float32),
        ((4,), Replicate(), F64),
    ]
    fulls = [torch.randn(shape, generator=generator, dtype=dtype) for shape, _, dtype in layouts]
    params = [
        nn.Parameter(distribute_tensor(full.clone(), mesh, [placement]))
        for full, (_, placement, _) in zip(fulls, layouts, strict=True)
    ]
    for param, full in zip(params, fulls, strict=True):
        param.grad = distribute_tensor(2 * full, mesh, param.placements)
    optimizer = torch.optim.SGD(params, lr=0.1)
    optimizer.state[params[0]]["buffer"] = torch.zeros(5, 3, dtype=F64)
    results = []
    with torch.no_grad(), full_view(optimizer, resolve_distributor(True)) as view:
        inside = optimizer.param_groups[0]["params"]
        for param, full, seen in zip(params, fulls, inside, strict=True):
            results.append(
                view[id(param)] is seen
                and not isinstance(seen, DTensor)
                and torch.equal(seen, full)
                and torch.equal(seen.grad, 2 * full)
            )
        results.append(inside[0] in optimizer.state and params[0] not in optimizer.state)
        for seen in inside:
            seen.sub_(seen.grad)  # every rank applies the same update (as owners' all-gather ensures)
    results.append(optimizer.param_groups[0]["params"] == params and params[0] in optimizer.state)
    for param, full, (_, placement, _) in zip(params, fulls, layouts, strict=True):
        results.append(param.placements == (placement,) and torch.equal(param.full_tensor(), -full))
    return results


def test_full_view_layouts():
    for results in run_forked(_layouts_body, 2):
        assert all(results), results


def _owner_view_body(rank: int, world_size: int) -> dict:
    """Train with the full view disabled: the owner view must serve FSDP2's layout alone
    (uneven shards included: the 3-row output layer at 2 and 4 ranks, an empty shard at 4)."""
    from secondorder.distributed import ownership

    def refuse(*args, **kwargs):
        raise AssertionError("full_view used: every rank gathered the whole model")

    ownership.full_view = refuse
    out = {}
    for name, make in OPTIMIZERS.items():
        model = _shard(make_model(dtype=F64))
        optimizer = make(model, True)
        losses = _train_fsdp(model, optimizer, make_batches(STEPS, F64))
        out[name] = {
            "losses": losses,
            "params": _full_parameters(model),
            "owned": sum(1 for entry in optimizer.state.values() if entry),
        }
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp_owner_view_gathers_only_owned_layers(world_size):
    results = run_forked(_owner_view_body, world_size, timeout=240)
    for name in OPTIMIZERS:
        ref_losses, ref_params, ref_count = _reference(name)
        for out in results:
            got = out[name]
            param_gap = _max_relative(got["params"], ref_params)
            assert param_gap <= 1e-6, (name, world_size, param_gap)
        assert sum(out[name]["owned"] for out in results) == ref_count, name
