"""`sweep.scheduler: pbt` on a local 2-CPU Ray: a tiny population exploits along FIP paths, names its parents,
and its best trial's lineage replayed as one path scores exactly what the trial reported; bad PBT configs fail
before any trial; a killed driver's PBT sweep resumes (heavy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fipray.config import ConfigError, load_config
from fipray.job import job_from_dict

pytestmark = pytest.mark.ray

sys.path.insert(0, str(Path(__file__).parent))  # test_job_submit's process helpers

SHIPPED = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "sweep_pbt_continual_digits.yaml"
SEARCH = {"path.lam": {"loguniform": [0.01, 100.0]}, "path.lr": {"loguniform": [1e-4, 1e-2]}}


def _job(search=SEARCH, **over):
    base = {"operation": "continual", "seeds": [0], "threads": 1,
            "data": {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}},
            "model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "train": {"steps": 20},
            "path": {"lam": 10.0, "steps": 20}, "continual": {"num_tasks": 2, "memory_per_task": 10},
            "sweep": {"scheduler": "pbt", "metric": "acc_mean", "num_samples": 2, "max_concurrent_trials": 2,
                      "perturbation_interval": 10, "pbt_quantile": 0.5, "name": "p", "search": search}}
    return job_from_dict(base, over)


@pytest.mark.heavy  # README's tier stays within ~6 min; .ci/run's heavy tier runs it
def test_a_pbt_sweep_exploits_along_paths_names_parents_and_replays(ray_2cpus, tmp_path):
    from fipray.path_trial import run_schedule
    from fipray.ray.sweep import run_sweep

    job = _job()
    out = tmp_path / "pbt"
    s = run_sweep(job, out, progress=False)
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    ids = {r["trial_id"] for r in rows}
    assert len(rows) == s["num_trials"] == 2 and all(r["status"] == "completed" and r["path_step"] == 20 for r in rows)
    # Two trials and a quantile of 1/2: at step 10 the weaker copies the stronger's path.
    forked = [r for r in rows if r["parent"]]
    assert forked and all(r["parent"] in ids and r["forked_at"] == 10 and r["forks"] >= 1 for r in forked)
    for r in rows:
        lineage = json.loads(r["lineage"])
        assert lineage[-1]["trial_id"] == r["trial_id"] and lineage[0]["parent"] is None
        assert all(1e-4 <= seg["params"]["path.lr"] <= 1e-2 for seg in lineage)  # perturbations clipped to range
    assert s["scheduler"] == "pbt" and s["pbt"]["num_exploits"] >= 1
    assert {"metric", "best_config", "best_metric", "seconds", "selected_on", "grad_evals"} <= set(s)
    assert len(pq.read_table(out / "reports.parquet")) == 4  # two stretches of each trial
    assert (out / "schedule.png").stat().st_size > 0
    best = next(r for r in rows if r["trial_id"] == s["best_trial_id"])
    assert load_config(out / "best_config.yaml").path.lr == pytest.approx(best["path.lr"])
    # The best trial's lineage, replayed as one path outside Ray, is its path: the same score to the bit.
    reports, _ = run_schedule(job.cfg, json.loads(best["lineage"]), tmp_path / "replay", **job.sweep.options())
    assert reports[-1]["acc_mean"] == s["best_metric"]


@pytest.mark.parametrize("over, match", [
    ({"operation": "sparsify", "sweep.metric": ""}, "pbt runs along the FIP paths of continual, ensemble"),
    ({"sweep.mutations": {"path.lambda": [1, 2]}}, "'path.lambda' is not a config field"),
    ({"sweep.mutations": {"path.beta": [-1.0, 1.0]}}, "'sweep.mutations.path.beta'.*outside the knob's range"),
    ({"sweep.mutations": {"path.steps": [5, 10]}}, "PBT perturbs real-valued knobs"),
    ({"sweep.mutations": {"path.lam": [3.0, 1.0]}}, "low < high"),
    ({"sweep.perturbation_interval": 25}, "exceeds the 20 steps"),
    ({"sweep.method": "er"}, "pbt perturbs FIP paths"),
    ({"search": {"path.distance": {"choice": ["kl", "bhattacharyya"]}}}, "'sweep.mutations' is empty"),
])
def test_bad_pbt_configs_fail_before_any_trial(over, match):
    from fipray.ray.pbt import check_pbt

    with pytest.raises(ConfigError, match=match):
        check_pbt(_job(**over))


def test_run_sweep_checks_pbt_before_any_trial(ray_2cpus, tmp_path):
    from fipray.ray.sweep import run_sweep

    with pytest.raises(ConfigError, match="outside the knob's range"):
        run_sweep(_job(**{"sweep.mutations": {"path.beta": [-1.0, 1.0]}}), tmp_path / "s", progress=False)
    assert not (tmp_path / "s" / "tune").exists()


def test_synced_pbt_runs_on_when_a_resumed_population_sits_at_its_sync_point():
    """A resumed driver's PBT starts its bookkeeping afresh; with every trial paused at the step it then sets as
    the next sync point, Tune's PBT picks no trial to run (the hang the killed-driver test met); ours moves on."""
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pbt import _PBTTrialState

    from fipray.ray.pbt import SyncedPBT

    class FakeTrial:
        experiment_tag, status = "t", "PAUSED"

    class FakeController:
        def __init__(self, trials):
            self.trials = trials

        def get_trials(self):
            return self.trials

        def get_live_trials(self):
            return set(self.trials)

    trials = [FakeTrial(), FakeTrial()]
    for cls in (PopulationBasedTraining, SyncedPBT):
        pbt = cls(time_attr="path_step", metric="acc_mean", mode="max", perturbation_interval=10,
                  hyperparam_mutations={"path.lam": [1.0, 2.0]}, synch=True)
        for t in trials:
            pbt._trial_state[t] = _PBTTrialState(t)
            pbt._trial_state[t].last_train_time = 20
        pbt._next_perturbation_sync = 20  # what the resumed PBT computed: max(10 + 10, 20)
        chosen = pbt.choose_trial_to_run(FakeController(trials))
        assert (chosen is None) if cls is PopulationBasedTraining else (chosen in trials)
    assert pbt._next_perturbation_sync == 30


