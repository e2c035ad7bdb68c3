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


def test_gpu_check_runs_on_cpu(tmp_path):
    import json
    import os

    from benchmarks import gpu_check

    out = str(tmp_path / "gpu")
    argv = ["--device", "cpu", "--sizes", "40,30,4", "--batch", "16", "--frequencies", "2", "--periods", "1",
            "--reps", "1", "--out", out]
    assert gpu_check.main(argv) == 0
    with open(os.path.join(out, "gpu_check.json")) as handle:
        result = json.load(handle)
    names = [row["optimizer"] for row in result["rows"]]
    assert names[:5] == ["AdamW", "Shampoo eigh", "Shampoo newton", "SOAP eigh", "SOAP qr"]
    assert all(row["floor_ms"] > 0 for row in result["rows"][1:])
    assert set(result["floor"]) == {"root_per_step_ms", "root_per_refresh_ms", "soap_per_step_ms",
                                    "soap_per_refresh_ms", "qr_per_refresh_ms"}
