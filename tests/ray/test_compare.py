"""`fipray sweep --compare`: every method tuned with the same budget on held-out data, then tested."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from fipray.job import job_from_dict

pytestmark = pytest.mark.ray


def _job(**over):
    base = {"operation": "continual", "seeds": [0], "threads": 1,
            "data": {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}},
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 40},
            "path": {"lam": 10.0, "steps": 20, "record_every": 10, "checkpoint_every": 20},
            "continual": {"num_tasks": 2, "memory_per_task": 10},
            "sweep": {"metric": "acc_mean", "num_samples": 2, "max_concurrent_trials": 2, "grace_period": 1,
                      "name": "c", "compare": True, "compare_methods": ["fip", "er"], "test_seeds": [0, 1],
                      "search": {"path.lr": {"loguniform": [1e-4, 1e-2]}},
                      "spaces": {"fip": {"path.lam": {"loguniform": [1.0, 100.0]}}}}}
    return job_from_dict(base, over)


@pytest.mark.heavy  # README's tier stays within ~6 min; .ci/run's heavy tier runs it
def test_compare_tunes_each_method_then_tests_the_chosen_configs(ray_2cpus, tmp_path):
    from fipray.ray.compare import run_compare
    from fipray.units import run_test

    out = tmp_path / "cmp"
    s = run_compare(_job(), out, progress=False)
    assert set(s["methods"]) == {"fip", "er"}
    rows = pq.read_table(out / "compare.parquet").to_pylist()
    assert [r["method"] for r in rows] == ["fip", "er"]
    for r in rows:
        trials = pq.read_table(out / r["method"] / "trials.parquet").to_pylist()
        assert r["trials"] == len(trials) == 2 and r["tune_grad_evals"] > 0  # the same budget for each
        assert r["test_seeds"] == 2 and 0 <= r["test_mean"] <= 1
    # fip searched its own space, er the shared one.
    assert set(json.loads(rows[0]["best"])) == {"path.lam"} and set(json.loads(rows[1]["best"])) == {"path.lr"}
    summary = json.loads((out / "er" / "summary.json").read_text())
    assert summary["method"] == "er" and "held out" in summary["selected_on"]
    # The test rows are the chosen configs rerun on the whole training split, scored on the test split.
    tests = pq.read_table(out / "tests.parquet").to_pylist()
    assert len(tests) == 4
    er = _job().cfg.replace(**{**json.loads(rows[1]["best"]), "seeds": (1,)})
    again = run_test(er, method="er")
    assert [t["test"] for t in tests if t["method"] == "er" and t["seed"] == 1] == [pytest.approx(again["acc_mean"])]
    md = (out / "compare.md").read_text()
    assert "**chosen on** validation" in md and "**measured on** test split" in md
    # Again: everything finished is kept (no trial or test rerun).
    before = {p: p.stat().st_mtime for p in (out / "tests").iterdir()}
    s2 = run_compare(_job(), out, progress=False)
    assert s2["methods"]["er"]["test_mean"] == s["methods"]["er"]["test_mean"]
    assert {p: p.stat().st_mtime for p in (out / "tests").iterdir()} == before


@pytest.mark.parametrize("over, match", [
    ({"sweep.compare_methods": ["fip", "sgd"]}, r"'sweep.compare_methods\[1\]'.*cannot run 'sgd'"),
    ({"sweep.compare_methods": []}, "'sweep.compare_methods' is empty"),
    ({"sweep.spaces": {"ewc": {"path.lr": {"uniform": [0.1, 0.2]}}}}, "'sweep.spaces.ewc'.*not one of"),
    ({"sweep.spaces": {"fip": {"path.lamda": {"uniform": [1, 2]}}}}, "'path.lamda' is not a config field"),
    ({"sweep.method": "ewc2"}, "'sweep.method'.*cannot run 'ewc2'"),
])
def test_bad_compare_config_fails_before_work(over, match):
    from fipray.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _job(**over)


def test_the_compare_flag_sets_the_config_key(tmp_path, capsys):
    """`fipray sweep --compare` on a sweep config without compare_methods: the one-line error, before any work."""
    from fipray.cli import main

    code = main(["sweep", "--compare", "--no-progress", "--config", "jobs/configs/sweep_continual_digits.yaml",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "'sweep.compare_methods' is empty" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
