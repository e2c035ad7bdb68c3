"""Shampoo and SOAP step() on a GPU against the linear algebra they must do (and Meta's, if installed).

    bash benchmarks/gpu_check.sh                     # the whole check, a few minutes on one GPU
    python -m benchmarks.gpu_check [--device cuda] [--sizes 256,1024,1024,10] [--batch 4096]
                                   [--frequencies 10,100] [--periods 3] [--out DIR]

Runs with this repository's code only (torch with CUDA, no network). Model: an MLP of
``--sizes`` (default the 1.3M-parameter ``MLP(256, 1024, 1024, 10)`` of ``benchmarks.step_time``;
``--sizes 1024,4096,4096,1024`` gives 16-block layers). Four real gradients are computed once;
every timed step copies the next into ``.grad`` and runs ``optimizer.step()`` alone.

Per configuration (AdamW; Shampoo root mode with ``eigh`` and ``newton`` refreshes; SOAP mode
with ``eigh`` and ``qr`` refreshes; distributed_shampoo's classic configuration and its
``DefaultSOAPConfig`` when importable) and frequency ``f``:

* **mean ms/step** over ``--periods`` whole periods after one warm-up period (amortised cost),
  timed between two ``torch.cuda.synchronize()``;
* **median ms** of the steps without amortised work (CUDA events);
* **syncs/step**: host synchronisations counted by ``torch.cuda.set_sync_debug_mode("warn")``
  over three plain steps (0 is the target);
* **state MiB** and the **floor**: the same shapes' bare linear algebra, timed alone on the
  device. Root mode per step: ``G Gᵀ``, ``Gᵀ G``, ``L G R`` per 2-D block; per refresh one
  ``eigh`` and one root ``Q diag(s) Qᵀ`` per factor. SOAP per step: the two factor products and
  two rotations (``Qᵀ G Q`` for Λ and the first moment, which is kept in the eigenbasis, and the
  back-projection; four matmuls); per refresh one ``eigh`` (or QR step) per factor and one
  rotation of the first moment into the new basis. ``step / floor`` is printed beside each row.

Writes ``gpu_check.json`` and ``table.md`` to ``--out`` (default ``bench_results/gpu_check``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from benchmarks.models import MLP, count_parameters
from benchmarks.step_time import state_bytes
from secondorder import Shampoo
from secondorder.distributed.blocking import BlockLayout
from secondorder.precond.linalg import warm_started_eigenbasis

POOL = 4
BLOCK = 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(fn: Callable[..., Any], device: torch.device, reps: int, *args: Any) -> float:
    """Median ms of ``fn(*args)`` over ``reps`` calls after one warm-up, synchronising around each."""
    fn(*args)
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _factor_products(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return g @ g.T, g.T @ g


def _root(vectors: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (vectors * scale) @ vectors.T


def block_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """Every 2-D block Shampoo preconditions (1-D parameters are diagonal by default)."""
    return [shape for p in model.parameters() if p.dim() == 2
            for shape in BlockLayout.for_shape(tuple(p.shape), BLOCK).shapes]


def floors(shapes: list[tuple[int, ...]], device: torch.device, reps: int) -> dict[str, float]:
    """Bare linear algebra in ms: per step and per refresh, for root mode and SOAP mode."""
    gen = torch.Generator(device=device).manual_seed(0)
    root_step = soap_step = rotations = 0.0
    dims: list[int] = []
    timed: dict[tuple[int, int], tuple[float, float, float]] = {}
    for shape in shapes:
        if len(shape) == 1:  # a small matrix merged into a vector: one d×d factor
            g = torch.randn(shape[0], generator=gen, device=device)
            root_matrix = torch.randn(shape[0], shape[0], generator=gen, device=device)
            outer = _elapsed_ms(torch.outer, device, reps, g, g)
            apply = _elapsed_ms(torch.matmul, device, reps, root_matrix, g)
            root_step += outer + apply
            soap_step += outer + 2 * apply
            rotations += apply
            dims.append(shape[0])
            continue
        m, n = shape
        if (m, n) not in timed:
            g = torch.randn(m, n, generator=gen, device=device)
            left = torch.randn(m, m, generator=gen, device=device)
            right = torch.randn(n, n, generator=gen, device=device)
            products = _elapsed_ms(_factor_products, device, reps, g)
            sandwich = _elapsed_ms(torch.linalg.multi_dot, device, reps, [left.T, g, right])
            timed[m, n] = (products, sandwich, 0.0)
        products, sandwich, _ = timed[m, n]
        root_step += products + sandwich
        soap_step += products + 2 * sandwich
        rotations += sandwich
        dims += [m, n]
    eigh = root = qr = 0.0
    for d in sorted(set(dims)):
        a = torch.randn(d, 2 * d, generator=gen, device=device)
        spd = a @ a.T / (2 * d) + 1e-6 * torch.eye(d, device=device)
        vectors = torch.linalg.eigh(spd).eigenvectors
        scale = torch.rand(d, generator=gen, device=device)
        count = dims.count(d)
        eigh += count * _elapsed_ms(torch.linalg.eigh, device, 3, spd)
        root += count * _elapsed_ms(_root, device, reps, vectors, scale)
        qr += count * _elapsed_ms(warm_started_eigenbasis, device, reps, spd, vectors)
    return {"root_per_step_ms": root_step, "root_per_refresh_ms": eigh + root, "soap_per_step_ms": soap_step,
            "soap_per_refresh_ms": eigh + rotations, "qr_per_refresh_ms": qr + rotations}


def configurations(frequency: int) -> list[tuple[str, str, Callable[[list], torch.optim.Optimizer]]]:
    """``(name, floor kind, factory)``: ours, then Meta's when ``distributed_shampoo`` imports."""
    common = dict(lr=1e-3, precondition_frequency=frequency)
    configs = [
        ("Shampoo eigh", "root", lambda p: Shampoo(p, **common)),
        ("Shampoo newton", "root", lambda p: Shampoo(p, refresh_method="newton", **common)),
        ("SOAP eigh", "soap", lambda p: Shampoo(p, eigenvalue_correction=True, **common)),
        ("SOAP qr", "soap", lambda p: Shampoo(p, eigenvalue_correction=True, refresh_method="qr", **common)),
    ]
    try:
        import distributed_shampoo as meta
    except ImportError:
        return configs
    meta_common = dict(lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, max_preconditioner_dim=BLOCK,
                       precondition_frequency=frequency, start_preconditioning_step=frequency)
    configs.append(("Meta Shampoo (Adam graft)", "root", lambda p: meta.DistributedShampoo(
        p, grafting_config=meta.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8), **meta_common)))
    configs.append(("Meta DefaultSOAPConfig", "soap", lambda p: meta.DistributedShampoo(
        p, preconditioner_config=meta.DefaultSOAPConfig, **{**meta_common, "epsilon": 1e-8})))
    return configs


