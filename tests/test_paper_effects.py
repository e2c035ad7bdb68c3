"""benchmarks/paper_effects.py: the machinery of each row, at a few steps (no timed assertions)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("sklearn")

from benchmarks import paper_effects  # noqa: E402
from benchmarks.paper_effects import Curve, fit  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sania_invariance_row_is_exact_and_adam_is_not():
    rows = {name: gap for name, _, _, gap in paper_effects.sania_invariance(20)}
    assert rows["SANIA"] < 1e-10
    assert rows["Adam"] > 1e-3


def test_bf16_runs_train_in_bf16_without_master_weights():
    from benchmarks.defaults_race import cnn_task

    task = cnn_task(3)
    seen: dict[str, set] = {"inputs": set(), "grads": set()}

    def build(model, lr):
        model.register_forward_pre_hook(lambda _, args: seen["inputs"].add(args[0].dtype))
        optimizer = paper_effects.BF16_OPTIMIZERS["SINGD"][1](model, lr)
        for p in model.parameters():
            p.register_hook(lambda g: seen["grads"].add(g.dtype))
        return optimizer

    curve = fit(task, "SINGD", build, 1e-3, steps=3, dtype=torch.bfloat16, evaluate_every_step=False)
    assert curve.param_dtypes == {torch.bfloat16}
    assert seen == {"inputs": {torch.bfloat16}, "grads": {torch.bfloat16}}
    assert curve.steps == 3 and math.isfinite(curve.final) and curve.skips == 0
    adamw = fit(task, "AdamW", paper_effects.BF16_OPTIMIZERS["AdamW"][1], 1e-3, steps=3,
                dtype=torch.bfloat16, evaluate_every_step=False)
    assert adamw.state_dtypes == {torch.bfloat16}  # torch's AdamW keeps its moments in bf16
    factors = fit(task, "SINGD, bf16 factors", paper_effects.BF16_OPTIMIZERS["SINGD, bf16 factors"][1],
                  1e-3, steps=3, dtype=torch.bfloat16, evaluate_every_step=False)
    assert torch.bfloat16 in factors.state_dtypes


def test_bf16_rows_cover_every_optimizer_in_both_precisions():
    rows = paper_effects.bf16_rows(2)
    names = [row[1] for row in rows]
    assert names == [*paper_effects.BF16_OPTIMIZERS, "verdict"]
    assert all("fp32: held-out" in row[3] and "bf16: held-out" in row[3] for row in rows[:-1])
    assert rows[-1][4] in ("**yes**", "**no**")


def test_gauss_newton_rows_time_train_steps_and_reach_targets():
    sweeps = paper_effects.gauss_newton_runs(4, workloads=["W3"])
    (label, runs), = sweeps.items()
    for curves in runs.values():
        assert len(curves) == len(paper_effects.LR_MULTIPLIERS)
        for curve in curves:
            assert curve.steps == len(curve.seconds) == len(curve.train_loss) == len(curve.test_loss) == 4
            assert all(b >= a for a, b in zip(curve.seconds, curve.seconds[1:]))
    # on a linear least-squares problem one damped Gauss-Newton step beats 4 AdamW steps
    egn, adamw = runs["ExactGaussNewton"][1], runs["AdamW"][1]
    assert egn.lr == 1.0 and egn.train_loss[0] < adamw.train_loss[-1]


def test_first_reach_returns_step_and_seconds():
    curve = Curve("x", 1.0, seconds=[0.1, 0.3, 0.6], test_loss=[3.0, 2.0, 1.0])
    assert curve.first_reach(curve.test_loss, 2.5) == (2, 0.3)
    assert curve.first_reach(curve.test_loss, 0.5) is None


def test_equal_time_budget_is_equal_for_every_run():
    budget = 0.4
    runs = paper_effects.equal_time_runs(budget, "cpu")
    assert set(runs) == {"AdamW", "AdaFisherW"}
    for curves in runs.values():
        for curve in curves:
            longest_step = max(b - a for a, b in zip([0.0, *curve.seconds], curve.seconds))
            # stops at the first step past the budget: overshoot at most one step
            assert budget <= curve.seconds[-1] <= budget + longest_step
            assert curve.steps == len(curve.seconds) and math.isfinite(curve.final)


def test_schedule_warms_up_and_decays_to_the_floor():
    assert paper_effects._schedule(0.0, 0.05) < 1e-6
    assert paper_effects._schedule(0.05, 0.05) == pytest.approx(1.0)
    assert paper_effects._schedule(1.0, 0.05) == pytest.approx(0.1)
    assert paper_effects._schedule(0.5, 0.0) == pytest.approx(0.55)


def test_invalid_clock_and_budget():
    with pytest.raises(ValueError, match="^Invalid clock"):
        paper_effects._clock("gpu")
    with pytest.raises(ValueError, match="^Invalid steps"):
        fit(None, "AdamW", None, 1e-3, steps=3, budget_s=1.0)
