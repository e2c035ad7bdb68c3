"""Race at constructor defaults: each optimizer with every argument at its default but ``lr``.

    python -m benchmarks.defaults_race [--workloads mlp,cnn,lm] [--optimizers AdamW,EKFAC,...]
                                       [--lr-mult 0.333,1,3] [--steps N] [--lm-size quick|full]
                                       [--set NAME:key=value ...] [--out FILE]

This is issue 14's acceptance protocol: a user swaps ``torch.optim.AdamW`` for one of ours
and keeps everything else, so each optimizer is built with ``Class(model.parameters(),
lr=m·default_lr[, model=model])`` for ``m`` in ``--lr-mult`` (default 1/3, 1, 3) and nothing
else. AdamW is ``torch.optim.AdamW`` at its own defaults (lr 1e-3, weight decay 1e-2). Every
run uses the same seed, initial weights and batches, and the workload's shared warm-up +
cosine LR schedule (SANIA and exact Gauss-Newton excepted: their step size comes from the
loss and a line search). The lr grid is centred on each constructor's own default ``lr``; an
entry's only other argument is the mode that names it (SOAP: ``eigenvalue_correction=True``;
exact Gauss-Newton: ``loss="cross_entropy"``, the workloads' loss).

Per optimizer the best lr (lowest final held-out loss) is reported with: the held-out loss,
the first evaluated step at which it reaches AdamW's (best-lr) final held-out loss, that
step over AdamW's step count, the mean train-step time (forward + backward + step) and the
mean ``step()`` time, both over AdamW's.

Workloads (all on 1 thread):

* ``mlp`` — W1: MLP 64-128-128-10 on standardised sklearn digits, batch 64, 300 steps;
* ``cnn`` — a small CNN on digits as 1×8×8 images (conv 16 → conv 32 stride 2 → linear),
  batch 64, 300 steps;
* ``lm`` — W2: the byte-level transformer (``--lm-size quick``: d_model 64, context 64,
  batch 16; ``full``: d_model 128, context 128, batch 32), 200 steps.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from typing import Any

import torch
from torch import nn

from benchmarks.registry import EntryUnavailable, resolve_target
from benchmarks.workloads import WORKLOADS, Task, evaluate, lr_factor

# name -> (target, needs model=, closure ("loss": SANIA's, "outputs": exact Gauss-Newton's, None),
# the mode that names the entry). The lr comes from the constructor's own default.
OPTIMIZERS: dict[str, tuple[str, bool, str | None, dict[str, Any]]] = {
    "AdamW": ("torch.optim:AdamW", False, None, {}),
    "Shampoo": ("secondorder:Shampoo", False, None, {}),
    "Shampoo-SOAP": ("secondorder:Shampoo", False, None, {"eigenvalue_correction": True}),
    "EKFAC": ("secondorder:EKFAC", True, None, {}),
    "AdaFisher": ("secondorder:AdaFisher", True, None, {}),
    "AdaFisherW": ("secondorder:AdaFisherW", True, None, {}),
    "SINGD": ("secondorder:SINGD", True, None, {}),
    "SINGD-diag": ("secondorder:SINGD", True, None, {"structures": "diagonal"}),
    "SANIA": ("secondorder:SANIA", False, "loss", {}),
    # the workloads are classification: the loss it linearises must be theirs
    "ExactGaussNewton": ("secondorder:ExactGaussNewton", True, "outputs", {"loss": "cross_entropy"}),
}
# Peers (``--optimizers`` must name them; skipped when their package is missing): torch's Muon
# with AdamW for the rest, and the SOAP implementations of heavyball and pytorch-optimizer.
PEERS: dict[str, tuple[str, bool, str | None, dict[str, Any]]] = {
    "Muon+AdamW": ("benchmarks.defaults_race:MuonWithAdamW", True, None, {}),
    "heavyball.SOAP": ("benchmarks.defaults_race:HeavyballSOAP", False, None, {}),
    "pto.SOAP": ("pytorch_optimizer:SOAP", False, None, {}),
}
ENTRIES = {**OPTIMIZERS, **PEERS}
# b·T·256 outputs per batch of byte windows: far too many for the batch-space solve
SKIPS = {("ExactGaussNewton", "lm"): "too many outputs for the (b·c × b·c) solve"}


def default_lr(name: str) -> float:
    """The constructor's own default ``lr`` (AdamW: torch's 1e-3)."""
    return inspect.signature(resolve_target(ENTRIES[name][0])).parameters["lr"].default


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the hidden weight matrices, ``torch.optim.AdamW`` on the rest.

    The recipe of Muon's authors and of torch's docs: Muon only for 2-D weights inside the
    network (every ``nn.Linear`` weight but the last layer's; not embeddings), with ``adjust_lr_fn=
    "match_rms_adamw"`` (update RMS 0.2, Liu et al. 2025) so that one lr serves both; its
    other arguments (weight decay 0.1, momentum 0.95, Nesterov) are Muon's defaults and
    AdamW's are AdamW's. The two inner optimizers share these ``param_groups``, so an LR
    scheduler drives both.
    """

    def __init__(self, params, lr: float = 1e-3, *, model: nn.Module) -> None:
        del params  # the split needs the modules
        output_layer = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        hidden_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not output_layer}
        hidden = [p for p in model.parameters() if id(p) in hidden_ids]
        rest = [p for p in model.parameters() if id(p) not in hidden_ids]
        self.muon = torch.optim.Muon(hidden, lr=lr, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=lr)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (both inner steps)
        self.muon.step()
        self.adamw.step()


