"""The suite inside ``transformers.Trainer``: held-out loss against AdamW on tiny LMs.

    python -m benchmarks.trainer_race [--models gpt2,llama-tied,llama-untied]
        [--optimizers AdamW,Shampoo,...] [--steps 120] [--lr-factors 0.5,1,2] [--out DIR]

Each optimizer is built by :class:`~secondorder.integrations.huggingface.SecondOrderTrainer`
from ``optimizer_cls_and_kwargs`` with the W2 (byte-level LM) hyperparameters of
``benchmarks/registry.py``, its lr multiplied by each ``--lr-factors`` value (SANIA's lr is its
Polyak-step multiplier). Every run: a random-init model from :mod:`benchmarks.hf_workloads`
(seed 0), the same W2 byte windows in the same order (Trainer seed 0), batch 8, the Trainer's
warm-up (10%) + linear-decay schedule, clipping at 1.0, weight decay 0.01 on matrices;
held-out loss (mean token cross-entropy on fixed held-out windows) at the end. The table gives
each optimizer's best held-out loss over the lr factors and its difference from AdamW's best
(negative: better than AdamW), and the tracked / fallback parameter-tensor counts of the
capture optimizers. Written to ``--out`` (default ``bench_results/trainer_race``):
``trainer_race.json`` and ``table.md``. One thread (``OMP_NUM_THREADS=1`` recommended).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import tempfile
import time
import warnings
from typing import Any

import torch

from benchmarks.hf_workloads import lm_datasets, tiny_model
from benchmarks.registry import REGISTRY, resolve_target
from benchmarks.report import write_json

OPTIMIZERS = ("AdamW", "Shampoo", "Shampoo-SOAP", "EKFAC", "AdaFisherW", "SINGD", "SANIA")
LM_MODELS = ("gpt2", "llama-tied", "llama-untied")
BASELINE = "AdamW"
DIVERGED = math.log(256)  # a held-out loss above uniform guessing over bytes (or NaN)


def _optimizer_spec(name: str, defaults: bool = False) -> tuple[type, dict[str, Any]]:
    """The class and keyword arguments of entry ``name``: the registry's W2 settings, or with
    ``defaults`` the constructor's own (only the mode that names the entry, e.g. SOAP's
    ``eigenvalue_correction=True``, and the constructor's default ``lr``)."""
    entry = REGISTRY[name]
    cls = resolve_target(entry.target)
    if defaults:
        mode = {"eigenvalue_correction": True} if name == "Shampoo-SOAP" else {}
        return cls, {**mode, "lr": inspect.signature(cls).parameters["lr"].default}
    kwargs = entry.kwargs_for("W2")
    kwargs.pop("weight_decay", None)  # the Trainer's groups set it (TrainingArguments)
    return cls, kwargs


def capture_counts(optimizer: torch.optim.Optimizer) -> tuple[int, int, int] | None:
    """``(tracked layers, tracked parameter tensors, fallback parameter tensors)`` of a capture
    optimizer (``None`` for the others)."""
    capture = getattr(optimizer, "capture", None) or getattr(optimizer, "_capture", None)
    if capture is None:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fallback = capture.fallback_params(params)
    return len(capture.layers), len(params) - len(fallback), len(fallback)


def run_one(model_name: str, name: str, factor: float, data, steps: int, context: int,
            width: int, defaults: bool = False) -> dict[str, Any]:
    from transformers import TrainingArguments

    from secondorder.integrations.huggingface import SecondOrderTrainer

    cls, kwargs = _optimizer_spec(name, defaults)
    kwargs["lr"] = kwargs["lr"] * factor
    model = tiny_model(model_name, width=width, context=context)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=8, per_device_eval_batch_size=64,
            max_steps=steps, warmup_steps=max(1, steps // 10), lr_scheduler_type="linear",
            max_grad_norm=1.0, weight_decay=0.01, report_to="none", use_cpu=True,
            disable_tqdm=True, logging_strategy="no", save_strategy="no", seed=0,
            dataloader_num_workers=0,
        )
        trainer = SecondOrderTrainer(model=model, args=args, train_dataset=data[0],
                                     eval_dataset=data[1], optimizer_cls_and_kwargs=(cls, kwargs))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = trainer.train()
        seconds = time.perf_counter() - start
        held_out = trainer.evaluate()["eval_loss"]
    counts = capture_counts(trainer.optimizer.optimizer)
    return {"model": model_name, "optimizer": name, "lr": kwargs["lr"], "factor": factor,
            "train_loss": result.training_loss, "held_out": held_out, "seconds": seconds,
            "capture": counts}


