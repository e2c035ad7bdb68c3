"""Step time, all-gather share and per-rank optimizer state and compute at 1, 2, 4 ranks.

    python -m benchmarks.step_time_distributed [--optimizers Shampoo,EKFAC] [--world-sizes 1,2]
                                               [--model mlp|lm|cnn] [--width 512] [--batch N]
                                               [--steps 30] [--out DIR] [--parallel ddp|fsdp]
                                               [--max-preconditioner-dim B] [--max-factor-dim B]

For each world size the script launches itself under ``torchrun --standalone`` (gloo on CPU,
nccl when CUDA is available; one torch thread per rank on CPU) and each rank trains the
``--model`` DDP-wrapped (``--parallel fsdp``: FSDP2 ``fully_shard`` on every Linear / Conv2d,
or every transformer block, then the root) on its own random batches of ``--batch`` examples:

* ``mlp``: ``MLP((256, width, width, 10))``, batch 256 by default;
* ``lm``: W2's byte-level transformer LM (:class:`~benchmarks.models.ByteTransformer`, full
  configuration: 4 layers of ``d_model=128``, context 128), batch 8 sequences;
* ``cnn``: the digits CNN whose classifier dominates (``conv16 → conv32 → Linear(512→10)``,
  ``benchmarks.defaults_race.DigitsCNN``), 1×8×8 inputs, batch 64.

Balance (issue 16, item 2): every rank reports the bytes of each *unit of ownership* it
holds state for (a Shampoo block; a capture optimizer's layer, weight and bias together;
a fallback parameter), measured on the real state. Printed per row: the largest per-rank
state over the mean and over the bound ``max(total/ranks, largest unit)``; the per-rank
amortised optimizer compute (mean ``optimizer.step()`` time minus the collectives) max over
mean; and the same bound for the compute of the optimizer's own cost model (the costs it
hands its distributor, with the owners it got: ``cost max/bound``). The target is ≤ 1.15.
Timed per
step, after ``--warmup`` steps: the whole training step (forward, backward with DDP's
all-reduce or FSDP2's reduce-scatter, ``optimizer.step()``), ``optimizer.step()`` alone, and the
time spent inside the distributor's collectives (the update all-gather, and for
capture-based optimizers the statistics gather). Reported: medians, means over the timed
window (amortised eigendecompositions included), the collectives' share of the optimizer
step, the largest per-rank optimizer-state size and its ratio to world size 1's.
Writes ``step_time_distributed.json`` (``_fsdp.json`` for FSDP2) under ``--out`` (default
``bench_results/step_time_distributed``).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from benchmarks.models import MLP, ByteTransformer
from benchmarks.registry import REGISTRY, build_optimizer, resolve_target
from secondorder.distributed.ownership import LayerOwnership

# Frequencies as in benchmarks.step_time's middle setting.
OVERRIDES = {
    "Shampoo": dict(precondition_frequency=10, max_preconditioner_dim=1024),
    "Shampoo-SOAP": dict(precondition_frequency=10, max_preconditioner_dim=1024),
    "EKFAC": dict(stats_every=10, precondition_frequency=10),
    "AdaFisher": dict(update_freq=10),
    "AdaFisherW": dict(update_freq=10),
    "SINGD": dict(T=10),
}
DEFAULT_BATCH = {"mlp": 256, "lm": 8, "cnn": 64}
W2_FULL = dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, context=128)  # benchmarks.workloads
TIMED_METHODS = (
    "all_gather_updates",
    "all_gather_values",
    "gather_to_owners",
    "reduce_to_owners",
    "any",
)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0
    stack: list[Any] = list(optimizer.state.values())
    while stack:
        value = stack.pop()
        if isinstance(value, DTensor):
            value = value.to_local()
        if isinstance(value, torch.Tensor):
            if value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


def _tensor_bytes(value: Any) -> int:
    """Storage bytes of every tensor inside ``value`` (nested dicts, lists; DTensors' shards)."""
    if isinstance(value, DTensor):
        value = value.to_local()
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _unit_bytes(optimizer: torch.optim.Optimizer) -> list[int]:
    """State bytes of each unit of ownership this rank holds state for.

    Capture optimizers: a layer (weight and bias entries together) or a fallback parameter
    (the blocks of :class:`~secondorder.distributed.ownership.LayerOwnership`). Shampoo: each
    block's dict (``"block_3"``; the per-parameter ``step`` counter, replicated on every rank,
    left out). Other optimizers: each parameter's entry.
    """
    ownership = getattr(optimizer, "_ownership", None)
    if isinstance(ownership, LayerOwnership):
        blocks, _ = ownership.blocks()
        units = [sum(_tensor_bytes(optimizer.state.get(p, {})) for p in block) for block in blocks]
        return [u for u in units if u > 0]
    units = []
    for entry in optimizer.state.values():
        blocks = [value for value in entry.values() if isinstance(value, dict)]
        units += [_tensor_bytes(block) for block in blocks] if blocks else [_tensor_bytes(entry)]
    return [u for u in units if u > 0]


def _record_assignment(distributor: Any, record: dict[str, list]) -> None:
    """Keep the costs the optimizer hands ``distributor.assign`` and the owners it gets back (the
    last non-empty call: lossless FSDP2 Shampoo assigns whole parameters, then no other block)."""
    assign = distributor.assign

    def recorded(costs, sizes=None):
        owners = assign(costs, sizes)
        if len(costs):
            record["costs"], record["owners"] = list(costs), list(owners)
        return owners

    distributor.assign = recorded


def _bound_ratio(per_rank: list[float], largest_unit: float) -> float:
    """``max(per_rank) / max(total / ranks, largest_unit)``: 1.0 is the best any assignment of
    these indivisible units can do."""
    bound = max(sum(per_rank) / len(per_rank), largest_unit)
    return max(per_rank) / bound if bound > 0 else float("nan")


def _build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model == "lm":
        return ByteTransformer(**W2_FULL)
    if args.model == "cnn":
        from benchmarks.defaults_race import DigitsCNN

        return DigitsCNN()
    return MLP((256, args.width, args.width, 10))


def _shard_units(model: torch.nn.Module, args: argparse.Namespace) -> list[torch.nn.Module]:
    """The modules ``fully_shard`` wraps before the root."""
    if args.model == "lm":
        return list(model.blocks)
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _make_batch(args: argparse.Namespace, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if args.model == "lm":
        tokens = torch.randint(0, 256, (args.batch, W2_FULL["context"] + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]
    shape = (args.batch, 1, 8, 8) if args.model == "cnn" else (args.batch, 256)
    return torch.randn(shape, generator=generator), torch.randint(0, 10, (args.batch,), generator=generator)


def _instrument(distributor: Any, clock: dict[str, float]) -> None:
    """Accumulate wall time spent in the distributor's collectives into ``clock["comm"]``."""
    for name in TIMED_METHODS:
        method = getattr(distributor, name, None)
        if method is None:
            continue

        def timed(*args: Any, _method=method, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                clock["comm"] += time.perf_counter() - began

        setattr(distributor, name, timed)


def worker(args: argparse.Namespace) -> None:
    """One rank: time every optimizer; rank 0 writes the results to ``args.result``."""
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    rows = []
    for name in args.optimizers.split(","):
        torch.manual_seed(0)
        model = _build_model(args).to(device)
        if args.parallel == "fsdp":  # shard before the optimizer sees the parameters
            mesh = init_device_mesh(device.type, (world,))
            for unit in _shard_units(model, args):
                fully_shard(unit, mesh=mesh)
            fully_shard(model, mesh=mesh)
        entry = REGISTRY[name]
        cls = resolve_target(entry.target)
        overrides = dict(OVERRIDES.get(name, {}))
        if args.max_preconditioner_dim is not None and "max_preconditioner_dim" in overrides:
            overrides["max_preconditioner_dim"] = args.max_preconditioner_dim
        if args.max_factor_dim is not None and name == "EKFAC":
            overrides["max_factor_dim"] = args.max_factor_dim
        if args.max_factor_dim is not None and name == "SINGD":
            overrides["structures"] = (f"block{args.max_factor_dim}diagonal", "dense")
        if any("distributor" in inspect.signature(c).parameters for c in cls.__mro__ if c is not object):
            overrides["distributor"] = True
        optimizer = build_optimizer(name, model, "*", **overrides)
        clock = {"comm": 0.0}
        assignment: dict[str, list] = {"costs": [], "owners": []}
        if hasattr(optimizer, "distributor"):
            _instrument(optimizer.distributor, clock)
            _record_assignment(optimizer.distributor, assignment)
            if isinstance(getattr(optimizer, "_ownership", None), LayerOwnership):
                optimizer._ownership._key = None  # assigned at construction: assign again, recorded
        wrapped = DistributedDataParallel(model) if args.parallel == "ddp" else model
        generator = torch.Generator().manual_seed(1000 + rank)
        batches = [tuple(t.to(device) for t in _make_batch(args, generator)) for _ in range(4)]
        whole, steps, comm = [], [], []
        for index in range(args.warmup + args.steps):
            x, y = batches[index % 4]
            _sync(device)
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(wrapped(x).flatten(0, -2), y.flatten()).backward()
            _sync(device)
            stepped = time.perf_counter()
            clock["comm"] = 0.0
            optimizer.step()
            _sync(device)
            ended = time.perf_counter()
            if index >= args.warmup:
                whole.append(ended - began)
                steps.append(ended - stepped)
                comm.append(clock["comm"])
        # The slowest rank sets the pace: take per-quantity maxima over ranks.
        local = torch.tensor(
            [
                statistics.median(whole),
                sum(whole) / len(whole),
                statistics.median(steps),
                sum(steps) / len(steps),
                sum(comm) / len(comm),
                float(_state_bytes(optimizer)),
            ],
            dtype=torch.float64,
            device=device,
        )
        compute = torch.tensor([values_of(steps) - values_of(comm)], dtype=torch.float64, device=device)
        per_rank_compute = [torch.zeros_like(compute) for _ in range(world)]
        dist.all_gather(per_rank_compute, compute)
        per_rank_compute = [float(c) for c in per_rank_compute]
        units: list[list[int]] = [[] for _ in range(world)]
        dist.all_gather_object(units, _unit_bytes(optimizer))
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        values = local.tolist()
        rank_bytes = [float(sum(u)) for u in units]
        largest_unit = float(max((b for u in units for b in u), default=0))
        cost_loads = [0.0] * world
        for cost, owner in zip(assignment["costs"], assignment["owners"], strict=True):
            cost_loads[owner] += cost
        rows.append(
            {
                "optimizer": name,
                "world_size": world,
                "train_step_median_ms": 1e3 * values[0],
                "train_step_mean_ms": 1e3 * values[1],
                "opt_step_median_ms": 1e3 * values[2],
                "opt_step_mean_ms": 1e3 * values[3],
                "comm_mean_ms": 1e3 * values[4],
                "comm_share": values[4] / values[3] if values[3] > 0 else 0.0,
                "max_rank_state_bytes": int(values[5]),
                "rank_unit_bytes": rank_bytes,
                "largest_unit_bytes": largest_unit,
                "units": sum(len(u) for u in units),
                "bytes_max_over_mean": max(rank_bytes) / (sum(rank_bytes) / world) if sum(rank_bytes) else float("nan"),
                "bytes_max_over_bound": _bound_ratio(rank_bytes, largest_unit),
                "rank_compute_ms": [1e3 * c for c in per_rank_compute],
                "compute_max_over_mean": max(per_rank_compute) / (sum(per_rank_compute) / world),
                "cost_max_over_bound": _bound_ratio(cost_loads, max(assignment["costs"], default=0.0))
                if assignment["costs"] else float("nan"),
            }
        )
    if rank == 0:
        with open(args.result, "w") as handle:
            json.dump({"device": device.type, "rows": rows}, handle)
    # DDP holds the process group: freed after it was destroyed, it left a rank hanging at
    # exit now and then (gloo, torch 2.13), so it goes first.
    del wrapped, optimizer, model
    gc.collect()
    dist.barrier()  # no rank leaves while a peer still works
    dist.destroy_process_group()


def values_of(samples: list[float]) -> float:
    """Mean of ``samples`` (the amortised value over the timed window)."""
    return sum(samples) / len(samples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    """Launch one torchrun per world size and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default="AdamW,Shampoo,EKFAC,AdaFisher,SINGD")
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--model", choices=("mlp", "lm", "cnn"), default="mlp")
    parser.add_argument("--batch", type=int, default=None,
                        help="examples per rank per step (default: mlp 256, lm 8, cnn 64)")
    parser.add_argument("--max-preconditioner-dim", type=int, default=None,
                        help="Shampoo's block size (default: 1024)")
    parser.add_argument("--max-factor-dim", type=int, default=None,
                        help="EKFAC's max_factor_dim and SINGD's K structure block<B>diagonal "
                             "(default: whole factors)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--out", default=os.path.join("bench_results", "step_time_distributed"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = DEFAULT_BATCH[args.model]
    if args.worker:
        worker(args)
        return 0
    available = []
    for name in args.optimizers.split(","):
        try:
            resolve_target(REGISTRY[name].target)
            available.append(name)
        except Exception as error:  # noqa: BLE001 - a missing optimizer is skipped, with a note
            print(f"skipping {name}: {error}")
    rows = []
    device = "cpu"
    for world in [int(w) for w in args.world_sizes.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={world}",
                "-m",
                "benchmarks.step_time_distributed",
                "--worker",
                "--result",
                result.name,
                "--optimizers",
                ",".join(available),
                "--width",
                str(args.width),
                "--model",
                args.model,
                *(["--max-preconditioner-dim", str(args.max_preconditioner_dim)]
                  if args.max_preconditioner_dim is not None else []),
                *(["--max-factor-dim", str(args.max_factor_dim)] if args.max_factor_dim is not None else []),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--parallel",
                args.parallel,
            ]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            with open(result.name) as handle:
                data = json.load(handle)
            rows += data["rows"]
            device = data["device"]
    base = {row["optimizer"]: row for row in rows if row["world_size"] == 1}
    model_name = {"mlp": f"MLP((256, {args.width}, {args.width}, 10))", "lm": "W2 ByteTransformer (full)",
                  "cnn": "digits CNN"}[args.model]
    lines = [
        f"{model_name}, {args.parallel}, batch {args.batch} per rank, {device}, "
        f"{args.steps} timed steps",
        f"{'optimizer':<12} {'ws':>2} {'train ms':>9} {'step med':>9} {'step mean':>9} "
        f"{'comm %':>7} "
        f"{'state MB':>9} {'vs ws1':>7} {'B max/mean':>10} {'B max/bnd':>9} {'unit%':>6} "
        f"{'t max/mean':>10} {'cost max/bnd':>12}",
    ]
    for row in rows:
        ratio = (
            row["max_rank_state_bytes"] / base[row["optimizer"]]["max_rank_state_bytes"]
            if row["optimizer"] in base and base[row["optimizer"]]["max_rank_state_bytes"]
            else float("nan")
        )
        row["state_ratio_vs_ws1"] = ratio
        total = sum(row["rank_unit_bytes"])
        lines.append(
            f"{row['optimizer']:<12} {row['world_size']:>2} {row['train_step_mean_ms']:>9.1f} "
            f"{row['opt_step_median_ms']:>9.1f} {row['opt_step_mean_ms']:>9.1f} "
            f"{100 * row['comm_share']:>6.1f}% "
            f"{row['max_rank_state_bytes'] / 2**20:>9.2f} {ratio:>7.2f} "
            f"{row['bytes_max_over_mean']:>10.2f} {row['bytes_max_over_bound']:>9.2f} "
            f"{100 * row['largest_unit_bytes'] / total if total else float('nan'):>5.0f}% "
            f"{row['compute_max_over_mean']:>10.2f} {row['cost_max_over_bound']:>12.2f}"
        )
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    name = f"step_time_distributed{'' if args.model == 'mlp' else '_' + args.model}"
    name += ".json" if args.parallel == "ddp" else "_fsdp.json"
    with open(os.path.join(args.out, name), "w") as handle:
        json.dump(
            {"device": device, "parallel": args.parallel, "model": args.model, "width": args.width,
             "batch": args.batch, "rows": rows},
            handle,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
