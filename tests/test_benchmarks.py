"""Smoke and determinism tests of the benchmark harness (``benchmarks/``), a few seconds each."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from torch import nn

from benchmarks import race, registry, report, step_time
from benchmarks.data import (
    CHUNK_BYTES,
    HELD_OUT_EVERY,
    fixed_windows,
    load_digits_split,
    load_stdlib_corpus,
    sample_windows,
)
from benchmarks.models import MLP, ByteTransformer, count_parameters
from benchmarks.registry import REGISTRY, EntryUnavailable, RaceEntry, build_optimizer
from benchmarks.workloads import lr_factor


def test_digits_split_is_deterministic_and_standardised_on_train():
    a, b = load_digits_split(), load_digits_split()
    for name in ("train_x", "train_y", "test_x", "test_y"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert a.train_x.shape == (1438, 64) and a.test_x.shape == (359, 64)
    assert a.train_y.dtype == torch.int64 and set(a.train_y.tolist()) == set(range(10))
    std = a.train_x.double().std(dim=0, unbiased=False)
    varying = std > 0
    torch.testing.assert_close(
        a.train_x.double().mean(dim=0), torch.zeros(64, dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        std[varying], torch.ones(int(varying.sum()), dtype=torch.float64), atol=1e-6, rtol=0
    )
    other = load_digits_split(seed=1)
    assert not torch.equal(other.test_y, a.test_y)  # the seed does choose the split
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)


def test_stdlib_corpus_is_deterministic_and_split_partitions_it():
    a, b = load_stdlib_corpus(), load_stdlib_corpus()
    assert a.sha256 == b.sha256 and torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert a.meta["n_bytes"] > 1_000_000 and a.meta["sources"][0].startswith("pydoc_data.topics")
    # Re-interleave the chunks: the result must be the hashed corpus, byte for byte.
    train_chunks = list(torch.split(a.train, CHUNK_BYTES))
    test_chunks = list(torch.split(a.test, CHUNK_BYTES))
    chunks = []
    while train_chunks or test_chunks:
        chunks += train_chunks[: HELD_OUT_EVERY - 1]
        del train_chunks[: HELD_OUT_EVERY - 1]
        chunks += test_chunks[:1]
        del test_chunks[:1]
    rebuilt = bytes(torch.cat(chunks).tolist())
    assert hashlib.sha256(rebuilt).hexdigest() == a.sha256
    assert 0.09 < len(a.test) / a.meta["n_bytes"] < 0.11
    small = load_stdlib_corpus(max_bytes=100_000)
    assert small.meta["n_bytes"] == 100_000 and small.sha256 != a.sha256
    with pytest.raises(ValueError, match="max_bytes"):
        load_stdlib_corpus(max_bytes=10)


def test_windows_are_seeded_and_shifted_by_one():
    data = torch.arange(500, dtype=torch.int64) % 256
    x1, y1 = sample_windows(data, 4, 16, torch.Generator().manual_seed(3))
    x2, y2 = sample_windows(data, 4, 16, torch.Generator().manual_seed(3))
    assert x1.shape == y1.shape == (4, 16) and torch.equal(x1, x2) and torch.equal(y1, y2)
    torch.testing.assert_close(y1[:, :-1], x1[:, 1:], rtol=0, atol=0)
    xf, yf = fixed_windows(data, 5, 16)
    assert xf.shape == (5, 16) and xf[0, 0] == 0 and yf[-1, -1] == data[-1]


def test_models_sizes_and_causality():
    assert count_parameters(ByteTransformer()) == 875_520
    assert count_parameters(MLP((256, 1024, 1024, 10))) == 1_323_018
    model = ByteTransformer(d_model=16, n_layers=2, n_heads=2, d_ff=32, context=12).eval()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    idx = torch.randint(0, 256, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256
    with torch.no_grad():
        out, out_changed = model(idx), model(changed)
    assert out.shape == (2, 12, 256)
    torch.testing.assert_close(out[:, :7], out_changed[:, :7])  # the past never sees the future
    assert not torch.allclose(out[:, 7:], out_changed[:, 7:])
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 13, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_heads"):
        ByteTransformer(d_model=10, n_heads=3)


def test_lr_schedule_warms_up_then_decays_to_floor():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)
    assert lr_factor(0, 100, 0) == pytest.approx(1.0)


def test_registry_builds_and_rejects(monkeypatch):
    model = MLP((4, 3))
    opt = build_optimizer("AdamW", model, "W2")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == REGISTRY["AdamW"].kwargs_for("W2")["weight_decay"]
    assert build_optimizer("AdamW", model, "W1", lr=0.5).param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="name"):
        build_optimizer("NoSuchOptimizer", model)
    with pytest.raises(ValueError, match="duplicate"):
        registry.register(RaceEntry("AdamW", "torch.optim:AdamW"))
    monkeypatch.setitem(REGISTRY, "Missing", RaceEntry("Missing", "no_such_module_xyz:Opt"))
    with pytest.raises(EntryUnavailable):
        build_optimizer("Missing", model)


def test_add_targets_counts_steps_to_baseline_final_loss():
    def run(losses, status="ok"):
        evals = [
            {"step": 10 * i, "test_loss": v, "train_s": float(i)} for i, v in enumerate(losses)
        ]
        return {"status": status, "evals": evals, "final": evals[-1]}

    result = {
        "workloads": {
            "W": {
                "runs": {
                    "AdamW": run([3.0, 2.0, 1.0, 1.1, 1.5]),  # final 1.5, first reached at step 20
                    "Fast": run([3.0, 1.4, 1.0, 0.9, 0.8]),
                    "Slow": run([3.0, 2.9, 2.8, 2.7, 2.6]),
                }
            }
        }
    }
    report.add_targets(result, "AdamW")
    runs = result["workloads"]["W"]["runs"]
    assert result["workloads"]["W"]["target_test_loss"] == 1.5
    assert runs["AdamW"]["steps_to_target"] == 20 and runs["AdamW"]["ratio"] == 1.0
    assert runs["Fast"]["steps_to_target"] == 10 and runs["Fast"]["ratio"] == 0.5
    assert runs["Fast"]["time_to_target_s"] == 1.0
    assert runs["Slow"]["steps_to_target"] is None and runs["Slow"]["ratio"] is None


def test_race_end_to_end_for_adamw(tmp_path, monkeypatch):
    # A closure-driven entry (SGD accepts a closure) and an unimportable one ride along.
    monkeypatch.setitem(
        REGISTRY,
        "SGDclosure",
        RaceEntry("SGDclosure", "torch.optim:SGD", closure=True, hyper={"*": dict(lr=0.05)}),
    )
    monkeypatch.setitem(REGISTRY, "Missing", RaceEntry("Missing", "no_such_module_xyz:Opt"))
    skip = {"W1": "not for digits", "W2": "not for text"}
    monkeypatch.setitem(
        REGISTRY, "NotHere", RaceEntry("NotHere", "torch.optim:SGD", skip_workloads=skip)
    )
    out = str(tmp_path / "race")
    code = race.main(
        [
            "--quick",
            "--optimizers",
            "AdamW,SGDclosure,Missing,NotHere",
            "--workloads",
            "W1,W2",
            "--steps",
            "3",
            "--out",
            out,
        ]
    )
    assert code == 0
    for name in ("race.json", "table.md", "loss_curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    events = [
        f for _, _, files in os.walk(os.path.join(out, "tensorboard", "W2", "AdamW")) for f in files
    ]
    assert any(f.startswith("events.out.tfevents") for f in events)
    with open(os.path.join(out, "race.json")) as handle:
        result = json.load(handle)
    assert set(result["workloads"]) == {"W1", "W2"} and "Missing" in result["skipped"]
    assert result["config"]["threads"] == 1 and result["workloads"]["W2"]["meta"]["sha256"]
    for workload in ("W1", "W2"):
        runs = result["workloads"][workload]["runs"]
        assert set(runs) == {"AdamW", "SGDclosure", "NotHere"}
        assert runs["NotHere"]["status"] == "not applicable" and runs["NotHere"]["ratio"] is None
        adamw = runs["AdamW"]
        assert adamw["status"] == "ok" and adamw["steps"] == 3 and len(adamw["batch_loss"]) == 3
        assert adamw["ratio"] == 1.0 and adamw["steps_to_target"] <= 3
        assert [e["step"] for e in adamw["evals"]][0] == 0 and adamw["evals"][-1]["step"] == 3
        assert runs["SGDclosure"]["optimizer_ms_per_step"] is None
        assert all(v == v for v in runs["SGDclosure"]["batch_loss"])  # finite losses recorded
    table = open(os.path.join(out, "table.md")).read()
    assert "| AdamW |" in table and "held-out loss" in table and "not for text" in table


def test_race_is_deterministic_for_a_seed(tmp_path):
    def losses(sub):
        race.main(
            [
                "--quick",
                "--optimizers",
                "AdamW",
                "--workloads",
                "W1",
                "--steps",
                "5",
                "--out",
                str(tmp_path / sub),
                "--no-tensorboard",
            ]
        )
        with open(tmp_path / sub / "race.json") as handle:
            return json.load(handle)["workloads"]["W1"]["runs"]["AdamW"]["batch_loss"]

    assert losses("a") == losses("b")


def test_race_rejects_bad_arguments(capsys):
    for argv in (
        ["--workloads", "W9"],
        ["--optimizers", "Nope"],
        ["--steps", "0"],
        ["--threads", "0"],
    ):
        with pytest.raises(SystemExit):
            race.main(argv)
    assert "Invalid --threads" in capsys.readouterr().err


def test_state_bytes_counts_adamw_moments_once():
    model = MLP((5, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    n = count_parameters(model)
    # exp_avg and exp_avg_sq per parameter (float32) plus one 0-d float32 step per tensor.
    assert step_time.state_bytes(opt) == 2 * 4 * n + 4 * 2


def test_step_time_plan_times_whole_periods():
    configs = step_time.plan(["AdamW", "Shampoo"], [1, 10, 100], 1.0)
    assert configs[0][:2] == ("AdamW", {})
    swept = {c[4]: c for c in configs if c[0] == "Shampoo"}
    assert set(swept) == {1, 10, 100}
    for f, (_, overrides, steps, _, _) in swept.items():
        assert overrides == {"precondition_frequency": f} and steps % f == 0


def test_step_time_runs_for_adamw(tmp_path):
    out = str(tmp_path / "st")
    assert (
        step_time.main(["--optimizers", "AdamW", "--batch", "8", "--scale", "0.1", "--out", out])
        == 0
    )
    with open(os.path.join(out, "step_time.json")) as handle:
        result = json.load(handle)
    (row,) = result["rows"]
    assert row["optimizer"] == "AdamW" and row["steps"] == 5 and len(row["times_ms"]) == 5
    assert len(row["cpu_times_ms"]) == 5 and row["cpu_median_ms"] > 0
    assert row["state_bytes"] == 2 * 4 * 1_323_018 + 4 * 6
    assert result["params"] == 1_323_018


@pytest.mark.parametrize("rotations", [1, 2])
def test_per_step_floor_does_the_products_of_one_step(rotations):
    from torch.utils._python_dispatch import TorchDispatchMode

    products = []

    class CountProducts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
                products.append(tuple(args[0].shape) + tuple(args[1].shape[1:]))
            return func(*args, **(kwargs or {}))

    floor = step_time.per_step_floor([(6, 4), (5,), (3, 7)], rotations)
    with CountProducts():
        floor()
    # per 2-D block: G Gᵀ, Gᵀ G and `rotations` two-sided products (two matmuls each); 1-D: none
    expected = []
    for m, n in ((6, 4), (3, 7)):
        expected += [(m, n, m), (n, m, n)] + [(m, m, n), (m, n, n)] * rotations
    assert sorted(products) == sorted(expected)


def test_bare_linalg_sums_its_parts():
    linalg = step_time.shampoo_linalg([(6, 4), (4, 4), (6,)], reps=2, eigh_threads=[1])
    assert set(linalg["per_step"]) == {
        f"{op} {shape}" for op in ("GGt", "GtG", "LGR") for shape in ("6x4", "4x4")
    }
    # One eigh and one root per factor: the 6-dim factor once, the 4-dim factor three times.
    assert set(linalg["amortized"]) == {"eigh 6x6 x1", "root 6x6 x1", "eigh 4x4 x3", "root 4x4 x3"}
    assert linalg["per_step_ms"] == pytest.approx(sum(w for w, _ in linalg["per_step"].values()))
    assert linalg["amortized_cpu_ms"] == pytest.approx(
        sum(c for _, c in linalg["amortized"].values())
    )
    assert set(linalg["eigh_ms_by_threads"]) == {"1"}


def test_diverging_run_stops_and_json_stays_strict(tmp_path, monkeypatch):
    monkeypatch.setitem(
        REGISTRY, "Boom", RaceEntry("Boom", "torch.optim:SGD", hyper={"*": dict(lr=1e30)})
    )
    out = tmp_path / "boom"
    argv = ["--optimizers", "Boom", "--workloads", "W1", "--steps", "40", "--out", str(out)]
    race.main(argv + ["--no-tensorboard"])

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    with open(out / "race.json") as handle:
        result = json.load(handle, parse_constant=refuse)
    boom = result["workloads"]["W1"]["runs"]["Boom"]
    assert boom["status"] == "diverged" and boom["steps"] < 40
    assert boom["batch_loss"][-1] is None  # the non-finite loss, written as null
    assert "Boom (diverged)" in (out / "table.md").read_text()


def test_train_step_cost_interleaves_both_sides_on_the_same_batches(monkeypatch):
    """Both sides take every step (one time per side per timed step) on identical batches, so
    with AdamW on both sides they end with identical weights; ratios are positive."""
    from benchmarks import train_step_cost
    from benchmarks.workloads import WORKLOADS

    task = WORKLOADS["W2"].setup(True, 4)
    models_seen = []
    original = train_step_cost._train_step

    def recording(model, optimizer, closure, task_, batch):
        models_seen.append(model)
        return original(model, optimizer, closure, task_, batch)

    monkeypatch.setattr(train_step_cost, "_train_step", recording)
    monkeypatch.setitem(train_step_cost.ENTRIES, "AdamW-twin", ("torch.optim:AdamW", False, None, {}))
    row = train_step_cost.measure("AdamW-twin", task, steps=3, warmup=1)
    assert len(models_seen) == 8 and row["train_mean_ratio"] > 0 and row["step_mean_ratio"] > 0
    first, second = models_seen[0], models_seen[1]
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Invalid steps"):
        train_step_cost.main(["--steps", "0"])
