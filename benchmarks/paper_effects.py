"""Papers' headline effects at small scale (issue 14 item 6), one table.

    python -m benchmarks.paper_effects [--quick] [--steps N] [--lm-seconds S] [--clock cpu|wall]

Every effect is measured against AdamW in the same run, with the same seed, initial weights
and batches for every optimizer; each optimizer is at its constructor defaults except ``lr``
(swept over ⅓, 1, 3 × the constructor's default, unless said otherwise) and what the effect
itself requires. The last column says whether the effect reproduced, by the criterion stated
below; where it did not, the row's numbers say by how much.

* **SANIA scale invariance** (Abdukhakimov et al. 2023): logistic regression on standardised
  ``load_breast_cancer``, then the same with feature ``j`` multiplied by ``e^{u_j}``,
  ``u_j ~ U[−4, 4]`` (the paper's protocol, k = 4). SANIA AdaGrad-SQR with ``eps = 0``
  (lr 1, the paper's step) and Adam (lr 1e-2) start from ``w = 0`` and follow the same
  batches. Reproduced when SANIA's two loss curves coincide (max gap < 1e-8; the iterates
  satisfy ``w' = V⁻¹w``) and Adam's do not (gap > 1e-3).
* **SINGD in true bf16** (Lin et al. 2024, "Structured Inverse-Free Natural Gradient"):
  the digits CNN of ``defaults_race`` trained with parameters ``.to(torch.bfloat16)``,
  bf16 inputs, no autocast, no fp32 master weights, and again in float32. SINGD, EKFAC and
  AdamW at their defaults, plus SINGD with ``preconditioner_dtype=torch.bfloat16`` (the
  paper's setting: its factors in bf16 too; by default SINGD and EKFAC keep curvature
  statistics in float32 for half-precision weights). Reported: best-lr held-out loss in each
  precision, how many of the 3 lrs diverged, and the skips / numerical failures the
  optimizers counted. Reproduced when SINGD in bf16 finished every lr without a skip or
  failure, ends below AdamW's bf16 held-out loss, and EKFAC degrades (diverged, skipped, or
  its bf16 loss exceeds its fp32 loss by more than SINGD's gap plus 0.02).
* **Exact Gauss-Newton vs AdamW** (Korbit et al. 2024): W3 (linear regression on
  ``load_diabetes``, MSE, ``loss="mse"``) and a 2-class problem (MLP 30-32-2 on standardised
  ``load_breast_cancer``, ``loss="cross_entropy"``), batch 64, AdamW with the shared
  cosine schedule, exact Gauss-Newton with its own step (no schedule), the same number of
  steps. Steps and seconds (train steps only, evaluation excluded) until each run's
  full-train-set and held-out loss first reach AdamW's (best lr) final ones. AdamW's row is
  its best lr by final held-out loss; exact Gauss-Newton's is the lr whose held-out loss
  gets there first (each lr's step count is shown). Also a 10-class problem, the W1 digits
  MLP 64-128-128-10 (its batch-space solve is 640 × 640). Reproduced when exact Gauss-Newton
  reaches both targets in fewer steps *and* fewer seconds than AdamW on every workload (the
  row of each workload says whether it did there).
* **AdaFisherW vs AdamW at equal wall-clock** (Gomes et al. 2025): W2, the byte-level
  transformer (quick size: d_model 64, context 64, batch 16); each run trains until its
  train-step time reaches the same budget (``--lm-seconds``), so the faster optimizer takes
  more steps; the warm-up + cosine LR schedule runs on the fraction of the budget spent.
  ``--clock cpu`` (default) measures the budget in this process's CPU time, which on one
  torch thread is the wall-clock of an idle machine and is not inflated by other processes
  on a shared one; ``--clock wall`` uses ``time.perf_counter``. Reproduced when AdaFisherW's
  best-lr held-out loss is below AdamW's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.defaults_race import default_lr as constructor_lr
from secondorder import EKFAC, SANIA, SINGD, AdaFisherW, ExactGaussNewton

LR_MULTIPLIERS = (1 / 3, 1.0, 3.0)
Row = tuple[str, str, str, str, str]  # effect, optimizer, setting, result, reproduced


# --------------------------------------------------------------------------- SANIA invariance
def _breast_cancer() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = np.asarray(data.data, dtype=np.float64)
    x = (x - x.mean(0)) / x.std(0)
    return torch.from_numpy(x), torch.from_numpy(np.asarray(data.target, dtype=np.float64))


def _train_logistic(name: str, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> list[float]:
    """Full-dataset loss after each step of ``name`` from ``w = 0`` (same batches every run)."""
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    if name == "SANIA":
        optimizer = SANIA([weight], lr=1.0, preconditioner="adagrad_sqr", eps=0.0)
    else:
        optimizer = torch.optim.Adam([weight], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)

        def closure(index=index):
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x[index] @ weight, y[index])
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            losses.append(float(F.binary_cross_entropy_with_logits(x @ weight, y)))
    return losses


def sania_invariance(steps: int) -> list[tuple[str, float, float, float]]:
    """Rows ``(optimizer, final loss unscaled, final loss rescaled, max |gap|)``."""
    x, y = _breast_cancer()
    u = torch.from_numpy(np.random.RandomState(0).uniform(-4, 4, x.shape[1]))
    rescaled = x * torch.exp(u)
    rows = []
    for name in ("SANIA", "Adam"):
        plain = _train_logistic(name, x, y, steps, 64)
        scaled = _train_logistic(name, rescaled, y, steps, 64)
        gap = max(abs(a - b) if math.isfinite(a - b) else math.inf for a, b in zip(plain, scaled))
        rows.append((name, plain[-1], scaled[-1], gap))
    return rows


def sania_rows(steps: int) -> list[Row]:
    measured = {name: (plain, scaled, gap) for name, plain, scaled, gap in sania_invariance(steps)}
    ok = measured["SANIA"][2] < 1e-8 and measured["Adam"][2] > 1e-3
    effect = "SANIA: trajectory unchanged by feature rescaling"
    rows = []
    for name, (plain, scaled, gap) in measured.items():
        setting = "AdaGrad-SQR, eps 0, lr 1" if name == "SANIA" else "lr 1e-2"
        rows.append((effect, name, setting, f"final loss {plain:.4f} / rescaled {scaled:.4f}; "
                     f"max gap between the curves {gap:.1e}", ""))
    rows[-1] = rows[-1][:4] + (_verdict(ok),)
    return rows


# --------------------------------------------------------------------------- shared training loop
@dataclass
class Curve:
    """One training run: per-step losses and cumulative train-step seconds (evaluation excluded)."""

    optimizer: str
    lr: float
    steps: int = 0
    status: str = "ok"
    seconds: list[float] = field(default_factory=list)  # cumulative, after each step
    train_loss: list[float] = field(default_factory=list)  # full train set, after each step
    test_loss: list[float] = field(default_factory=list)  # held-out, after each step
    skips: int = 0  # optimizer-counted non-finite skips + numerical failures
    param_dtypes: set = field(default_factory=set)
    state_dtypes: set = field(default_factory=set)

    @property
    def final(self) -> float:
        return self.test_loss[-1] if self.status == "ok" and self.test_loss else math.inf

    def first_reach(self, losses: list[float], target: float) -> tuple[int, float] | None:
        """(step, seconds) at which ``losses`` first is at most ``target``."""
        for index, value in enumerate(losses):
            if value <= target:
                return index + 1, self.seconds[index]
        return None


def _clock(kind: str) -> Callable[[], float]:
    if kind == "cpu":
        return time.process_time
    if kind == "wall":
        return time.perf_counter
    raise ValueError(f"Invalid clock: {kind!r} (expected 'cpu' or 'wall')")


@torch.no_grad()
def _mean_loss(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
               chunk: int = 512) -> float:
    """Mean of ``loss_fn`` over ``inputs (n, ...)`` / ``targets (n, ...)``, in float32."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(inputs), chunk):
        x, y = inputs[start:start + chunk], targets[start:start + chunk]
        weight = y.numel() if y.dtype == torch.int64 else len(y)
        # the model's outputs in its own dtype, the loss in float32: a bf16 loss is a 3-digit
        # number, too coarse to compare runs
        outputs = model(x).float()
        total += float(loss_fn(outputs, y.float() if y.is_floating_point() else y)) * weight
        count += weight
    model.train(was_training)
    return total / count


