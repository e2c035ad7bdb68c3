"""Test-suite set-up: one torch thread (multi-threaded eigh collapses on shared 2-core machines,
see reference/pytorch_conventions.md appendix) and float64-friendly defaults."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
