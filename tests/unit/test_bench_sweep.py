"""benchmarks/bench_sweep.py's measures on synthetic report rows: the grid's best counts full-length trials only,
"reached" is the first full-length report within 0.5 points in time order, and the compute until then counts
every trial's reports up to that moment (stopped trials included, later reports not). No Ray."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "benchmarks" / "bench_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _r(trial, it, metric, evals, ts, max_t=3):
    return {"trial_id": trial, "full": it == max_t, "metric": metric, "grad_evals": evals, "timestamp": ts}


# Three trials of 3 iterations, 100 grad evals an iteration; "b" is stopped after iteration 1 with the highest
# partial score, "c" finishes last. Sorted by time as reports.parquet is.
ROWS = sorted([
    _r("a", 1, 0.80, 100, 1000), _r("a", 2, 0.85, 200, 1002), _r("a", 3, 0.90, 300, 1004),
    _r("b", 1, 0.99, 100, 1001),
    _r("c", 1, 0.70, 100, 1005), _r("c", 2, 0.88, 200, 1006), _r("c", 3, 0.93, 300, 1008),
], key=lambda r: (r["timestamp"], r["trial_id"]))


def test_grid_best_counts_full_length_trials_only(bench):
    assert bench.grid_best(ROWS) == 0.93  # b's 0.99 is a partial score of a stopped trial
    with pytest.raises(ValueError, match="last iteration"):
        bench.grid_best([r for r in ROWS if not r["full"]])


def test_reach_is_the_first_full_length_report_within_tolerance_and_counts_compute_until_then(bench):
    hit = bench.reach(ROWS, 0.93 - bench.TOL, t_start=999.5)
    # a's 0.90 is 3 points short; b's 0.99 is partial; c's 0.93 at t=1008 is the first.
    assert hit["trial_id"] == "c" and hit["timestamp"] == 1008
    assert hit["grad_evals"] == 300 + 100 + 300  # a's, stopped b's, c's, all before that moment
    assert hit["seconds"] == pytest.approx(1009 - 999.5)  # the end of the report's whole second
    earlier = bench.reach(ROWS, 0.90, t_start=999.5)  # a target a reaches first
    assert earlier["trial_id"] == "a" and earlier["grad_evals"] == 300 + 100  # c's later reports not counted
    assert bench.reach(ROWS, 0.95, t_start=999.5) is None  # only b's partial report is above it


def test_compute_counts_every_report_of_the_same_whole_second(bench):
    rows = [_r("a", 1, 0.5, 100, 10, 1), _r("b", 1, 0.9, 100, 10, 2), _r("b", 2, 0.9, 250, 12, 2)]
    hit = bench.reach(rows, 0.5, t_start=9.0)
    assert hit["trial_id"] == "a" and hit["grad_evals"] == 200  # b's report of the same second counted
    assert bench.compute_at(rows, 11) == 200 and bench.total_compute(rows) == 350


def test_best_so_far_is_monotone_and_ends_at_the_total(bench):
    curve = bench.best_so_far(ROWS)
    assert len(curve) == len(ROWS)
    evals = [c for c, _ in curve]
    best = [b for _, b in curve if not math.isnan(b)]
    assert evals == sorted(evals) and evals[-1] == bench.total_compute(ROWS) == 700
    assert best == sorted(best) and best[0] == 0.90 and best[-1] == 0.93
    assert all(math.isnan(b) for _, b in curve[:3])  # nothing full length before a's third report


def test_run_measures_against_the_grid(bench):
    m = bench.run_measures(ROWS, best=0.93, t_start=999.5, grid_evals=1400.0, grid_seconds=19.0)
    assert m["reached"] and m["ratio_grad_evals"] == pytest.approx(0.5) and m["ratio_seconds"] == pytest.approx(0.5)
    assert m["total_ratio_grad_evals"] == pytest.approx(0.5)
    miss = bench.run_measures(ROWS, best=0.99, t_start=999.5, grid_evals=1400.0, grid_seconds=19.0)
    assert not miss["reached"] and math.isnan(miss["ratio_grad_evals"])


def test_mean_std_ignores_nan(bench):
    assert bench.mean_std([1.0, 3.0, math.nan]) == (2.0, pytest.approx(math.sqrt(2)))
    assert bench.mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(x) for x in bench.mean_std([math.nan]))


def test_jobs_grid_runs_every_trial_full_length_and_asha_stops_at_the_shipped_rungs(bench):
    from fipray.job import job_from_dict

    args = bench.argparse.Namespace(smoke_test=False, samples=12, asha_samples=24, pbt_samples=6,
                                    perturbation_interval=150)
    grid = job_from_dict(bench.job_dict("grid", 0, args))
    assert math.prod(len(v["grid"]) for v in grid.sweep.search.values()) == 36
    assert grid.sweep.grace_period == 12 == len(grid.cfg.seeds) * (grid.cfg.continual.num_tasks - 1)
    rand = job_from_dict(bench.job_dict("random", 1, args))
    assert rand.sweep.grace_period == 12 and rand.sweep.num_samples == 12 and rand.sweep.search_seed == 1
    asha = job_from_dict(bench.job_dict("asha", 2, args))
    assert (asha.sweep.grace_period, asha.sweep.reduction_factor, asha.sweep.num_samples) == (2, 3, 24)
    pbt = job_from_dict(bench.job_dict("pbt", 0, args))
    assert (pbt.sweep.scheduler, pbt.sweep.num_samples, pbt.sweep.perturbation_interval) == ("pbt", 6, 150)
    assert pbt.sweep.search == rand.sweep.search and not pbt.sweep.include_base_config
    # random search's ranges are the grid's bounds
    for k, v in bench.GRID.items():
        assert rand.sweep.search[k]["loguniform"] == [min(v), max(v)]


def test_rows_from_reports_parquet_and_from_pbt(bench):
    rows = bench.sweep_rows([{"trial_id": "a", "iteration": 12, "metric": 0.9, "grad_evals": 4500.0,
                              "trial_seconds": 1.0, "timestamp": 5.0}], max_t=12)
    assert rows == [{"trial_id": "a", "full": True, "metric": 0.9, "grad_evals": 4500.0, "timestamp": 5.0}]
    # PBT: "b" copies a's path at step 100 (its grad_evals then counts a's stretch too); its own compute does not.
    rep = [{"trial_id": "a", "training_iteration": 1, "path_step": 100, "acc_mean": 0.8, "grad_evals": 400,
            "stretch_grad_evals": 400, "timestamp": 1},
           {"trial_id": "b", "training_iteration": 1, "path_step": 100, "acc_mean": 0.7, "grad_evals": 400,
            "stretch_grad_evals": 400, "timestamp": 2},
           {"trial_id": "a", "training_iteration": 2, "path_step": 200, "acc_mean": 0.9, "grad_evals": 500,
            "stretch_grad_evals": 100, "timestamp": 3},
           {"trial_id": "b", "training_iteration": 2, "path_step": 200, "acc_mean": 0.85, "grad_evals": 500,
            "stretch_grad_evals": 100, "timestamp": 4}]
    rows = bench.pbt_rows(rep, steps=200)
    assert [r["full"] for r in rows] == [False, False, True, True]
    assert bench.total_compute(rows) == 1000  # 4 stretches actually run
    assert bench.grid_best(rows) == 0.9
