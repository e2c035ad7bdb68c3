"""The optimizer race: every registered optimizer against AdamW on the same data and seed.

    python -m benchmarks.race [--quick] [--optimizers a,b] [--workloads W1,W2] [--steps N]
                              [--out DIR] [--threads T] [--seed S] [--no-tensorboard]

For each workload (``benchmarks/workloads.py``) and each optimizer (``benchmarks/registry.py``)
the race trains a freshly seeded model on one fixed batch sequence, evaluates train and
held-out loss every ``eval_every`` steps, and reports final train / held-out loss, accuracy,
the steps needed to reach AdamW's final held-out loss (and their ratio to AdamW's own), wall
time and ms per training step. Outputs in ``--out`` (default ``bench_results/race``):
``race.json`` (every figure and curve), ``table.md``, ``loss_curves.png`` and TensorBoard
event files under ``tensorboard/<workload>/<optimizer>``.

``--quick`` (what ``make demo`` runs) uses the smaller W2 model and fewer steps (300 on W1,
400 on W2) and races the registry's quick subset (AdamW and every optimizer of the suite) unless ``--optimizers`` names
others. Torch runs on ``--threads`` threads (1 by default: multi-threaded eigh collapses on
small shared machines, see reference/pytorch_conventions.md).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Any

import torch

from benchmarks.registry import REGISTRY, EntryUnavailable, build_optimizer, default_closure
from benchmarks.report import add_targets, format_table, write_json, write_png
from benchmarks.workloads import WORKLOADS, Task, evaluate, lr_factor

BASELINE = "AdamW"


class _Scalars:
    """TensorBoard writer for one run, or a no-op when TensorBoard is off."""

    def __init__(self, log_dir: str | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run_one(
    task: Task, workload: str, name: str, seed: int, log_dir: str | None, quick: bool = True
) -> dict[str, Any]:
    """Train entry ``name`` on ``task``; returns the run's record (see ``race.json``).

    The model is built after ``torch.manual_seed(seed)`` and batches come from a generator
    seeded with ``seed``, so every optimizer sees the same initial weights and data order.
    Raises :class:`EntryUnavailable` if the optimizer cannot be imported.
    """
    entry = REGISTRY[name]
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = build_optimizer(name, model, workload, quick=quick)
    scheduler = None
    if entry.schedule:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, task.steps, task.warmup)
        )
    make_closure = entry.make_closure or default_closure
    generator = torch.Generator().manual_seed(seed)
    scalars = _Scalars(log_dir)
    record: dict[str, Any] = {
        "optimizer": name,
        "workload": workload,
        "status": "ok",
        "hyperparameters": {k: repr(v) for k, v in entry.kwargs_for(workload, quick).items()},
        "batch_loss": [],
        "evals": [],
    }
    train_s = step_s = 0.0
    start = time.perf_counter()

    def do_eval(step: int) -> None:
        figures = evaluate(model, task)
        figures.update(step=step, train_s=train_s)
        record["evals"].append(figures)
        for key, value in figures.items():
            if key not in ("step", "train_s"):
                scalars.add(f"eval/{key}", value, step)

    try:
        do_eval(0)
        for step in range(1, task.steps + 1):
            inputs, targets = task.train_batch(generator)
            t0 = time.perf_counter()
            if entry.closure:
                loss = optimizer.step(make_closure(model, inputs, targets, task.loss, optimizer))
                t1 = t0
            else:
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss(model(inputs), targets)
                loss.backward()
                t1 = time.perf_counter()
                optimizer.step()
            t2 = time.perf_counter()
            train_s += t2 - t0
            step_s += t2 - t1
            if scheduler is not None:
                scheduler.step()
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            record["batch_loss"].append(value)
            scalars.add("train/batch_loss", value, step)
            scalars.add("train/lr", optimizer.param_groups[0]["lr"], step)
            if not math.isfinite(value):
                record["status"] = "diverged"
                print(
                    f"  {name} on {workload}: non-finite loss at step {step}; stopping this run",
                    flush=True,
                )
                do_eval(step)
                break
            if step % task.eval_every == 0 or step == task.steps:
                do_eval(step)
    finally:
        scalars.close()
    steps_done = len(record["batch_loss"])
    record.update(
        steps=steps_done,
        wall_s=time.perf_counter() - start,
        train_s=train_s,
        ms_per_step=1e3 * train_s / max(1, steps_done),
        optimizer_ms_per_step=None if entry.closure else 1e3 * step_s / max(1, steps_done),
        final=record["evals"][-1],
    )
    return record


def select_optimizers(names: str | None, quick: bool) -> list[str]:
    """The optimizers to race: the named ones, else the quick subset (``--quick``) or every
    non-peer entry. AdamW, the baseline, always comes first."""
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in REGISTRY]
        if unknown:
            raise ValueError(
                f"Invalid --optimizers: unknown {unknown} (known: {', '.join(REGISTRY)})"
            )
    else:
        chosen = [n for n, e in REGISTRY.items() if (e.quick or not quick) and not e.peer]
    return [BASELINE] + [n for n in chosen if n != BASELINE]


def race(
    workloads: list[str],
    optimizers: list[str],
    quick: bool,
    steps: int | None,
    seed: int,
    out: str,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Run every (workload, optimizer) pair; returns the whole result (also written to ``out``)."""
    os.makedirs(out, exist_ok=True)
    result: dict[str, Any] = {
        "config": {
            "quick": quick,
            "steps": steps,
            "seed": seed,
            "optimizers": optimizers,
            "workloads": workloads,
            "threads": torch.get_num_threads(),
        },
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "workloads": {},
        "skipped": {},
    }
    started = time.perf_counter()
    for workload in workloads:
        task = WORKLOADS[workload].setup(quick, steps)
        print(
            f"{workload}: {WORKLOADS[workload].description} - {task.meta['model']}, "
            f"{task.meta['params']:,} parameters, {task.steps} steps",
            flush=True,
        )
        runs: dict[str, Any] = {}
        for name in optimizers:
            if name in result["skipped"]:
                continue
            if workload in REGISTRY[name].skip_workloads:
                why = REGISTRY[name].skip_workloads[workload]
                runs[name] = {
                    "optimizer": name,
                    "workload": workload,
                    "status": "not applicable",
                    "why": why,
                }
                print(f"  {name}: not applicable on {workload} ({why})", flush=True)
                continue
            log_dir = os.path.join(out, "tensorboard", workload, name) if tensorboard else None
            try:
                runs[name] = run_one(task, workload, name, seed, log_dir, quick)
            except (EntryUnavailable, ImportError) as error:
                result["skipped"][name] = str(error)
                print(f"  skipping {name}: {error}", flush=True)
                continue
            except Exception as error:  # noqa: BLE001 - one broken optimizer must not end the race
                runs[name] = {
                    "optimizer": name,
                    "workload": workload,
                    "status": "error",
                    "error": f"{type(error).__name__}: {error}",
                }
                print(f"  {name} on {workload} failed: {type(error).__name__}: {error}", flush=True)
                continue
            run = runs[name]
            final = run["final"]["test_loss"]
            print(
                f"  {name}: held-out loss {final:.4f} after {run['steps']} steps, "
                f"{run['wall_s']:.1f} s",
                flush=True,
            )
        result["workloads"][workload] = {
            "description": WORKLOADS[workload].description,
            "meta": task.meta,
            "steps": task.steps,
            "eval_every": task.eval_every,
            "runs": runs,
        }
    add_targets(result, BASELINE)
    result["total_wall_s"] = time.perf_counter() - started
    table = format_table(result)
    print(table)
    print(f"total wall time {result['total_wall_s']:.1f} s", flush=True)
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write(table + "\n")
    write_png(result, os.path.join(out, "loss_curves.png"))
    write_json(result, os.path.join(out, "race.json"))
    print(
        f"wrote {out}/race.json, table.md, loss_curves.png"
        + (", tensorboard/" if tensorboard else "")
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.race --help``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small W2 model, fewer steps, the quick optimizer subset",
    )
    parser.add_argument("--optimizers", help=f"comma-separated names from: {', '.join(REGISTRY)}")
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated, e.g. W1,W2"
    )
    parser.add_argument(
        "--steps", type=int, help="training steps per run (overrides the workload's)"
    )
    parser.add_argument(
        "--out", default=os.path.join("bench_results", "race"), help="output folder"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-tensorboard", action="store_true", help="skip TensorBoard event files"
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"Invalid --steps: {args.steps} (must be >= 1)")
    if args.threads < 1:
        parser.error(f"Invalid --threads: {args.threads} (must be >= 1)")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        parser.error(f"Invalid --workloads: {args.workloads!r} (known: {', '.join(WORKLOADS)})")
    try:
        optimizers = select_optimizers(args.optimizers, args.quick)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    race(
        workloads, optimizers, args.quick, args.steps, args.seed, args.out, not args.no_tensorboard
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
