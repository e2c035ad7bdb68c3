"""SINGD step time against singd 0.0.5 (``pip install --no-deps singd==0.0.5 einops einconv``).

    python -m benchmarks.step_time_singd [--structures dense,diagonal] [--T 1,10] [--batch 128]
                                         [--sizes 256,256,256,10] [--steps 40] [--threads 1]
                                         [--out DIR]

SINGD reads layer inputs and output gradients in hooks during backward, so a bare ``step()`` on
copied gradients (what ``benchmarks.step_time`` does for other optimizers) never updates its
factors. Here both implementations run whole training steps on the same model, data and
settings (``zero_grad``, forward, cross-entropy, backward, ``step``), interleaved step by step so
that background load hits both alike, and forward+backward alone is timed on a hook-free copy.
Per configuration: the mean over whole periods of ``T`` steps (the amortized cost), the median
step, the optimizer's share (mean minus forward+backward), the ratio ``secondorder / singd``
and the largest parameter difference after the run (the two should agree to float32 rounding).
Reference figures (reference/singd.md §15, 2-core CPU, MLP 256-256-256-10, batch 128): singd
dense 19.6 / 9.0 ms at T = 1 / 10, diagonal 5.95 / 4.27 ms. Writes ``step_time_singd.json``
and ``table.md`` in ``--out`` (default ``bench_results/step_time_singd``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from torch.nn import functional as F

from benchmarks.models import MLP

SETTINGS = dict(lr=1e-3, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=1e-2)


def _train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    x: torch.Tensor,
    y: torch.Tensor,
) -> float:
    """One timed step (ms): zero_grad, forward, loss, backward, and ``step`` if an optimizer."""
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    if optimizer is not None:
        optimizer.step()
    return 1e3 * (time.perf_counter() - t0)


def compare(
    structure: str, T: int, sizes: tuple[int, ...], batch: int, steps: int
) -> dict[str, Any]:
    """Time secondorder.SINGD and singd.SINGD side by side; returns one table row."""
    from singd.optim.optimizer import SINGD as PeerSINGD

    from secondorder import SINGD

    torch.manual_seed(0)
    model = MLP(sizes)
    peer_model, bare_model = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = SINGD(model, T=T, structures=(structure, structure), **SETTINGS)
        peer = PeerSINGD(peer_model, T=T, structures=(structure, structure), **SETTINGS)
    gen = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(batch, sizes[0], generator=gen),
            torch.randint(0, sizes[-1], (batch,), generator=gen),
        )
        for _ in range(4)
    ]
    warmup = T if T > 1 else 3
    periods = max(1, steps // T)
    total = warmup + periods * T
    times: dict[str, list[float]] = {"secondorder": [], "singd": [], "forward_backward": []}
    for i in range(total):
        x, y = data[i % len(data)]
        runs = [
            ("secondorder", model, ours),
            ("singd", peer_model, peer),
            ("forward_backward", bare_model, None),
        ]
        if i % 2:
            runs.reverse()
        for key, net, opt in runs:
            elapsed = _train_step(net, opt, x, y)
            if i >= warmup:
                times[key].append(elapsed)
    difference = max(
        (p - q).abs().max().item()
        for p, q in zip(model.parameters(), peer_model.parameters(), strict=True)
    )
    row: dict[str, Any] = {
        "structure": structure,
        "T": T,
        "batch": batch,
        "steps": len(times["singd"]),
        "max_param_difference": difference,
    }
    for key, values in times.items():
        row[f"{key}_mean_ms"] = statistics.fmean(values)
        row[f"{key}_median_ms"] = statistics.median(values)
    backward = row["forward_backward_mean_ms"]
    row["secondorder_optimizer_ms"] = row["secondorder_mean_ms"] - backward
    row["singd_optimizer_ms"] = row["singd_mean_ms"] - backward
    row["ratio_mean"] = row["secondorder_mean_ms"] / row["singd_mean_ms"]
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`compare` rows."""
    lines = [
        "| structure | T | fwd+bwd ms | singd ms/step | secondorder ms/step | ratio | "
        "singd opt. ms | secondorder opt. ms | max Δparam |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['structure']} | {row['T']} | {row['forward_backward_mean_ms']:.2f} | "
            f"{row['singd_mean_ms']:.2f} | {row['secondorder_mean_ms']:.2f} | "
            f"{row['ratio_mean']:.2f} | "
            f"{row['singd_optimizer_ms']:.2f} | {row['secondorder_optimizer_ms']:.2f} | "
            f"{row['max_param_difference']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.step_time_singd --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", default="dense,diagonal")
    parser.add_argument("--T", default="1,10", help="update intervals to time")
    parser.add_argument("--sizes", default="256,256,256,10", help="MLP layer widths")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps (whole periods of T)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join("bench_results", "step_time_singd"))
    args = parser.parse_args(argv)
    try:
        import singd  # noqa: F401
    except ImportError:
        print(
            "singd is not installed (pip install --no-deps singd==0.0.5 einops einconv); "
            "nothing to compare"
        )
        return 0
    try:
        intervals = [int(t) for t in args.T.split(",") if t.strip()]
        sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        parser.error("Invalid --T or --sizes: comma-separated integers expected")
    if not intervals or min(intervals) < 1 or len(sizes) < 2 or args.batch < 1 or args.steps < 1:
        parser.error("Invalid arguments: T, batch and steps must be >= 1, sizes needs two widths")
    torch.set_num_threads(args.threads)
    rows = []
    for structure in [s.strip() for s in args.structures.split(",") if s.strip()]:
        for T in intervals:
            row = compare(structure, T, sizes, args.batch, args.steps)
            rows.append(row)
            print(
                f"  {structure} T={T}: singd {row['singd_mean_ms']:.2f} ms, secondorder "
                f"{row['secondorder_mean_ms']:.2f} ms (ratio {row['ratio_mean']:.2f})",
                flush=True,
            )
    table = format_table(rows)
    print(
        f"MLP{sizes}, batch {args.batch}, {args.threads} thread(s), "
        f"torch {torch.__version__}\n{table}"
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step_time_singd.json"), "w") as handle:
        json.dump(
            {"sizes": sizes, "threads": args.threads, "torch": torch.__version__, "rows": rows},
            handle,
            indent=1,
        )
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