def _count_failures(optimizer: torch.optim.Optimizer) -> int:
    """Skips and numerical failures the optimizer counted in its state (0 for torch's)."""
    total = 0

    def walk(value: Any) -> None:
        nonlocal total
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("nonfinite_skips", "numerical_failures") and torch.is_tensor(item):
                    total += int(item)
                else:
                    walk(item)

    for value in optimizer.state.values():
        walk(value)
    return total


def _state_dtypes(optimizer: torch.optim.Optimizer) -> set:
    dtypes = set()

    def walk(value: Any) -> None:
        if torch.is_tensor(value) and value.is_floating_point() and value.numel() > 1:
            dtypes.add(value.dtype)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for value in optimizer.state.values():
        walk(value)
    return dtypes


def fit(task, name: str, build: Callable[[nn.Module, float], torch.optim.Optimizer], lr: float, *,
        steps: int | None = None, budget_s: float | None = None, clock: str = "cpu",
        dtype: torch.dtype = torch.float32, schedule: bool = True, closure: str | None = None,
        evaluate_every_step: bool = True, seed: int = 0) -> Curve:
    """Train a fresh ``task.make_model()`` (seed ``seed``) with ``build(model, lr)``.

    Stops after ``steps`` steps, or once the cumulative train-step time on ``clock`` reaches
    ``budget_s`` (then the schedule runs on the fraction of the budget spent). ``dtype``
    converts the model and floating inputs (bf16: no autocast, no master weights).
    ``closure="outputs"``: exact Gauss-Newton's closure returning ``(outputs, targets)``.
    """
    if (steps is None) == (budget_s is None):
        raise ValueError("Invalid steps/budget_s: give exactly one")
    torch.manual_seed(seed)
    model = task.make_model().to(dtype)
    optimizer = build(model, lr)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    evals = {k: (cast(x), cast(y)) for k, (x, y) in task.eval_sets.items()}
    generator = torch.Generator().manual_seed(seed)
    now = _clock(clock)
    curve = Curve(name, lr)
    spent, step = 0.0, 0
    warmup = task.warmup / task.steps if task.steps else 0.0
    while True:
        if steps is not None and step >= steps:
            break
        if budget_s is not None and spent >= budget_s:
            break
        inputs, targets = task.train_batch(generator)
        inputs, targets = cast(inputs), cast(targets)
        if schedule:
            progress = step / steps if steps is not None else spent / budget_s
            factor = _schedule(progress, warmup)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
        start = now()
        optimizer.zero_grad(set_to_none=True)
        if closure == "outputs":
            loss = optimizer.step(lambda x=inputs, y=targets: (model(x), y))
        else:
            loss = task.loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
        spent += now() - start
        step += 1
        curve.seconds.append(spent)
        if not math.isfinite(float(loss.detach().float())):
            curve.status = "diverged"
            break
        if evaluate_every_step or (budget_s is not None and spent >= budget_s) or step == steps:
            curve.train_loss.append(_mean_loss(model, task.loss, *evals["train"]))
            curve.test_loss.append(_mean_loss(model, task.loss, *evals["test"]))
    if curve.test_loss and not math.isfinite(curve.test_loss[-1]):
        curve.status = "diverged"
    curve.steps = step
    curve.skips = _count_failures(optimizer)
    curve.param_dtypes = {p.dtype for p in model.parameters()}
    curve.state_dtypes = _state_dtypes(optimizer)
    return curve