def best_table(runs: list[dict[str, Any]], models: list[str], names: list[str]) -> str:
    """Markdown: per model, each optimizer's best held-out loss (and its lr), minus AdamW's;
    "diverged" when every lr ended above :data:`DIVERGED` (or NaN)."""
    lines = ["| optimizer | " + " | ".join(f"{m}: held-out (lr) | vs AdamW" for m in models) + " |",
             "|---|" + "---|---|" * len(models)]
    best = {}
    for run in runs:
        key = (run["model"], run["optimizer"])
        if run["held_out"] < DIVERGED and (key not in best or run["held_out"] < best[key]["held_out"]):
            best[key] = run
    for name in names:
        cells = []
        for model in models:
            run, base = best.get((model, name)), best.get((model, BASELINE))
            if run is None:
                cells += ["diverged", ""]
                continue
            delta = "" if base is None else f"{run['held_out'] - base['held_out']:+.3f}"
            cells += [f"{run['held_out']:.3f} ({run['lr']:.3g})", delta]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def counts_table(runs: list[dict[str, Any]], models: list[str], names: list[str]) -> str:
    """Markdown: tracked layers / tracked tensors / fallback tensors per model and optimizer."""
    lines = ["| optimizer | " + " | ".join(f"{m}: layers / tracked / fallback" for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for name in names:
        cells = []
        for model in models:
            counts = next((r["capture"] for r in runs if r["model"] == model and r["optimizer"] == name
                           and r["capture"] is not None), None)
            cells.append("" if counts is None else " / ".join(str(c) for c in counts))
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(LM_MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr-factors", default="0.5,1,2")
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--out", default=os.path.join("bench_results", "trainer_race"))
    parser.add_argument("--defaults", action="store_true",
                        help="every optimizer at its constructor defaults (lr: the constructor's "
                             "default times each factor) instead of the registry's W2 settings")
    parser.add_argument("--previous", default=None,
                        help="a trainer_race.json whose runs join the table (e.g. an earlier run "
                             "with other lr factors; same settings)")
    args = parser.parse_args(argv)
    models, names = args.models.split(","), args.optimizers.split(",")
    factors = [float(f) for f in args.lr_factors.split(",")]
    for name in names:
        if name not in REGISTRY:
            raise ValueError(f"Invalid optimizers: unknown {name!r}")
    torch.set_num_threads(1)
    data = lm_datasets(n_train=8 * args.steps, n_test=128, context=args.context)
    runs = []
    if args.previous is not None:
        with open(args.previous) as handle:
            previous = json.load(handle)
        for key in ("steps", "context", "width"):
            if previous["settings"][key] != getattr(args, key):
                raise ValueError(f"Invalid previous: its {key} is {previous['settings'][key]}")
        runs = [{**run, "capture": None if run["capture"] is None else tuple(run["capture"]),
                 "held_out": math.nan if run["held_out"] is None else run["held_out"]}
                for run in previous["runs"]]  # the JSON stores non-finite losses as null
        models = list(dict.fromkeys([run["model"] for run in runs] + models))
        names = list(dict.fromkeys([run["optimizer"] for run in runs] + names))
        factors_run = {(run["model"], run["optimizer"], run["factor"]) for run in runs}
    else:
        factors_run = set()
    for model_name in models:
        for name in names:
            for factor in factors:
                if (model_name, name, factor) in factors_run or name not in args.optimizers.split(","):
                    continue
                run = run_one(model_name, name, factor, data, args.steps, args.context, args.width,
                              args.defaults)
                runs.append(run)
                print(f"{model_name:13s} {name:13s} lr={run['lr']:.3g} held-out {run['held_out']:.4f} "
                      f"train {run['train_loss']:.4f} {run['seconds']:.1f}s capture {run['capture']}",
                      flush=True)
    settings = {k: getattr(args, k) for k in ("steps", "context", "width", "defaults")}
    source = "the constructor's default" if args.defaults else "the registry's W2"
    factors_used = sorted({run["factor"] for run in runs})
    settings["lr_factors"] = ",".join(f"{f:g}" for f in factors_used)
    table = (f"Held-out loss after {args.steps} Trainer steps (best over lr × {{{settings['lr_factors']}}} "
             f"of {source} lr), settings {settings}\n\n{best_table(runs, models, names)}\n\n"
             f"Capture: tracked layers / tracked parameter tensors / fallback parameter tensors\n\n"
             f"{counts_table(runs, models, names)}\n")
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    write_json({"settings": settings, "runs": runs}, os.path.join(args.out, "trainer_race.json"))
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(table)


if __name__ == "__main__":
    main()