def time_optimizer(factory: Callable[[list], torch.optim.Optimizer], sizes: tuple[int, ...], batch: int,
                   frequency: int | None, periods: int, device: torch.device) -> dict[str, Any]:
    """Amortised mean, plain-step median, syncs per plain step and state bytes of one optimizer."""
    torch.manual_seed(0)
    model = MLP(sizes).to(device)
    pool = []
    for _ in range(POOL):
        x = torch.randn(batch, sizes[0], device=device)
        y = torch.randint(0, sizes[-1], (batch,), device=device)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        pool.append([p.grad.detach().clone() for p in model.parameters()])
    params = list(model.parameters())
    optimizer = factory(params)
    period = frequency or 10
    counter = 0

    def one_step() -> None:
        nonlocal counter
        for p, g in zip(params, pool[counter % POOL]):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        counter += 1
        optimizer.step()

    for _ in range(period + 1):  # warm-up, the first refresh included
        one_step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(periods * period):
        one_step()
    _sync(device)
    mean_ms = 1e3 * (time.perf_counter() - start) / (periods * period)
    plain = []
    for _ in range(period):
        due = frequency is not None and (counter + 1) % frequency == 0
        _sync(device)
        begin = time.perf_counter()
        one_step()
        _sync(device)
        if not due:
            plain.append(1e3 * (time.perf_counter() - begin))
    syncs = None
    if device.type == "cuda":
        while frequency is not None and (counter + 1) % frequency in (0, 1, 2):
            one_step()  # three plain steps ahead
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(3):
                    one_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught) / 3
    return {"mean_ms": mean_ms, "median_plain_ms": statistics.median(plain) if plain else None,
            "syncs_per_plain_step": syncs, "state_bytes": state_bytes(optimizer)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="256,1024,1024,10")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--frequencies", default="10,100")
    parser.add_argument("--periods", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=os.path.join("bench_results", "gpu_check"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("Invalid --device: cuda requested but torch.cuda.is_available() is False")
    try:
        sizes = tuple(int(s) for s in args.sizes.split(","))
        frequencies = [int(f) for f in args.frequencies.split(",")]
    except ValueError:
        parser.error("Invalid --sizes/--frequencies: comma-separated integers expected")
    if len(sizes) < 2 or min(sizes) < 1 or min(frequencies) < 1 or args.periods < 1 or args.batch < 1:
        parser.error("Invalid arguments: sizes, frequencies, --periods and --batch must be >= 1")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"MLP{sizes}: {count_parameters(MLP(sizes)):,} parameters, batch {args.batch}, {name}, "
          f"torch {torch.__version__}", flush=True)
    floor = floors(block_shapes(MLP(sizes)), device, args.reps)
    print("floor (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in floor.items()), flush=True)
    rows = [{"optimizer": "AdamW", "frequency": None, "floor_ms": None, **time_optimizer(
        lambda p: torch.optim.AdamW(p, lr=1e-3), sizes, args.batch, None, args.periods, device)}]
    for f in frequencies:
        for label, kind, factory in configurations(f):
            try:
                row = time_optimizer(factory, sizes, args.batch, f, args.periods, device)
            except Exception as error:  # noqa: BLE001 - one failing entry must not end the check
                print(f"  {label} f={f} failed: {type(error).__name__}: {error}", flush=True)
                continue
            refresh = floor["qr_per_refresh_ms"] if label == "SOAP qr" else floor[f"{kind}_per_refresh_ms"]
            row.update(optimizer=label, frequency=f, floor_ms=floor[f"{kind}_per_step_ms"] + refresh / f)
            rows.append(row)
            print(f"  {label} f={f}: mean {row['mean_ms']:.2f} ms, floor {row['floor_ms']:.2f} ms", flush=True)
    lines = ["| optimizer | f | mean ms | plain median ms | floor ms | mean / floor | syncs/step | state MiB |",
             "|---|---|---|---|---|---|---|---|"]
    def cell(value: float | None, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    for row in rows:
        floor_ms = row["floor_ms"]
        ratio = None if floor_ms is None else row["mean_ms"] / floor_ms
        cells = [row["optimizer"], str(row["frequency"] or "—"), cell(row["mean_ms"]), cell(row["median_plain_ms"]),
                 cell(floor_ms), cell(ratio), cell(row["syncs_per_plain_step"], 1),
                 cell(row["state_bytes"] / 2**20, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as handle:
        json.dump({"device": name, "sizes": sizes, "batch": args.batch, "torch": torch.__version__,
                   "floor": floor, "rows": rows}, handle, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(table + "\n")
    print(f"wrote {args.out}/gpu_check.json and table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
