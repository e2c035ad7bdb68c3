"""Optimizer step time and state size against AdamW, and the bare linear algebra of Shampoo.

    python -m benchmarks.step_time [--optimizers a,b] [--frequencies 1,10,100] [--batch 1024]
                                   [--threads 1] [--scale 1.0] [--out DIR]

Model: ``MLP((256, 1024, 1024, 10))`` (1,323,018 parameters). A pool of four real gradients
(four random batches of ``--batch`` inputs with random labels, cross-entropy) is computed once;
each timed step copies the next one into ``.grad`` and times ``optimizer.step()`` alone, so the
forward/backward cost does not drown the optimizer's. Closure-driven entries are timed with
their closure (forward + backward included; the table says so).

Every registry entry is measured (AdamW first); entries that declare ``frequency_arg`` run at
each ``--frequencies`` value; entries that fail to import (peers not installed) are skipped.
Per configuration: median step (at frequency >= 10 almost all steps skip the amortized work),
mean over whole periods (the amortized cost) and optimizer-state bytes. Every time is taken
both by the wall clock and as process CPU time; with one torch thread the CPU time is the
steadier figure when other processes share the cores (the JSON holds both).

For Shampoo it also times the bare linear algebra the step must do: per 2-D block ``(m, n)``
the factor updates ``G Gᵀ`` and ``Gᵀ G`` and the preconditioning ``L^{-1/4} G R^{-1/4}`` (four
matmuls per step) plus, every ``f`` steps, one ``eigh`` per factor and the root
``Q diag(λ^{-1/4}) Qᵀ``; for ``Shampoo-SOAP`` rows the floor is the factor products and two
rotations per step (``Qᵀ G Q`` in, the result ``Q · Qᵀ`` out; the first moment is kept in the
eigenbasis) plus, per refresh, one warm-started QR step per factor and one rotation of the first
moment. The per-step part is timed right after each optimizer step, on matrices of the same
sizes, so that both see the same load on a shared machine (timed apart, the two drifted by
±5 % between runs); the refresh part is timed alone. On the same factors it times the cheap
refreshes (``refresh_method``): coupled Newton roots against eigh + root, and one warm-started
QR step against eigh (SOAP mode), with their accuracy. It prints ``amortized step / bare linear
algebra`` at each frequency, by the wall clock, in CPU time and against the per-step floor
timed alone (hot caches: the stricter figure; the target is <= 1.05 at frequencies 10 and
100). Eigh is also timed on every core to show
the multi-threaded collapse (reference/pytorch_conventions.md, appendix). Outputs
``step_time.json`` in ``--out`` (default ``bench_results/step_time``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from benchmarks.models import MLP, count_parameters
from benchmarks.registry import REGISTRY, EntryUnavailable, build_optimizer, resolve_target
from benchmarks.report import finite_or_none
from secondorder.precond.linalg import coupled_newton_inverse_root, warm_started_eigenbasis

SIZES = (256, 1024, 1024, 10)
POOL = 4
#: entries timed against their linear-algebra floor: two-sided products per block and step
FLOOR_ROTATIONS = {"Shampoo": 1, "Shampoo-SOAP": 2}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by tensors in ``optimizer.state`` (each storage counted once)."""
    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(dict(optimizer.state))
    return total


def batch_pool(batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``POOL`` random batches: inputs ``(batch, 256)`` float32, labels ``(batch,)`` int64."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, SIZES[0], generator=gen),
            torch.randint(0, SIZES[-1], (batch,), generator=gen),
        )
        for _ in range(POOL)
    ]


