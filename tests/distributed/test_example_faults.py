"""The example under ``torchrun`` survives faults: a SIGKILLed rank, a frozen rank.

Slow (several torchrun launches of 2 gloo ranks, ~2.5 minutes on 2 cores): ``pytest -m slow``.

* ``--max-restarts=1`` and the last rank SIGKILLing itself before step 5 (first attempt only):
  torchrun restarts both ranks, which resume from the newest complete checkpoint (step 4) and
  end with parameters bitwise equal to an uninterrupted run (float64). No
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE`` is set: the example's rendezvous survives restarts.
* The last rank SIGSTOPping itself (frozen): rank 0 fails after ``--timeout`` seconds naming
  the cause, and the job ends instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _torchrun(tmp_path, name: str, *extra: str, restarts: int = 0, timeout: float = 300):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        f"--max-restarts={restarts}", "-m", "benchmarks.train_distributed",
        "--optimizer", "Shampoo", "--dtype", "float64", "--steps", "6", "--eval-every", "3",
        "--checkpoint-every", "2", "--keep-last", "2",
        "--checkpoint-dir", str(tmp_path / name / "ckpt"), "--logdir", str(tmp_path / name / "runs"),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**env, "OMP_NUM_THREADS": "1"})


def _final_parameters(checkpoint: str) -> dict[str, torch.Tensor]:
    metadata = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    state = {
        "model": {
            key[len("model."):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            for key, meta in metadata.items()
            if key.startswith("model.")
        }
    }
    dcp.load(state, checkpoint_id=checkpoint)
    return state["model"]


def test_killed_rank_restarts_and_continues_bitwise(tmp_path):
    clean = _torchrun(tmp_path, "clean")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "checkpoints: " in clean.stdout and "TensorBoard logs: " in clean.stdout
    faulty = _torchrun(tmp_path, "faulty", "--kill-rank-at-step", "5", restarts=1)
    output = faulty.stdout + faulty.stderr
    assert faulty.returncode == 0, output
    assert "exitcode: -9" in output  # the rank really died of SIGKILL
    assert "resumed from" in output and "at step 4" in output
    # keep_last=2: the newest two complete checkpoints, nothing else.
    assert sorted(os.listdir(tmp_path / "faulty" / "ckpt")) == ["step_4", "step_6"]
    want = _final_parameters(str(tmp_path / "clean" / "ckpt" / "step_6"))
    got = _final_parameters(str(tmp_path / "faulty" / "ckpt" / "step_6"))
    assert want.keys() == got.keys() and want
    for key in want:
        assert want[key].dtype == torch.float64
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_frozen_rank_ends_the_job_with_a_clear_error(tmp_path):
    began = time.monotonic()
    frozen = _torchrun(tmp_path, "frozen", "--timeout", "5", "--freeze-rank-at-step", "3", timeout=240)
    elapsed = time.monotonic() - began
    output = frozen.stdout + frozen.stderr
    assert frozen.returncode != 0
    assert "a peer rank was lost or froze" in output and "--timeout 5" in output, output
    # 5 s of timeout + torchrun's 30 s before it SIGKILLs the stopped rank + start-up.
    assert elapsed < 180, elapsed