def _schedule(progress: float, warmup: float, floor: float = 0.1) -> float:
    """Warm-up over the first ``warmup`` fraction, then cosine from 1 to ``floor`` (the
    schedule of ``benchmarks.workloads.lr_factor``, on a fraction instead of a step count)."""
    if progress < warmup:
        return min(1.0, (progress + 1e-12) / warmup)
    done = min(1.0, (progress - warmup) / max(1e-12, 1.0 - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


def _verdict(ok: bool) -> str:
    return "**yes**" if ok else "**no**"


def _sweep(task, name: str, build, default_lr: float, **kwargs: Any) -> list[Curve]:
    return [fit(task, name, build, m * default_lr, **kwargs) for m in LR_MULTIPLIERS]


def _best(curves: list[Curve]) -> Curve:
    return min(curves, key=lambda c: c.final)


# --------------------------------------------------------------------------- SINGD in bf16
BF16_OPTIMIZERS: dict[str, tuple[float, Callable[[nn.Module, float], torch.optim.Optimizer]]] = {
    "AdamW": (constructor_lr("AdamW"), lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr)),
    "EKFAC": (constructor_lr("EKFAC"), lambda model, lr: EKFAC(model.parameters(), lr=lr, model=model)),
    "SINGD": (constructor_lr("SINGD"), lambda model, lr: SINGD(model.parameters(), lr=lr, model=model)),
    "SINGD, bf16 factors": (constructor_lr("SINGD"), lambda model, lr: SINGD(
        model.parameters(), lr=lr, model=model, preconditioner_dtype=torch.bfloat16)),
}


def bf16_runs(steps: int) -> dict[tuple[str, torch.dtype], list[Curve]]:
    """{(optimizer, dtype): the lr sweep's curves} on the digits CNN, bf16 and float32."""
    from benchmarks.defaults_race import cnn_task

    task = cnn_task(steps)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (default_lr, build) in BF16_OPTIMIZERS.items():
            runs[name, dtype] = _sweep(task, name, build, default_lr, steps=steps, dtype=dtype,
                                       evaluate_every_step=False)
    return runs


def _dtype_names(dtypes: set) -> str:
    names = sorted(str(d).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
                   for d in dtypes)
    return "+".join(names) or "—"


def bf16_rows(steps: int) -> list[Row]:
    runs = bf16_runs(steps)
    effect = f"SINGD stable and ahead in true bf16, EKFAC degrades (digits CNN, {steps} steps)"
    rows, summary = [], {}
    for name in BF16_OPTIMIZERS:
        parts = []
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            curves = runs[name, dtype]
            best = _best(curves)
            diverged = sum(c.status != "ok" or not math.isfinite(c.final) for c in curves)
            skips = sum(c.skips for c in curves)
            summary[name, label] = (best.final, diverged, skips)
            parts.append(f"{label}: held-out {best.final:.4f} (lr {best.lr:.2g}), diverged "
                         f"{diverged}/3, skips+failures {skips}")
        bf16_state = set().union(*(c.state_dtypes for c in runs[name, torch.bfloat16]))
        setting = f"state {_dtype_names(bf16_state)} in the bf16 runs"
        rows.append((effect, name, setting, "; ".join(parts), ""))
    singd_gap = summary["SINGD", "bf16"][0] - summary["SINGD", "fp32"][0]
    ekfac_bf16, ekfac_diverged, ekfac_skips = summary["EKFAC", "bf16"]
    ekfac_degrades = (ekfac_diverged > 0 or ekfac_skips > 0
                      or ekfac_bf16 - summary["EKFAC", "fp32"][0] > singd_gap + 0.02)
    verdicts = []
    for name in ("SINGD", "SINGD, bf16 factors"):
        final, diverged, skips = summary[name, "bf16"]
        verdicts.append(diverged == 0 and skips == 0 and final < summary["AdamW", "bf16"][0])
    ok = any(verdicts) and ekfac_degrades
    note = (f"SINGD ahead of AdamW in bf16: {'/'.join('yes' if v else 'no' for v in verdicts)} "
            f"(default / bf16 factors); EKFAC degrades: {'yes' if ekfac_degrades else 'no'} "
            f"(bf16 − fp32: EKFAC {ekfac_bf16 - summary['EKFAC', 'fp32'][0]:+.4f}, SINGD "
            f"{singd_gap:+.4f})")
    rows.append((effect, "verdict", "", note, _verdict(ok)))
    return rows


# --------------------------------------------------------------------------- exact Gauss-Newton
def _breast_cancer_task(steps: int):
    """2 classes: MLP 30-32-2 on standardised breast cancer (W3s's split, unscaled), batch 64."""
    from benchmarks.models import MLP
    from benchmarks.workload_regression import load_scaled_breast_cancer_split, setup_w3s

    task = setup_w3s(True, steps)
    split = load_scaled_breast_cancer_split(scale=0.0)

    def train_batch(gen: torch.Generator):
        idx = torch.randint(0, len(split.train_x), (64,), generator=gen)
        return split.train_x[idx], split.train_y[idx]

    task.make_model = lambda: MLP((30, 32, 2))
    task.train_batch = train_batch
    task.eval_sets = {"train": (split.train_x, split.train_y), "test": (split.test_x, split.test_y)}
    return task


def gauss_newton_tasks(steps: int) -> dict[str, tuple[Any, str]]:
    """{label: (task, exact Gauss-Newton's ``loss``)}: W3 regression, 2 and 10 classes."""
    from benchmarks.workload_regression import setup_w3
    from benchmarks.workloads import WORKLOADS

    return {"W3 diabetes regression (linear 10-1, MSE)": (setup_w3(True, steps), "mse"),
            "breast cancer, 2 classes (MLP 30-32-2)": (_breast_cancer_task(steps), "cross_entropy"),
            "digits, 10 classes (W1 MLP 64-128-128-10)": (WORKLOADS["W1"].setup(True, steps),
                                                         "cross_entropy")}


def gauss_newton_runs(steps: int, workloads: list[str] | None = None) -> dict[str, dict[str, list[Curve]]]:
    """{workload: {"AdamW": sweep, "ExactGaussNewton": sweep}} (all of
    :func:`gauss_newton_tasks`, or the labels starting with one of ``workloads``)."""
    result = {}
    for label, (task, loss) in gauss_newton_tasks(steps).items():
        if workloads is not None and not any(label.startswith(w) for w in workloads):
            continue
        adamw = _sweep(task, "AdamW", lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr), 1e-3,
                       steps=steps)
        egn = _sweep(task, "ExactGaussNewton",
                     lambda m, lr, loss=loss: ExactGaussNewton(m.parameters(), lr=lr, model=m, loss=loss),
                     1.0, steps=steps, schedule=False, closure="outputs")
        result[label] = {"AdamW": adamw, "ExactGaussNewton": egn}
    return result