def gradient_pool(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[list[list[torch.Tensor]], float]:
    """Real gradients of ``model`` on each batch (one tensor per parameter, the parameter's
    shape) and the median forward+backward time in ms."""
    pool, times = [], []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times.append(1e3 * (time.perf_counter() - t0))
        pool.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return pool, statistics.median(times)


def per_step_floor(shapes: list[tuple[int, ...]], rotations: int) -> Callable[[], None]:
    """The per-step linear algebra of a Kronecker step on parameters of ``shapes``, as one call:
    per 2-D ``(m, n)`` the factor products ``G Gᵀ`` and ``Gᵀ G`` and ``rotations`` two-sided
    products ``A G B`` (root mode 1: ``L G R``; SOAP mode 2: ``Qᵀ G Q`` in and ``Q G' Qᵀ`` out)
    on random matrices of the same sizes."""
    gen = torch.Generator().manual_seed(1)
    mats = [(torch.randn(m, n, generator=gen), torch.randn(m, m, generator=gen), torch.randn(n, n, generator=gen))
            for m, n in (shape for shape in shapes if len(shape) == 2)]

    def run() -> None:
        for g, left, right in mats:
            torch.matmul(g, g.T)
            torch.matmul(g.T, g)
            for _ in range(rotations):
                torch.linalg.multi_dot([left, g, right])

    return run


def time_steps(
    name: str, overrides: dict[str, Any], steps: int, warmup: int, batch: int,
    floor: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time ``steps`` optimizer steps (after ``warmup``) of entry ``name`` on the benchmark MLP.

    Gradients: plain entries get the pooled gradients copied into ``.grad`` (no backward);
    ``pass_model`` entries (layer capture through hooks) get a real forward/backward before
    each step, timed apart as ``fwd_bwd_ms`` (hooks included) next to the plain model's
    ``plain_fwd_bwd_ms``; ``closure`` entries are timed with their closure. ``floor``: timed
    right after each measured step (``floor_ms`` / ``floor_cpu_ms``, means), so that the step
    and its linear-algebra floor see the same load on a shared machine. Returns per-step
    times in ms, their median, the mean over the measured window and the state bytes.
    """
    entry = REGISTRY[name]
    torch.manual_seed(0)
    model = MLP(SIZES)
    batches = batch_pool(batch)
    pool, plain_fwd_bwd = gradient_pool(model, batches)
    optimizer = build_optimizer(name, model, "*", **overrides)
    params = list(model.parameters())
    x, y = batches[0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if entry.make_closure is not None:  # e.g. a closure that leaves backward to the optimizer
        closure = entry.make_closure(model, x, y, F.cross_entropy, optimizer)
    times, cpu_times, fwd_bwd, floor_times, floor_cpu_times = [], [], [], [], []
    for i in range(warmup + steps):
        if entry.pass_model and not entry.closure:
            bx, by = batches[i % POOL]
            optimizer.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            F.cross_entropy(model(bx), by).backward()
            fwd_bwd.append(1e3 * (time.perf_counter() - t0))
        elif not entry.closure:
            for p, g in zip(params, pool[i % POOL], strict=True):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.step(closure) if entry.closure else optimizer.step()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if i >= warmup:
            times.append(1e3 * elapsed)
            cpu_times.append(1e3 * cpu)
            if floor is not None:
                t0, c0 = time.perf_counter(), time.process_time()
                floor()
                floor_times.append(1e3 * (time.perf_counter() - t0))
                floor_cpu_times.append(1e3 * (time.process_time() - c0))
    return {
        "optimizer": name,
        "overrides": {k: repr(v) for k, v in overrides.items()},
        "includes_forward_backward": entry.closure,
        "fwd_bwd_ms": statistics.median(fwd_bwd) if fwd_bwd else None,
        "plain_fwd_bwd_ms": plain_fwd_bwd,
        "steps": steps,
        "warmup": warmup,
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "max_ms": max(times),
        "cpu_median_ms": statistics.median(cpu_times),
        "cpu_mean_ms": statistics.fmean(cpu_times),
        "floor_ms": statistics.fmean(floor_times) if floor_times else None,
        "floor_cpu_ms": statistics.fmean(floor_cpu_times) if floor_cpu_times else None,
        "state_bytes": state_bytes(optimizer),
        "times_ms": times,
        "cpu_times_ms": cpu_times,
    }


def _median_ms(fn: Callable[..., Any], reps: int, *args: torch.Tensor) -> tuple[float, float]:
    """Median wall and process-CPU time in ms of ``fn(*args)`` over ``reps`` calls after one
    warm-up call."""
    fn(*args)  # warm-up (allocations, MKL/LAPACK workspace)
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(*args)
        wall.append(1e3 * (time.perf_counter() - t0))
        cpu.append(1e3 * (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


def _root(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Q diag(s) Qᵀ`` for eigenvectors ``q (d, d)`` and root eigenvalues ``s (d,)``."""
    return (q * s) @ q.T


def shampoo_linalg(
    shapes: list[tuple[int, ...]], reps: int, eigh_threads: list[int]
) -> dict[str, Any]:
    """Time the bare linear algebra of one Shampoo step on parameters of ``shapes``.

    Every 2-D shape ``(m, n)`` (all dims <= 1024 here, so one block per matrix) contributes
    per step ``G Gᵀ`` (m×n·n×m), ``Gᵀ G`` (n×m·m×n), ``L G`` (m×m·m×n) and ``(L G) R``
    (m×n·n×n); and per amortized step, for each factor dim ``d`` in ``(m, n)``, one fp32
    ``eigh`` of a d×d SPD matrix and the root ``(Q·s) Qᵀ`` (d×d·d×d). 1-D parameters get a
    diagonal preconditioner (elementwise, not counted). Returns ms per item and the sums
    ``per_step_ms`` and ``amortized_ms`` at the current thread count; ``eigh_ms_by_threads``
    repeats the eigh sum at each of ``eigh_threads``.
    """
    gen = torch.Generator().manual_seed(0)
    per_step: dict[str, tuple[float, float]] = {}
    amortized: dict[str, tuple[float, float]] = {}
    dims: list[int] = []
    for shape in shapes:
        if len(shape) != 2:
            continue
        m, n = shape
        g = torch.randn(m, n, generator=gen)
        lm, rn = torch.randn(m, m, generator=gen), torch.randn(n, n, generator=gen)
        per_step[f"GGt {m}x{n}"] = _median_ms(torch.matmul, reps, g, g.T)
        per_step[f"GtG {m}x{n}"] = _median_ms(torch.matmul, reps, g.T, g)
        per_step[f"LGR {m}x{n}"] = _median_ms(torch.linalg.multi_dot, reps, [lm, g, rn])
        dims += [m, n]
    spd = {}
    for d in sorted(set(dims)):
        a = torch.randn(d, 2 * d, generator=gen)
        spd[d] = a @ a.T / (2 * d) + 1e-6 * torch.eye(d)
    for d in spd:  # each distinct factor size is timed once and counted per factor
        count = dims.count(d)
        q = torch.linalg.eigh(spd[d]).eigenvectors
        s = torch.rand(d, generator=gen)
        eigh_wall, eigh_cpu = _median_ms(torch.linalg.eigh, 3, spd[d])
        root_wall, root_cpu = _median_ms(_root, reps, q, s)
        amortized[f"eigh {d}x{d} x{count}"] = (count * eigh_wall, count * eigh_cpu)
        amortized[f"root {d}x{d} x{count}"] = (count * root_wall, count * root_cpu)
    refresh = refresh_costs(spd, dims, reps)
    threads_now = torch.get_num_threads()
    eigh_by_threads = {
        str(threads_now): sum(v[0] for k, v in amortized.items() if k.startswith("eigh"))
    }
    for threads in eigh_threads:  # the same eighs on other thread counts (can be very slow)
        if threads != threads_now:
            torch.set_num_threads(threads)
            eigh_by_threads[str(threads)] = sum(
                dims.count(d) * _median_ms(torch.linalg.eigh, 3, spd[d])[0] for d in spd
            )
    torch.set_num_threads(threads_now)
    return {
        "per_step": per_step,
        "amortized": amortized,
        "per_step_ms": sum(v[0] for v in per_step.values()),
        "amortized_ms": sum(v[0] for v in amortized.values()),
        "per_step_cpu_ms": sum(v[1] for v in per_step.values()),
        "amortized_cpu_ms": sum(v[1] for v in amortized.values()),
        "eigh_ms_by_threads": eigh_by_threads,
        "refresh": refresh,
    }


def _perturbed(matrix: torch.Tensor, seed: int) -> torch.Tensor:
    """``matrix`` plus a 10% symmetric PSD perturbation: the next refresh's factor."""
    gen = torch.Generator().manual_seed(seed)
    d = matrix.shape[0]
    noise = torch.randn(d, d // 4 + 1, generator=gen)
    return matrix + 0.1 * noise @ noise.T / noise.shape[1]


def refresh_costs(spd: dict[int, torch.Tensor], dims: list[int], reps: int) -> dict[str, Any]:
    """Amortised work per method on the same factors: ``eigh`` + root (root mode) against
    coupled Newton (root ``p = 4``), and ``eigh`` against one warm-started QR step (SOAP
    mode, from the previous refresh's basis). Per distinct factor size ``d`` (counted per
    factor as in :func:`shampoo_linalg`): ms per method, Newton's iterations and its root's
    largest relative difference from the eigh root, and the QR basis's subspace error on the
    top quarter of the spectrum. Returns per-size rows and the per-refresh sums."""
    rows = {}
    totals = {"eigh_root": 0.0, "newton_root": 0.0, "eigh_basis": 0.0, "qr_basis": 0.0, "qr_basis_cpu": 0.0}
    for d, previous in spd.items():
        count = dims.count(d)
        current = _perturbed(previous, d)
        old_basis = torch.linalg.eigh(previous).eigenvectors
        values, vectors = torch.linalg.eigh(current)
        eigh_root = _root(vectors, values.pow(-0.25))
        eigh_ms = _median_ms(torch.linalg.eigh, 3, current)[0]
        root_ms = _median_ms(_root, reps, vectors, values)[0]
        newton_ms = _median_ms(lambda m: coupled_newton_inverse_root(m, 4), 3, current)[0]
        newton_root, residual = coupled_newton_inverse_root(current, 4)
        qr_ms, qr_cpu_ms = _median_ms(warm_started_eigenbasis, 3, current, old_basis)
        _, qr_basis, _ = warm_started_eigenbasis(current, old_basis)
        top = max(1, d // 4)
        exact_top, qr_top = vectors.flip(1)[:, :top], qr_basis[:, :top]
        rows[str(d)] = {
            "count": count, "eigh_ms": eigh_ms, "root_ms": root_ms, "newton_ms": newton_ms,
            "newton_residual": residual, "qr_ms": qr_ms, "qr_cpu_ms": qr_cpu_ms,
            "newton_vs_eigh_root": float((newton_root - eigh_root).abs().max() / eigh_root.abs().max()),
            "qr_top_subspace_error": float(torch.linalg.matrix_norm(qr_top @ qr_top.T - exact_top @ exact_top.T)),
        }
        totals["eigh_root"] += count * (eigh_ms + root_ms)
        totals["newton_root"] += count * newton_ms
        totals["eigh_basis"] += count * eigh_ms
        totals["qr_basis"] += count * qr_ms
        totals["qr_basis_cpu"] += count * qr_cpu_ms
    return {"per_size": rows, "per_refresh_ms": totals}


def plan(
    names: list[str], frequencies: list[int], scale: float
) -> list[tuple[str, dict[str, Any], int, int, int | None]]:
    """Configurations to time: ``(name, overrides, steps, warmup, frequency)``.

    A frequency-swept entry at ``f`` is timed over a whole number of periods (20 steps at
    f = 1, 10 periods at f = 10, 3 periods at f = 100, times ``scale``, at least one period)
    after a warm-up of one period (at most 20 steps) that includes the first amortized step.
    Other entries: 50·scale steps after 5 warm-up steps.
    """
    configs = []
    for name in names:
        entry = REGISTRY[name]
        if entry.frequency_arg is None:
            configs.append((name, {}, max(5, int(50 * scale)), 5, None))
            continue
        for f in frequencies:
            periods = {1: 20}.get(f, 10 if f <= 10 else 3)
            steps = max(f, f * int(round(periods * scale)))
            configs.append((name, {entry.frequency_arg: f}, steps, min(f, 20) if f > 1 else 3, f))
    return configs


def format_table(
    rows: list[dict[str, Any]], linalg: dict[str, Any] | None, baseline: dict[str, Any]
) -> str:
    """The printed table: median / mean step, ratio to AdamW's median, state MiB, forward +
    backward time for hook-based entries (vs the plain model), and for Shampoo the mean step
    over the bare linear algebra at that frequency."""
    columns = (
        "optimizer",
        "f",
        "median ms",
        "mean ms (amortized)",
        "× AdamW median",
        "state MiB",
        "fwd+bwd ms (plain)",
        "amortized / bare linalg: timed beside (CPU time; timed alone)",
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        ratio, fwd = row.get("over_bare_linalg"), row.get("fwd_bwd_ms")
        ratio_cpu = row.get("over_bare_linalg_cpu")
        cells = [
            row["optimizer"] + (" (incl. fwd/bwd)" if row["includes_forward_backward"] else ""),
            "—" if row.get("frequency") is None else str(row["frequency"]),
            f"{row['median_ms']:.2f}",
            f"{row['mean_ms']:.2f}",
            f"{row['median_ms'] / baseline['median_ms']:.1f}",
            f"{row['state_bytes'] / 2**20:.1f}",
            "—" if fwd is None else f"{fwd:.1f} ({row['plain_fwd_bwd_ms']:.1f})",
            "—" if ratio is None else f"{ratio:.3f} ({ratio_cpu:.3f}; {row['over_bare_linalg_alone']:.3f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if linalg is not None:
        eigh = ", ".join(
            f"{k} thread(s) {v:.0f} ms" for k, v in linalg["eigh_ms_by_threads"].items()
        )
        lines.append(
            f"\nShampoo bare linear algebra: {linalg['per_step_ms']:.2f} ms per step (4 matmuls "
            f"per block) + {linalg['amortized_ms']:.1f} ms per amortized step (eigh + root per "
            f"factor); all eighs of one amortized step: {eigh}. Wall-clock times unless marked "
            f"CPU (process CPU time: steadier when other processes share the cores)"
        )
        totals = linalg["refresh"]["per_refresh_ms"]
        lines.append(
            f"\nAmortised refresh of the same factors, ms per refresh: root mode eigh + root "
            f"{totals['eigh_root']:.1f}, coupled Newton {totals['newton_root']:.1f}; SOAP mode "
            f"eigh {totals['eigh_basis']:.1f}, warm-started QR {totals['qr_basis']:.1f}"
        )
        for d, row in linalg["refresh"]["per_size"].items():
            lines.append(
                f"  d={d} (x{row['count']}): eigh {row['eigh_ms']:.1f} + root {row['root_ms']:.1f}, "
                f"Newton {row['newton_ms']:.1f} (residual {row['newton_residual']:.1e}, max rel. diff "
                f"to eigh root {row['newton_vs_eigh_root']:.1e}), QR {row['qr_ms']:.1f} (top-quarter "
                f"subspace error {row['qr_top_subspace_error']:.1e})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.step_time --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--optimizers", help="comma-separated registry names (default: all importable)"
    )
    parser.add_argument(
        "--frequencies", default="1,10,100", help="precondition frequencies to sweep"
    )
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiplies the number of timed steps"
    )
    parser.add_argument(
        "--reps", type=int, default=15, help="repetitions per bare linear-algebra timing"
    )
    parser.add_argument("--out", default=os.path.join("bench_results", "step_time"))
    args = parser.parse_args(argv)
    try:
        frequencies = [int(f) for f in args.frequencies.split(",") if f.strip()]
    except ValueError:
        parser.error(f"Invalid --frequencies: {args.frequencies!r}")
    if (
        not frequencies
        or min(frequencies) < 1
        or args.batch < 1
        or args.threads < 1
        or args.scale <= 0
    ):
        parser.error(
            "Invalid arguments: frequencies, --batch and --threads must be >= 1, --scale > 0"
        )
    names = [n.strip() for n in args.optimizers.split(",")] if args.optimizers else list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        parser.error(f"Invalid --optimizers: unknown {unknown} (known: {', '.join(REGISTRY)})")
    names = ["AdamW"] + [n for n in names if n != "AdamW"]
    torch.set_num_threads(args.threads)
    print(
        f"MLP{SIZES}: {count_parameters(MLP(SIZES)):,} parameters, batch {args.batch}, "
        f"{args.threads} torch thread(s)",
        flush=True,
    )

    rows, skipped = [], {}
    for name, overrides, steps, warmup, f in plan(names, frequencies, args.scale):
        if name in skipped:
            continue
        try:
            if REGISTRY[name].target:
                resolve_target(REGISTRY[name].target)
            floor = None
            if name in FLOOR_ROTATIONS and f is not None:
                floor = per_step_floor([tuple(p.shape) for p in MLP(SIZES).parameters()], FLOOR_ROTATIONS[name])
            row = time_steps(name, overrides, steps, warmup, args.batch, floor)
        except (EntryUnavailable, ImportError) as error:
            skipped[name] = str(error)
            print(f"  skipping {name}: {error}", flush=True)
            continue
        except Exception as error:  # noqa: BLE001 - one broken optimizer must not end the benchmark
            skipped[name] = f"{type(error).__name__}: {error}"
            print(f"  {name} failed: {skipped[name]}", flush=True)
            continue
        row["frequency"] = f
        rows.append(row)
        print(
            f"  {name} f={f}: median {row['median_ms']:.2f} ms, mean {row['mean_ms']:.2f} ms, "
            f"state {row['state_bytes'] / 2**20:.1f} MiB",
            flush=True,
        )

    linalg = None
    if any(row["optimizer"] in ("Shampoo", "Shampoo-SOAP") for row in rows):
        shapes = [tuple(p.shape) for p in MLP(SIZES).parameters()]
        eigh_threads = sorted({1, args.threads, os.cpu_count() or 1})
        linalg = shampoo_linalg(shapes, args.reps, eigh_threads)
        refresh = linalg["refresh"]["per_refresh_ms"]
        for row in rows:
            if row["optimizer"] not in FLOOR_ROTATIONS or not row["frequency"]:
                continue
            f, rotations = row["frequency"], FLOOR_ROTATIONS[row["optimizer"]]
            for clock, suffix in ((0, ""), (1, "_cpu")):
                products = sum(t[clock] for key, t in linalg["per_step"].items() if not key.startswith("LGR"))
                rotation = sum(t[clock] for key, t in linalg["per_step"].items() if key.startswith("LGR"))
                # per refresh, root mode: eigh + root per factor; SOAP mode: one warm-started QR
                # step per factor and one rotation of the first moment into the new basis
                amortized = (linalg["amortized" + suffix + "_ms"] if row["optimizer"] == "Shampoo"
                             else refresh["qr_basis" + suffix] + rotation)
                bare = row["floor" + suffix + "_ms"] + amortized / f  # per step: timed beside each step
                row["bare_linalg" + suffix + "_ms"] = bare
                row["over_bare_linalg" + suffix] = row["cpu_mean_ms" if suffix else "mean_ms"] / bare
                if not suffix:  # the same floor timed alone: its matrices stay in cache
                    alone = products + rotations * rotation + amortized / f
                    row["over_bare_linalg_alone"] = row["mean_ms"] / alone
    baseline = next(row for row in rows if row["optimizer"] == "AdamW")
    table = format_table(rows, linalg, baseline)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    result = {
        "model": f"MLP{SIZES}",
        "params": count_parameters(MLP(SIZES)),
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "rows": rows,
        "shampoo_linalg": linalg,
        "skipped": skipped,
    }
    with open(os.path.join(args.out, "step_time.json"), "w") as handle:
        json.dump(finite_or_none(result), handle, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(table + "\n")
    print(f"wrote {args.out}/step_time.json and table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
