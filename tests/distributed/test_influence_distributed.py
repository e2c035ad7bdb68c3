"""``InfluenceFactors.from_optimizer`` after ``EKFAC(..., distributor=True)`` training.

Each rank owns only some layers' factors; ``from_optimizer`` gathers the owners' factors, so
every rank gets every layer's factors — bitwise the same on every rank and equal to a
single-process EK-FAC's up to the gradient's summation order (float64).

Forked gloo ranks (default suite) and, slow-marked, real ``torchrun`` ranks running
:mod:`tests.distributed.influence_worker`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from secondorder.influence import InfluenceFactors
from tests.distributed.influence_worker import train_ekfac
from tests.distributed.launcher import run_forked

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPARED = ("activation_covariance", "gradient_covariance", "activation_eigenvalues",
            "gradient_eigenvalues", "lambda")


def _factors_body(rank: int, world_size: int) -> dict:
    optimizer = train_ekfac(world_size)
    owned = sum(1 for state in optimizer.state.values() if "gradient_basis" in state)
    return {"owned": owned, "layers": InfluenceFactors.from_optimizer(optimizer).layers}


def _check(results: list[dict], reference: dict) -> None:
    for out in results:
        layers = out["layers"]
        assert layers.keys() == reference.keys()
        for name, tensors in layers.items():
            for key, value in tensors.items():  # every rank holds the same factors, bitwise
                torch.testing.assert_close(value, results[0]["layers"][name][key], rtol=0, atol=0)
            for key in COMPARED:
                want = reference[name][key]
                gap = float((tensors[key] - want).abs().max() / want.abs().max())
                assert gap <= 1e-10, (name, key, gap)


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_gets_every_layer(world_size):
    results = run_forked(_factors_body, world_size)
    total = len(InfluenceFactors.from_optimizer(train_ekfac(1)).layers)
    # The layers are really spread: no rank owns them all, together they own each once.
    assert all(out["owned"] < total for out in results)
    assert sum(out["owned"] for out in results) == total
    _check(results, InfluenceFactors.from_optimizer(train_ekfac(1)).layers)


@pytest.mark.slow
def test_under_torchrun(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tests.distributed.influence_worker", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = [torch.load(tmp_path / f"rank_{rank}.pt") for rank in range(2)]
    _check(results, InfluenceFactors.from_optimizer(train_ekfac(1)).layers)