def HeavyballSOAP(params, lr: float = 3e-3, **kwargs: Any) -> torch.optim.Optimizer:  # noqa: N802
    """heavyball's SOAP at its own defaults (lr 3e-3), torch.compile off (CPU autotuning takes
    minutes per step)."""
    try:
        import heavyball
    except ImportError as error:
        raise EntryUnavailable(f"heavyball is not installed ({error})") from error
    heavyball.utils.compile_mode = None
    return heavyball.SOAP(params, lr=lr, **kwargs)


class DigitsCNN(nn.Sequential):
    """Conv(1→16, 3, pad 1) → ReLU → Conv(16→32, 3, stride 2, pad 1) → ReLU → Linear(512→10).

    Input ``(batch, 1, 8, 8)``, output logits ``(batch, 10)``.
    """

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )


def cnn_task(steps: int | None) -> Task:
    """The ``cnn`` workload: W1's digits reshaped to images, :class:`DigitsCNN`."""
    task = WORKLOADS["W1"].setup(True, steps)
    as_image = lambda x: x.reshape(-1, 1, 8, 8)  # noqa: E731
    inner = task.train_batch

    def train_batch(gen: torch.Generator):
        x, y = inner(gen)
        return as_image(x), y

    task.make_model = DigitsCNN
    task.train_batch = train_batch
    task.eval_sets = {k: (as_image(x), y) for k, (x, y) in task.eval_sets.items()}
    task.meta = dict(task.meta, model="DigitsCNN")
    return task


def make_task(workload: str, steps: int | None, lm_size: str) -> Task:
    if workload == "mlp":
        return WORKLOADS["W1"].setup(True, steps or 300)
    if workload == "cnn":
        return cnn_task(steps or 300)
    if workload == "lm":
        return WORKLOADS["W2"].setup(lm_size == "quick", steps or 200)
    raise ValueError(f"Invalid workload: {workload!r} (known: mlp, cnn, lm)")


