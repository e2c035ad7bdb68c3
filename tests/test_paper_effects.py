"""benchmarks/paper_effects.py: SANIA's scale invariance reproduces, Adam's trajectory moves."""

from __future__ import annotations

import pytest


def test_sania_invariance_row_is_exact_and_adam_is_not():
    pytest.importorskip("sklearn")
    from benchmarks.paper_effects import sania_invariance

    rows = {name: gap for name, _, _, gap in sania_invariance(20)}
    assert rows["SANIA"] < 1e-10
    assert rows["Adam"] > 1e-3
