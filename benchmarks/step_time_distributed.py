"""Step time, all-gather share and per-rank optimizer state at world sizes 1 and 2.

    python -m benchmarks.step_time_distributed [--optimizers Shampoo,EKFAC] [--world-sizes 1,2]
                                               [--width 512] [--batch 256] [--steps 30] [--out DIR]
                                               [--parallel ddp|fsdp]

For each world size the script launches itself under ``torchrun --standalone`` (gloo on CPU,
nccl when CUDA is available; one torch thread per rank on CPU) and each rank trains
``MLP((256, width, width, 10))`` DDP-wrapped (``--parallel fsdp``: FSDP2 ``fully_shard`` on
every Linear and the root) on its own random batches of ``--batch`` examples. Timed per
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

from benchmarks.models import MLP
from benchmarks.registry import REGISTRY, build_optimizer, resolve_target

# Frequencies as in benchmarks.step_time's middle setting.
OVERRIDES = {
    "Shampoo": dict(precondition_frequency=10, max_preconditioner_dim=1024),
    "EKFAC": dict(stats_every=10, precondition_frequency=10),
    "AdaFisher": dict(update_freq=10),
    "SINGD": dict(T=10),
}
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
        model = MLP((256, args.width, args.width, 10)).to(device)
        if args.parallel == "fsdp":  # shard before the optimizer sees the parameters
            mesh = init_device_mesh(device.type, (world,))
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        entry = REGISTRY[name]
        cls = resolve_target(entry.target)
        overrides = dict(OVERRIDES.get(name, {}))
        if "distributor" in inspect.signature(cls).parameters:
            overrides["distributor"] = True
        optimizer = build_optimizer(name, model, "*", **overrides)
        clock = {"comm": 0.0}
        if hasattr(optimizer, "distributor"):
            _instrument(optimizer.distributor, clock)
        wrapped = DistributedDataParallel(model) if args.parallel == "ddp" else model
        generator = torch.Generator().manual_seed(1000 + rank)
        batches = [
            (
                torch.randn(args.batch, 256, generator=generator).to(device),
                torch.randint(0, 10, (args.batch,), generator=generator).to(device),
            )
            for _ in range(4)
        ]
        whole, steps, comm = [], [], []
        for index in range(args.warmup + args.steps):
            x, y = batches[index % 4]
            _sync(device)
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(wrapped(x), y).backward()
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
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        values = local.tolist()
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    """Launch one torchrun per world size and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default="AdamW,Shampoo,EKFAC,AdaFisher,SINGD")
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="examples per rank per step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--out", default=os.path.join("bench_results", "step_time_distributed"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
    lines = [
        f"MLP((256, {args.width}, {args.width}, 10)), {args.parallel}, batch {args.batch} per rank, {device}, "
        f"{args.steps} timed steps",
        f"{'optimizer':<10} {'ws':>2} {'train ms':>9} {'step med':>9} {'step mean':>9} "
        f"{'comm %':>7} "
        f"{'state MB':>9} {'vs ws1':>7}",
    ]
    for row in rows:
        ratio = (
            row["max_rank_state_bytes"] / base[row["optimizer"]]["max_rank_state_bytes"]
            if row["optimizer"] in base and base[row["optimizer"]]["max_rank_state_bytes"]
            else float("nan")
        )
        row["state_ratio_vs_ws1"] = ratio
        lines.append(
            f"{row['optimizer']:<10} {row['world_size']:>2} {row['train_step_mean_ms']:>9.1f} "
            f"{row['opt_step_median_ms']:>9.1f} {row['opt_step_mean_ms']:>9.1f} "
            f"{100 * row['comm_share']:>6.1f}% "
            f"{row['max_rank_state_bytes'] / 2**20:>9.2f} {ratio:>7.2f}"
        )
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    name = "step_time_distributed.json" if args.parallel == "ddp" else "step_time_distributed_fsdp.json"
    with open(os.path.join(args.out, name), "w") as handle:
        json.dump(
            {"device": device, "parallel": args.parallel, "width": args.width, "batch": args.batch, "rows": rows},
            handle,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
