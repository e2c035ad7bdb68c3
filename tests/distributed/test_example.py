"""End to end: the example ``benchmarks/train_distributed.py`` under torchrun (2 gloo ranks).

Slow (two torchrun launches, ~1 minute on 2 cores): run with ``pytest -m slow``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(tmp_path, *extra: str) -> str:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "benchmarks.train_distributed",
        "--optimizer",
        "Shampoo",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--logdir",
        str(tmp_path / "runs"),
        *extra,
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _final_loss(stdout: str) -> str:
    return re.findall(r"step 6: loss (\S+)", stdout)[-1]


def test_resume_continues_the_same_run(tmp_path):
    first = _run(tmp_path)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_3", "step_6"]
    assert os.listdir(tmp_path / "runs")  # TensorBoard event file written by rank 0
    shutil.rmtree(tmp_path / "ckpt" / "step_6")
    resumed = _run(tmp_path, "--resume")
    assert "resumed from" in resumed and "at step 3" in resumed
    assert _final_loss(resumed) == _final_loss(first)


@pytest.mark.parametrize("optimizer", ["Shampoo", "EKFAC"])
def test_fsdp_resume_continues_the_same_run(tmp_path, optimizer):
    """FSDP2 under torchrun: Shampoo on local shards, EK-FAC on gathered layers; both resume."""
    first = _run(tmp_path, "--fsdp", "--optimizer", optimizer)
    shutil.rmtree(tmp_path / "ckpt" / "step_6")
    resumed = _run(tmp_path, "--fsdp", "--optimizer", optimizer, "--resume")
    assert "resumed from" in resumed and "at step 3" in resumed
    assert _final_loss(resumed) == _final_loss(first)
