"""Train-step cost against AdamW, interleaved in one process (robust on a shared machine).

    python -m benchmarks.train_step_cost [--optimizers Shampoo-SOAP,EKFAC,...] [--lm-size quick|full]
                                         [--steps 30] [--warmup 3]

The race's timing columns divide two runs made minutes apart, so on a shared machine another
process's load lands on one side only. Here AdamW and each optimizer train two copies of the
benchmark byte-level transformer (W2) in the same loop, alternating which goes first every
step, on the same batches: load changes hit both sides alike. Each side's train step is
forward + backward + ``step()``, timed separately; every optimizer is at its constructor
defaults (lr 3e-3, the race's best lr for all of them; the lr does not change the cost) with
the mode that names it (``benchmarks.defaults_race.ENTRIES``). Reported per optimizer: mean
train step over AdamW's mean (amortised: refresh steps included), the same with medians
(a plain step), and mean ``step()`` over AdamW's. One thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.defaults_race import ENTRIES, SKIPS
from benchmarks.registry import resolve_target
from benchmarks.workloads import WORKLOADS

DEFAULT_OPTIMIZERS = "Shampoo,Shampoo-SOAP,EKFAC,AdaFisherW,SINGD,SINGD-diag,SANIA"


def _build(name: str, model: torch.nn.Module, lr: float) -> tuple[torch.optim.Optimizer, str | None]:
    target, needs_model, closure, mode = ENTRIES[name]
    kwargs = dict(mode, lr=lr, **({"model": model} if needs_model else {}))
    return resolve_target(target)(model.parameters(), **kwargs), closure


def _train_step(model, optimizer, closure, task, batch) -> tuple[float, float]:
    """One forward + backward + step; ``(train seconds, step seconds)``."""
    inputs, targets = batch
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss(model(inputs), targets)
    loss.backward()
    middle = time.perf_counter()
    optimizer.step((lambda: loss) if closure == "loss" else None)
    end = time.perf_counter()
    return end - start, end - middle


def measure(name: str, task, steps: int, warmup: int, lr: float = 3e-3) -> dict[str, float]:
    """Interleaved AdamW vs ``name`` on ``task``: the ratios of the module docstring."""
    torch.manual_seed(0)
    models = [task.make_model(), task.make_model()]
    models[1].load_state_dict(models[0].state_dict())
    sides = [(torch.optim.AdamW(models[0].parameters(), lr=lr), None), _build(name, models[1], lr)]
    generator = torch.Generator().manual_seed(0)
    times: list[list[tuple[float, float]]] = [[], []]
    for step in range(warmup + steps):
        batch = task.train_batch(generator)
        order = (0, 1) if step % 2 == 0 else (1, 0)
        for side in order:
            optimizer, closure = sides[side]
            measured = _train_step(models[side], optimizer, closure, task, batch)
            if step >= warmup:
                times[side].append(measured)
    adam_train, adam_step = zip(*times[0])
    ours_train, ours_step = zip(*times[1])
    return {
        "train_mean_ratio": statistics.mean(ours_train) / statistics.mean(adam_train),
        "train_median_ratio": statistics.median(ours_train) / statistics.median(adam_train),
        "step_mean_ratio": statistics.mean(ours_step) / statistics.mean(adam_step),
        "adamw_train_ms": 1e3 * statistics.mean(adam_train),
        "train_ms": 1e3 * statistics.mean(ours_train),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS)
    parser.add_argument("--lm-size", default="quick", choices=("quick", "full"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"Invalid steps/warmup: {args.steps}/{args.warmup} (need steps ≥ 1, warmup ≥ 0)")
    torch.set_num_threads(1)
    task = WORKLOADS["W2"].setup(args.lm_size == "quick", args.warmup + args.steps)
    print(f"W2 {args.lm_size} transformer, {args.steps} timed steps after {args.warmup}, "
          "interleaved with AdamW in one process, 1 thread")
    print("| optimizer | train step × AdamW (mean) | (median) | step() × AdamW (mean) | train step ms |")
    print("|---|---|---|---|---|")
    for name in [n.strip() for n in args.optimizers.split(",") if n.strip()]:
        if (name, "lm") in SKIPS:
            continue
        row = measure(name, task, args.steps, args.warmup)
        print(f"| {name} | {row['train_mean_ratio']:.2f} | {row['train_median_ratio']:.2f} | "
              f"{row['step_mean_ratio']:.1f} | {row['train_ms']:.1f} (AdamW {row['adamw_train_ms']:.1f}) |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
