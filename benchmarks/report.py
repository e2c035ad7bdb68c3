"""Reporting for the race: steps-to-target, the printed table, the PNG and the JSON."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["add_targets", "format_table", "write_png", "write_json", "finite_or_none"]

DASH = "—"


def add_targets(result: dict[str, Any], baseline: str) -> None:
    """Add steps to reach the baseline's final held-out loss to every run of ``result``.

    Per workload, ``target`` is the baseline's final held-out loss. For each run,
    ``steps_to_target`` is the first evaluated step whose held-out loss is <= target (None if
    never), ``time_to_target_s`` the training time spent by then, and ``ratio`` the steps as a
    fraction of the baseline's own ``steps_to_target`` (the baseline may reach its final loss
    before its last step when held-out loss bottoms out early).
    """
    for block in result["workloads"].values():
        runs = block["runs"]
        base = runs.get(baseline, {})
        target = base.get("final", {}).get("test_loss") if base.get("status") == "ok" else None
        if target is not None and not math.isfinite(target):
            target = None
        block["target_test_loss"] = target
        for run in runs.values():
            run["steps_to_target"] = run["time_to_target_s"] = None
            if target is None or "evals" not in run:
                continue
            for figures in run["evals"]:
                if figures["test_loss"] <= target:
                    run["steps_to_target"] = figures["step"]
                    run["time_to_target_s"] = figures["train_s"]
                    break
        base_steps = base.get("steps_to_target")
        for run in runs.values():
            steps = run.get("steps_to_target")
            run["ratio"] = steps / base_steps if steps is not None and base_steps else None


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table per workload: final train / held-out loss, accuracy, steps to the
    baseline's final held-out loss and their ratio, wall time, ms per training step and ms
    per optimizer step."""
    lines: list[str] = []
    columns = (
        "optimizer",
        "train loss",
        "held-out loss",
        "held-out acc",
        "steps to AdamW's final",
        "ratio",
        "wall s",
        "ms/step",
        "opt ms/step",
    )
    for workload, block in result["workloads"].items():
        target = _fmt(block.get("target_test_loss"), ".4f")
        lines.append(
            f"\n{workload}: {block['description']} ({block['meta']['params']:,} parameters, "
            f"{block['steps']} steps, target held-out loss {target})\n"
        )
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for name, run in block["runs"].items():
            if run["status"] in ("error", "not applicable"):
                why = run.get("error") or run.get("why", "")
                cells = [name, f"{run['status']}: {why[:70]}"] + [DASH] * (len(columns) - 2)
            else:
                final = run["final"]
                acc = final.get("test_acc")
                cells = [
                    name + ("" if run["status"] == "ok" else f" ({run['status']})"),
                    _fmt(final["train_loss"], ".4f"),
                    _fmt(final["test_loss"], ".4f"),
                    DASH if acc is None else f"{100 * acc:.1f}%",
                    _fmt(run.get("steps_to_target"), "d"),
                    _fmt(run.get("ratio"), ".2f"),
                    f"{run['wall_s']:.1f}",
                    f"{run['ms_per_step']:.1f}",
                    _fmt(run.get("optimizer_ms_per_step"), ".2f"),
                ]
            lines.append("| " + " | ".join(cells) + " |")
    skipped = result.get("skipped", {})
    if skipped:
        lines.append("\nskipped: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    return "\n".join(lines)


def _smooth(values: list[float], width: int) -> list[float]:
    """Trailing moving average over ``width`` values (the first ones average what exists)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def write_png(result: dict[str, Any], path: str) -> None:
    """Loss curves, one column per workload: smoothed training batch loss (top) and held-out
    loss at each evaluation (bottom), with the AdamW target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    workloads = list(result["workloads"].items())
    fig, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 8), squeeze=False)
    for col, (workload, block) in enumerate(workloads):
        top, bottom = axes[0][col], axes[1][col]
        for name, run in block["runs"].items():
            if "batch_loss" not in run:  # error or not applicable: no curve
                continue
            losses = [v if math.isfinite(v) else float("nan") for v in run["batch_loss"]]
            width = max(1, len(losses) // 40)
            top.plot(range(1, len(losses) + 1), _smooth(losses, width), label=name)
            steps = [e["step"] for e in run["evals"]]
            bottom.plot(steps, [e["test_loss"] for e in run["evals"]], marker=".", label=name)
        if block.get("target_test_loss") is not None:
            bottom.axhline(
                block["target_test_loss"],
                color="grey",
                linestyle="--",
                linewidth=1,
                label="AdamW final",
            )
        top.set_title(f"{workload}: training batch loss (moving average)")
        bottom.set_title(f"{workload}: held-out loss")
        for ax in (top, bottom):
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN/inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_json(result: dict[str, Any], path: str) -> None:
    """Write ``result`` as strict JSON (non-finite floats become null)."""
    with open(path, "w") as handle:
        json.dump(finite_or_none(result), handle, indent=1)
        handle.write("\n")