@pytest.mark.heavy
def test_a_killed_pbt_driver_resumes_and_finishes(tmp_path):
    """SIGKILL `fipray sweep` once the population is past its first exploit; the same command resumes it."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    from test_job_submit import ROOT, _stop_head

    out = tmp_path / "pbt"
    cmd = [sys.executable, "-m", "fipray.cli", "sweep", "--config", str(SHIPPED), "--out", str(out), "--no-progress",
           "seeds=[0]", "train.steps=40", "path.steps=20", "model.kwargs.hidden=[32]", "sweep.num_samples=4",
           "sweep.perturbation_interval=10", "sweep.name=k"]
    tmps = [tempfile.mkdtemp(prefix="fpb", dir="/tmp") for _ in range(2)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    env.pop("RAY_ADDRESS", None)
    try:
        p = subprocess.Popen(cmd, cwd=ROOT, env={**env, "RAY_TMPDIR": tmps[0]}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        reports = out / "reports.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:
            lines = reports.read_text().splitlines() if reports.is_file() else []
            if len(lines) >= 6 and any(json.loads(x)["parent"] for x in lines):  # past the first exploit
                break
            time.sleep(0.3)
        assert p.poll() is None, "the sweep ended (or failed) before it could be killed"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        _stop_head([tmps[0]])  # the killed driver's local Ray
        before = len(reports.read_text().splitlines())
        assert before < 4 * 8  # killed mid-sweep: 4 trials x 8 stretches make a full run
        log = tmp_path / "resumed.log"
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env={**env, "RAY_TMPDIR": tmps[1]}, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=600).returncode
            except subprocess.TimeoutExpired:
                rc = None
        assert rc == 0, (f"resumed run: rc {rc}, {len(reports.read_text().splitlines())} reports (killed at {before}); "
                         f"log tail: {log.read_text()[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["resumed"] is True and summary["num_trials"] == 4
        rows = pq.read_table(out / "trials.parquet").to_pylist()
        assert all(row["status"] == "completed" and row["path_step"] == 80 for row in rows)
        assert any(row["parent"] for row in rows)
        assert {row["parent"] for row in rows} - {""} <= {row["trial_id"] for row in rows}
    finally:
        for t in tmps:
            _stop_head([t])