def _reach(curve: Curve, losses: list[float], target: float) -> str:
    hit = curve.first_reach(losses, target)
    return "never" if hit is None else f"{hit[0]} steps / {hit[1]:.3f} s"


def _soonest(curves: list[Curve], target: float) -> Curve:
    """The run whose held-out loss reaches ``target`` first (ties and misses: lowest final)."""
    def key(curve: Curve) -> tuple[float, float]:
        hit = curve.first_reach(curve.test_loss, target)
        return (math.inf if hit is None else hit[0], curve.final)

    return min(curves, key=key)


def gauss_newton_rows(steps: int) -> list[Row]:
    rows = []
    for label, sweeps in gauss_newton_runs(steps).items():
        adamw = _best(sweeps["AdamW"])
        train_target, test_target = adamw.train_loss[-1], adamw.test_loss[-1]
        hits = {}
        for name, curves in sweeps.items():
            best = adamw if name == "AdamW" else _soonest(curves, test_target)
            hits[name] = (best.first_reach(best.train_loss, train_target),
                          best.first_reach(best.test_loss, test_target))
            grid = "" if name == "AdamW" else "; per lr, held-out steps: " + ", ".join(
                f"{c.lr:.2g}: {(c.first_reach(c.test_loss, test_target) or ('never',))[0]}"
                + ("" if c.status == "ok" else f" ({c.status} at step {c.steps})")
                + (f" ({c.skips} steps skipped)" if c.skips else "") for c in curves)
            rows.append((f"exact Gauss-Newton reaches AdamW's final loss sooner: {label}", name,
                         f"lr {best.lr:.3g}, {best.steps} steps in {best.seconds[-1]:.2f} s",
                         f"final train {best.train_loss[-1]:.4f}, held-out {best.final:.4f}; to "
                         f"AdamW's final train {train_target:.4f}: {_reach(best, best.train_loss, train_target)}"
                         f"; to its held-out {test_target:.4f}: {_reach(best, best.test_loss, test_target)}"
                         + grid, ""))

        def sooner(ours, theirs) -> bool:
            return ours is not None and theirs is not None and ours[0] < theirs[0] and ours[1] < theirs[1]

        ok = all(sooner(hits["ExactGaussNewton"][i], hits["AdamW"][i]) for i in (0, 1))
        rows[-1] = rows[-1][:4] + (_verdict(ok),)
    return rows


