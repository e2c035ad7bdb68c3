"""benchmarks.step_time's cheap-refresh comparison (timings are reported, never asserted)."""

from benchmarks import step_time


def test_refresh_costs_cover_every_factor_size_and_are_accurate():
    linalg = step_time.shampoo_linalg([(12, 8), (8, 8)], reps=2, eigh_threads=[1])
    refresh = linalg["refresh"]
    assert set(refresh["per_size"]) == {"8", "12"}
    assert refresh["per_size"]["8"]["count"] == 3
    for row in refresh["per_size"].values():
        assert row["newton_vs_eigh_root"] < 1e-3
        assert row["newton_residual"] <= 1e-3
        assert row["qr_top_subspace_error"] < 1.0
    totals = refresh["per_refresh_ms"]
    assert totals["qr_basis"] > 0 and totals["newton_root"] > 0 and totals["eigh_root"] > totals["eigh_basis"]
