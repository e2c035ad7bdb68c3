"""Peak memory of one ExactGaussNewton step at a fixed batch while the model width doubles.

    python -m benchmarks.gauss_newton_memory [--widths 64,128,256,512,1024,2048] [--batch 64]
                                             [--classes 10] [--full-limit-gib 3] [--out DIR]

Model ``MLP((64, w, w, classes))``, cross-entropy, ``b = --batch`` random inputs, so the batch
system has ``bc × bc`` entries whatever the width. Two Jacobian paths are measured:

* **Gram** (``model=`` given, the default): ``J Jᵀ`` assembled layer by layer from captured
  activations and output gradients (:mod:`secondorder.precond.jacobian`). Expected memory
  ``O((bc)² + b·w)``: it should grow with the activations only (linearly in ``w``), far less
  than the parameter count (quadratically in ``w``).
* **full Jacobian** (``model=None``): ``J`` (``bc × p``) from batched autograd, the naive path;
  expected ``O(bc·p)``. Skipped where ``bc·p·4`` bytes exceed ``--full-limit-gib``.

Each measurement runs in a fresh subprocess: it builds everything, runs one plain forward and
backward (allocator and kernels warm), reads its resident set size, runs one optimizer step and
reads the peak resident set size (``getrusage``); the figure is the difference (the step's own
peak), plus the wall time of the step. CPU, float32, one torch thread. Writes
``gauss_newton_memory.json`` and ``table.md`` to ``--out`` (default
``bench_results/gauss_newton_memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

INPUTS = 64


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(width: int, batch: int, classes: int, path: str) -> dict:
    """One step in this process; returns the step's peak RSS increase and its wall time."""
    from benchmarks.models import MLP, count_parameters
    from secondorder import ExactGaussNewton

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLP((INPUTS, width, width, classes))
    x = torch.randn(batch, INPUTS)
    y = torch.randint(0, classes, (batch,))
    optimizer = ExactGaussNewton(
        model.parameters(),
        model=model if path == "gram" else None,
        loss="cross_entropy",
        damping=1e-2,
        solve="batch",
    )
    F.cross_entropy(model(x), y).backward()  # warm allocator and kernels
    model.zero_grad(set_to_none=True)
    before = _resident_bytes()
    start = time.perf_counter()
    optimizer.step(lambda: (model(x), y))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "width": width,
        "params": count_parameters(model),
        "path": path,
        "batch": batch,
        "classes": classes,
        "step_peak_bytes": max(0, peak - before),
        "step_s": seconds,
    }


def run_child(width: int, batch: int, classes: int, path: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.gauss_newton_memory",
        "--child",
        path,
        "--widths",
        str(width),
        "--batch",
        str(batch),
        "--classes",
        str(classes),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], batch: int, classes: int) -> str:
    mib = 2.0**20
    bc = batch * classes
    lines = [
        f"One ExactGaussNewton step, MLP(({INPUTS}, w, w, {classes})), batch {batch} (bc = {bc}), "
        f"float32, 1 thread. K = (bc)² floats = {4 * bc * bc / mib:.1f} MiB.",
        "",
        "| width w | parameters p | J = bc·p floats (MiB) | Gram path: step peak MiB | step s | "
        "full-Jacobian path: step peak MiB | step s |",
        "|---|---|---|---|---|---|---|",
    ]
    by_width: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_width.setdefault(row["width"], {})[row["path"]] = row
    for width in sorted(by_width):
        gram, full = by_width[width].get("gram"), by_width[width].get("full")
        params = (gram or full)["params"]
        full_cells = (
            f"{full['step_peak_bytes'] / mib:.1f} | {full['step_s']:.2f}"
            if full
            else "skipped (over --full-limit-gib) | —"
        )
        lines.append(
            f"| {width} | {params:,} | {4 * bc * params / mib:.0f} | "
            f"{gram['step_peak_bytes'] / mib:.1f} | {gram['step_s']:.2f} | {full_cells} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.gauss_newton_memory --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="64,128,256,512,1024,2048")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--full-limit-gib",
        type=float,
        default=3.0,
        help="skip the full-Jacobian path where J alone would exceed this",
    )
    parser.add_argument("--out", default=os.path.join("bench_results", "gauss_newton_memory"))
    parser.add_argument("--child", choices=("gram", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        parser.error(f"Invalid --widths: {args.widths!r}")
    if not widths or min(widths) < 1 or args.batch < 1 or args.classes < 2:
        parser.error("Invalid arguments: widths and --batch must be >= 1, --classes >= 2")
    if args.child:
        print(json.dumps(measure(widths[0], args.batch, args.classes, args.child)))
        return 0
    rows = []
    for width in widths:
        params = (
            INPUTS * width + width + width * width + width + width * args.classes + args.classes
        )
        for path in ("gram", "full"):
            if (
                path == "full"
                and 4 * args.batch * args.classes * params > args.full_limit_gib * 2**30
            ):
                continue
            row = run_child(width, args.batch, args.classes, path)
            rows.append(row)
            print(
                f"  w={width} p={row['params']:,} {path}: "
                f"step peak {row['step_peak_bytes'] / 2**20:.1f} MiB, "
                f"{row['step_s']:.2f} s",
                flush=True,
            )
    table = format_table(rows, args.batch, args.classes)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gauss_newton_memory.json"), "w") as handle:
        json.dump(
            {
                "rows": rows,
                "batch": args.batch,
                "classes": args.classes,
                "torch": torch.__version__,
            },
            handle,
            indent=1,
        )
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(table + "\n")
    print(f"wrote {args.out}/gauss_newton_memory.json and table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