# --------------------------------------------------------------------------- AdaFisherW, equal time
def equal_time_runs(seconds: float, clock: str) -> dict[str, list[Curve]]:
    """{"AdamW": sweep, "AdaFisherW": sweep} on W2 quick, each run ``seconds`` of train steps."""
    from benchmarks.workloads import WORKLOADS

    task = WORKLOADS["W2"].setup(True, 200)  # steps only set the warm-up fraction (5 %)
    builders = {
        "AdamW": (constructor_lr("AdamW"), lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr)),
        "AdaFisherW": (constructor_lr("AdaFisherW"), lambda m, lr: AdaFisherW(m.parameters(), lr=lr, model=m)),
    }
    return {name: _sweep(task, name, build, default_lr, budget_s=seconds, clock=clock,
                         evaluate_every_step=False)
            for name, (default_lr, build) in builders.items()}


def equal_time_rows(seconds: float, clock: str) -> list[Row]:
    runs = equal_time_runs(seconds, clock)
    effect = f"AdaFisherW ahead of AdamW at equal time (byte transformer, {seconds:g} {clock} s each)"
    rows = []
    for name, curves in runs.items():
        best = _best(curves)
        grid = ", ".join(f"lr {c.lr:.2g}: {c.final:.4f} ({c.steps} steps)" for c in curves)
        rows.append((effect, name, f"best lr {best.lr:.2g}: {best.steps} steps in "
                     f"{best.seconds[-1]:.1f} s", f"held-out {best.final:.4f}; grid {grid}", ""))
    ok = _best(runs["AdaFisherW"]).final < _best(runs["AdamW"]).final
    rows[-1] = rows[-1][:4] + (_verdict(ok),)
    return rows


