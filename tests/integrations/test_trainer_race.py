"""benchmarks.trainer_race end to end at toy size (the README's table comes from it)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from benchmarks import trainer_race  # noqa: E402
from benchmarks.hf_workloads import tiny_model  # noqa: E402


def test_trainer_race_writes_table_and_counts(tmp_path, capsys):
    out = tmp_path / "race"
    trainer_race.main(["--models", "llama-untied", "--optimizers", "AdamW,EKFAC", "--steps", "3",
                       "--lr-factors", "1", "--width", "16", "--context", "16", "--out", str(out)])
    result = json.loads((out / "trainer_race.json").read_text())
    assert [(r["model"], r["optimizer"]) for r in result["runs"]] == [
        ("llama-untied", "AdamW"), ("llama-untied", "EKFAC")]
    ekfac = result["runs"][1]
    tensors = len(list(tiny_model("llama-untied", width=16, context=16).parameters()))
    assert ekfac["capture"][0] > 0 and ekfac["capture"][1] + ekfac["capture"][2] == tensors
    table = (out / "table.md").read_text()
    assert "| EKFAC |" in table and "+0.000" in table  # AdamW against itself
    # --previous adds runs; a non-finite or worse-than-uniform loss reads "diverged"
    result["runs"][1]["held_out"] = None
    (tmp_path / "previous.json").write_text(json.dumps(result))
    trainer_race.main(["--models", "llama-untied", "--optimizers", "AdamW", "--steps", "3",
                       "--lr-factors", "1", "--width", "16", "--context", "16",
                       "--previous", str(tmp_path / "previous.json"), "--out", str(tmp_path / "again")])
    assert "| EKFAC | diverged" in (tmp_path / "again" / "table.md").read_text()
    assert math.isclose(trainer_race.DIVERGED, math.log(256))


def test_trainer_race_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="Invalid optimizers"):
        trainer_race.main(["--optimizers", "NoSuchOptimizer"])
