"""End-to-end runs of the geometry configs and the metric-step benchmark (opt-in: -m slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fipray.config import load_config
from fipray.experiments import run_experiment as run_geometry

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_compose_digits(tmp_path):
    s = run_geometry(load_config(ROOT / "jobs/configs/compose_digits.yaml"), tmp_path, progress=False)
    for order, v in s["orders"].items():
        assert abs(v["sparsity"] - 0.8) <= 0.001, order
        assert v["accuracy"] >= 0.85, order
    (d,) = s["end_point_distance"].values()
    assert d > 1.0  # similar performance at distinct weights
    assert s["num_nodes"] == s["num_edges"] + 1


def test_spectrum_digits(tmp_path):
    s = run_geometry(load_config(ROOT / "jobs/configs/spectrum_digits.yaml"), tmp_path, progress=False)
    assert s["num_params"] == 85002 and s["num_points"] == 256 and len(s["top_eigenvalues"]) == 20
    assert s["fraction_below"]["0.001"] >= s["zero_fraction_lower_bound"] - 0.02
    print(f"spectrum_digits: {s['seconds']:.1f} s")  # wall time is reported, not asserted


def test_bench_metric_step_smoke():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_metric_step", ROOT / "benchmarks/bench_metric_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--smoke-test"])
    assert {r["method"].split("(")[0] for r in out["results"]} == {"penalty", "metric"}
    assert all(r["steps"] > 0 for r in out["results"])
