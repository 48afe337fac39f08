"""End-to-end runs of the shipped configs with the issue's acceptance thresholds (opt-in: -m slow)."""

from __future__ import annotations

import json
import time

import pytest

from fipray.config import load_config
from fipray.experiments import run_experiment

pytestmark = pytest.mark.slow


def _run(name: str, out, *overrides: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    run_experiment(load_config(f"jobs/configs/{name}.yaml", list(overrides)), out, progress=False)
    return json.loads((out / "summary.json").read_text()), time.perf_counter() - t0


def test_continual_digits(tmp_path):
    s, secs = _run("continual_digits", tmp_path)
    m = s["methods"]
    assert s["setting"] == "class" and s["memory_per_task"] == 20 and len(s["seeds"]) == 3
    assert m["fip"]["acc_mean"] >= 0.90
    assert m["naive"]["acc_mean"] <= 0.25
    assert m["fip"]["acc_mean"] >= m["er"]["acc_mean"]
    assert secs < 300


def test_sparsify_digits(tmp_path):
    s, secs = _run("sparsify_digits", tmp_path)
    for method, per_p in s["methods"].items():
        for p, v in per_p.items():
            assert abs(v["sparsity"] - float(p)) <= 0.001 and abs(v["sparsity_max"] - float(p)) <= 0.001, method
    for p in s["targets"]:
        assert s["methods"]["fip"][p]["accuracy_mean"] >= s["methods"]["magnitude"][p]["accuracy_mean"]
    assert s["methods"]["fip"]["0.98"]["accuracy_mean"] >= 0.75
    assert secs < 300


def test_ensemble_digits(tmp_path):
    s, secs = _run("ensemble_digits", tmp_path)
    m = s["methods"]
    assert s["members"] == 10 and set(m) == {"fip", "deep", "base"}
    for name in m:
        assert set(m[name]["whitebox"]) == set(m[name]["transfer"]) == {"0.05", "0.1", "0.2", "0.3"}
    assert abs(m["fip"]["member_clean_mean"] - m["base"]["clean_full_test_mean"]) <= 0.01
    assert set(s["sanity"]) == {"fip", "deep", "base"}
    assert (tmp_path / "ensembles" / "fip_seed0" / "ensemble.json").is_file()
    assert secs < 600
