"""End-to-end runs of the shipped configs with the acceptance thresholds (opt-in: -m slow).

Wall times are printed (README's table quotes them), never asserted: a loaded machine is not a bug.
The ensemble's robustness numbers are checked against the ones README reports, within seed noise.
"""

from __future__ import annotations

import json
import time

import pytest

from fipray.config import load_config
from fipray.experiments import run_experiment

pytestmark = pytest.mark.slow

# README's white-box PGD-20 accuracies of the shipped ensemble config (means over seeds 0, 1).
README_WHITEBOX = {"fip": {"0.05": 0.712, "0.1": 0.232}, "deep": {"0.05": 0.860, "0.1": 0.428},
                   "base": {"0.05": 0.686, "0.1": 0.212}}


def _run(name: str, out, *overrides: str) -> dict:
    t0 = time.perf_counter()
    run_experiment(load_config(f"jobs/configs/{name}.yaml", list(overrides)), out, progress=False)
    print(f"{name}: {time.perf_counter() - t0:.0f} s")
    return json.loads((out / "summary.json").read_text())


def test_continual_digits(tmp_path):
    s = _run("continual_digits", tmp_path)
    m = s["methods"]
    assert s["setting"] == "class" and s["memory_per_task"] == 20 and len(s["seeds"]) == 3
    assert m["fip"]["acc_mean"] >= 0.90
    assert m["naive"]["acc_mean"] <= 0.25
    assert m["fip"]["acc_mean"] >= m["er"]["acc_mean"]


def test_sparsify_digits(tmp_path):
    s = _run("sparsify_digits", tmp_path)
    for method, per_p in s["methods"].items():
        for p, v in per_p.items():
            assert abs(v["sparsity"] - float(p)) <= 0.001 and abs(v["sparsity_max"] - float(p)) <= 0.001, method
    for p in s["targets"]:
        assert s["methods"]["fip"][p]["accuracy_mean"] >= s["methods"]["magnitude"][p]["accuracy_mean"]
    assert s["methods"]["fip"]["0.98"]["accuracy_mean"] >= 0.75


def test_ensemble_digits(tmp_path):
    s = _run("ensemble_digits", tmp_path)
    m = s["methods"]
    assert s["members"] == 10 and set(m) == {"fip", "deep", "base"}
    eps = ["0.05", "0.1", "0.2", "0.3"]
    for name, v in m.items():
        assert list(v["whitebox"]) == list(v["transfer"]) == eps
        wb = [v["whitebox"][e] for e in eps]
        # The attack only gets stronger with ε, never beats clean accuracy, and white-box beats transfer.
        assert all(a >= b - 0.01 for a, b in zip(wb, wb[1:])), (name, wb)
        assert wb[0] <= v["clean_mean"]
        assert all(v["transfer"][e] >= v["whitebox"][e] - 0.02 for e in eps), name
        for e, want in README_WHITEBOX[name].items():
            assert abs(v["whitebox"][e] - want) <= 0.05, (name, e, v["whitebox"][e], want)
        # Every sanity flag of PROTOCOLS.md holds (values, not only their presence).
        assert s["sanity"][name] and all(s["sanity"][name].values()), (name, s["sanity"][name])
    assert abs(m["fip"]["member_clean_mean"] - m["base"]["clean_full_test_mean"]) <= 0.01
    assert (tmp_path / "ensembles" / "fip_seed0" / "ensemble.json").is_file()


def test_continual_digits_domain(tmp_path):
    s = _run("continual_digits_domain", tmp_path)
    m = s["methods"]
    assert s["stream"] == "domain" and s["head"] == "shared" and s["num_tasks"] == 5
    assert set(m) == {"fip", "naive", "er", "derpp", "joint"}
    # Replay-based methods keep more of the earlier permutations than naive fine-tuning.
    assert m["fip"]["acc_mean"] > m["naive"]["acc_mean"] and m["er"]["acc_mean"] > m["naive"]["acc_mean"]


def test_continual_digits_paper(tmp_path):
    s = _run("continual_digits_paper", tmp_path)
    m = s["methods"]
    assert s["memory_per_task"] == 27 and set(m) == {"fip", "naive", "er", "ewc", "derpp"}
    assert m["fip"]["acc_mean"] > m["naive"]["acc_mean"]