# --------------------------------------------------------------------------- table
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps and time")
    parser.add_argument("--steps", type=int, default=300, help="SANIA, bf16 and Gauss-Newton steps")
    parser.add_argument("--lm-seconds", type=float, default=20.0, help="per-run budget on W2")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    parser.add_argument("--effects", default="sania,bf16,gauss_newton,equal_time")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, seconds = args.steps, args.lm_seconds
    if args.quick:
        steps, seconds = max(5, steps // 10), seconds / 10
    effects = {
        "sania": lambda: sania_rows(steps),
        "bf16": lambda: bf16_rows(steps),
        "gauss_newton": lambda: gauss_newton_rows(steps),
        "equal_time": lambda: equal_time_rows(seconds, args.clock),
    }
    rows: list[Row] = []
    for key in [k.strip() for k in args.effects.split(",") if k.strip()]:
        if key not in effects:
            raise ValueError(f"Invalid effects: {key!r} (known: {', '.join(effects)})")
        started = time.perf_counter()
        rows += effects[key]()
        print(f"  {key}: {time.perf_counter() - started:.0f} s", flush=True)
    command = " ".join(["python -m benchmarks.paper_effects", *(sys.argv[1:] if argv is None else argv)])
    print(f"\n`OMP_NUM_THREADS=1 {command}` (torch {torch.__version__}, 1 thread)\n")
    print("| effect | optimizer | setting | measured | reproduced |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