def run(task: Task, name: str, lr: float, extra: dict[str, Any], seed: int = 0) -> dict:
    """Train ``name`` at ``lr`` (other arguments default, plus ``extra``); the run's figures."""
    target, needs_model, closure, base_extra = ENTRIES[name]
    torch.manual_seed(seed)
    model = task.make_model()
    kwargs = dict(base_extra, **extra, lr=lr)
    if needs_model:
        kwargs["model"] = model
    optimizer = resolve_target(target)(model.parameters(), **kwargs)
    scheduler = None
    if closure is None:  # the closure optimizers take their step size from the loss / line search
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, task.steps, task.warmup))
    generator = torch.Generator().manual_seed(seed)
    evals = [(0, evaluate(model, task)["test_loss"])]
    train_s = step_s = 0.0
    status = "ok"
    for step in range(1, task.steps + 1):
        inputs, targets = task.train_batch(generator)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if closure == "outputs":  # the optimizer runs the forwards and every derivative itself
            t1 = t0
            loss = optimizer.step(lambda x=inputs, y=targets: (model(x), y))
        else:
            loss = task.loss(model(inputs), targets)
            loss.backward()
            t1 = time.perf_counter()
            optimizer.step((lambda loss=loss: loss) if closure == "loss" else None)
        t2 = time.perf_counter()
        train_s += t2 - t0
        step_s += t2 - t1
        if scheduler is not None:
            scheduler.step()
        if not math.isfinite(float(loss.detach())):
            status = "diverged"
            break
        if step % task.eval_every == 0 or step == task.steps:
            evals.append((step, evaluate(model, task)["test_loss"]))
    final = evals[-1][1] if status == "ok" else math.inf
    if not math.isfinite(final):
        status, final = "diverged", math.inf
    steps_done = max(1, step)
    return dict(optimizer=name, lr=lr, status=status, final=final, evals=evals,
                train_ms=1e3 * train_s / steps_done, step_ms=1e3 * step_s / steps_done)


def reach_step(evals: list, target: float) -> int | None:
    """First evaluated step whose held-out loss is at most ``target``."""
    for step, value in evals:
        if step > 0 and value <= target:
            return step
    return None


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME:key=value`` (value parsed as JSON when possible) -> {NAME: {key: value}}."""
    result: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        result.setdefault(name, {})[key] = parsed
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="mlp,cnn,lm")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--lr-mult", default="0.3333333,1,3")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lm-size", default="quick", choices=("quick", "full"))
    parser.add_argument("--set", action="append", default=[],
                        help="NAME:key=value constructor override (experiments only)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    overrides = parse_sets(args.set)
    multipliers = [float(m) for m in args.lr_mult.split(",")]
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if "AdamW" not in names:
        names = ["AdamW"] + names
    results: dict[str, Any] = {}
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        task = make_task(workload, args.steps, args.lm_size)
        rows: dict[str, dict] = {}
        for name in names:
            if (name, workload) in SKIPS:
                print(f"  {workload} {name}: skipped ({SKIPS[name, workload]})", flush=True)
                continue
            try:
                runs = [run(task, name, m * default_lr(name), overrides.get(name, {})) for m in multipliers]
            except EntryUnavailable as error:  # a peer whose package is not installed
                print(f"  {workload} {name}: skipped ({error})", flush=True)
                continue
            for r in runs:
                print(f"  {workload} {name} lr={r['lr']:.3g}: {r['status']} held-out "
                      f"{r['final']:.4f} train {r['train_ms']:.1f} ms step {r['step_ms']:.2f} ms",
                      flush=True)
            rows[name] = min(runs, key=lambda r: r["final"])
        base = rows["AdamW"]
        print(f"\n{workload} ({task.meta['model']}, {task.steps} steps); AdamW best lr "
              f"{base['lr']:.3g}, final held-out {base['final']:.4f}")
        print("| optimizer | best lr | held-out | steps to AdamW's final | ratio | "
              "train-step × AdamW | step() × AdamW |")
        print("|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            reached = reach_step(r["evals"], base["final"])
            ratio = "—" if reached is None else f"{reached / task.steps:.2f}"
            print(f"| {name} | {r['lr']:.3g} | {r['final']:.4f} | {reached or 'never'} | "
                  f"{ratio} | {r['train_ms'] / base['train_ms']:.2f} | "
                  f"{r['step_ms'] / base['step_ms']:.1f} |", flush=True)
        results[workload] = rows
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
