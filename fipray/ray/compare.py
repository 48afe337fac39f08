"""`fipray sweep --compare`: every listed method tuned with the same budget, then measured on the test split.

    run_compare(job, out) -> summary

For each method of `sweep.compare_methods` (FIP and the operation's baselines, `Operation.trial_methods`) the
sweep of `job.sweep` runs with `sweep.method` set to it and its own search space (`sweep.spaces[method]`, else
`sweep.search`), into `out/<method>/`: the same number of trials, scheduler (ASHA's rungs or PBT), search seed,
seeds per trial and held-out validation split for every method, so the budget is equal in trials x iterations;
the gradient evaluations and seconds each method's tuning actually spent are measured and reported beside it.
Every trial trains on the training split less its held-out part and is scored on that part
(`fipray.units.trial_context`); the test split is read only afterwards, once per chosen config and test seed:
each method's best config is trained on the whole training split with each seed of `sweep.test_seeds` and
scored on the test split (`fipray.units.run_test`), as Ray tasks in parallel.

Outputs in `out`: `compare.md` (the table: method, best hyperparameters, validation score, test mean ± std,
tuning compute; and which data chose and which data measured), `compare.parquet` (the same rows),
`tests.parquet` (one row per method and test seed), `summary.json`, and each method's sweep folder. Run the
same command again after the driver died: finished sweeps and test runs are kept (`out/<method>/summary.json`,
`out/tests/*.json`), an unfinished sweep resumes (`Tuner.restore`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import ray

from fipray.atomic import atomic_write_json, atomic_write_text, write_parquet
from fipray.config import Config, from_dict
from fipray.job import JobConfig, sweep_metric
from fipray.ray.cluster import quiet_ray
from fipray.ray.local import init_local
from fipray.ray.sweep import run_sweep, selected_on
from fipray.runtime import mean_std, prepare_out
from fipray.units import run_test


def method_job(job: JobConfig, method: str) -> JobConfig:
    """The sweep of one method: `job.sweep` with `method`, its own search space and its own name."""
    sc = job.sweep
    return dataclasses.replace(job, sweep=dataclasses.replace(
        sc, method=method, search=dict(sc.spaces.get(method) or sc.search), name=f"{sc.name}-{method}",
        compare=False, compare_methods=(), spaces={}))


def _test_one(cfg_dict: dict, method: str, options: dict) -> dict:
    return run_test(from_dict(cfg_dict), method=method, **options)


def run_compare(job: JobConfig, out: str | Path, *, progress: bool = True, address: str | None = None,
                num_cpus: int | None = None, temp_dir: str | None = None) -> dict:
    """Sweep every method of `job.sweep.compare_methods` at an equal budget, test the chosen configs; the summary."""
    sc, cfg = job.sweep, job.cfg
    metric = sweep_metric(job)
    out = Path(out).resolve()
    prepare_out(cfg, out)
    atomic_write_text(out / "job.yaml", __import__("yaml").safe_dump(job.to_dict(), sort_keys=False))
    t0 = time.perf_counter()
    started = not ray.is_initialized()
    quiet_ray()
    init_local(num_cpus=num_cpus, address=address, temp_dir=temp_dir,
               include_dashboard=sc.trainable == "train", logging_level=logging.ERROR)
    try:
        sweeps = {}
        for m in sc.compare_methods:
            sub, folder = method_job(job, m), out / m
            done = folder / "summary.json"
            if done.is_file() and json.loads(done.read_text()).get("config_hash") == cfg.run_id():
                sweeps[m] = json.loads(done.read_text())  # finished before the driver was restarted
            else:
                sweeps[m] = run_sweep(sub, folder, progress=progress, address=address)
            sweeps[m]["search"] = dict(sub.sweep.search)
        tests = _tests(job, out, sweeps, metric)
        return _write(job, out, metric, sweeps, tests, time.perf_counter() - t0)
    finally:
        if started:
            ray.shutdown()


def _tests(job: JobConfig, out: Path, sweeps: dict[str, dict], metric: str) -> list[dict]:
    """Each method's chosen config on the test split, once per test seed (Ray tasks; kept in out/tests/)."""
    sc, rc = job.sweep, job.ray
    folder = out / "tests"
    folder.mkdir(parents=True, exist_ok=True)
    task = ray.remote(num_cpus=rc.cpus_per_path, num_gpus=rc.gpus_per_path, max_retries=2)(_test_one)
    pending, rows = {}, []
    for m, s in sweeps.items():
        best: Config = job.cfg.replace(**s["best_config"])
        for seed in sc.test_seeds:
            f = folder / f"{m}-seed{seed}.json"
            if f.is_file():
                rows.append(json.loads(f.read_text()))
                continue
            opts = {k: v for k, v in sc.options().items() if k not in ("method", "validation", "validation_seed")}
            pending[task.remote(best.replace(seeds=(seed,)).to_dict(), m, opts)] = (m, seed, f)
    for ref, (m, seed, f) in pending.items():
        got = ray.get(ref)
        row = {"method": m, "seed": seed, "test": float(got[metric]), "grad_evals": float(got.get("grad_evals", 0)),
               "seconds": float(got.get("trial_seconds", 0)),
               **{f"test_{k}": float(v) for k, v in got.items()
                  if isinstance(v, (int, float)) and k not in (metric, "seed", "grad_evals", "trial_seconds")}}
        atomic_write_json(f, row)
        rows.append(row)
    return sorted(rows, key=lambda r: (list(sweeps).index(r["method"]), r["seed"]))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write(job: JobConfig, out: Path, metric: str, sweeps: dict[str, dict], tests: list[dict],
           seconds: float) -> dict:
    import pyarrow.parquet as pq

    sc = job.sweep
    rows = []
    for m, s in sweeps.items():
        trials = pq.read_table(out / m / "trials.parquet").to_pylist()
        t = [r["test"] for r in tests if r["method"] == m]
        mean, std = mean_std(t)
        rows.append({"method": m, "best": json.dumps(s["best_config"]), "validation": s["best_metric"],
                     "test_mean": mean, "test_std": std, "test_seeds": len(t), "trials": len(trials),
                     "stopped_early": s["num_stopped_early"],
                     "tune_grad_evals": float(sum(r["grad_evals"] for r in trials if r["grad_evals"] == r["grad_evals"])),
                     "tune_seconds": float(sum(r["seconds"] for r in trials if r["seconds"] == r["seconds"])),
                     "search": json.dumps(s["search"])})
    write_parquet(out / "compare.parquet", rows)
    write_parquet(out / "tests.parquet", tests)
    chose = selected_on(sc)
    measured = (f"test split, the chosen config trained on the whole training split with each of seeds "
                f"{list(sc.test_seeds)} (each run's own `seeds` replaced by one test seed)")
    lines = [f"# Tuned comparison: {job.cfg.operation}, metric `{metric}` ({sc.mode})", "",
             f"- **chosen on** {chose}.",
             f"- **measured on** {measured}.",
             f"- **budget per method**: {sc.num_samples} trials x {job.cfg.seeds and len(job.cfg.seeds)} seed(s) "
             f"per trial, scheduler {sc.scheduler}, search seed {sc.search_seed}; the same for every method.", "",
             "| method | best hyperparameters | validation | test mean ± std | trials (stopped) | tuning grad evals "
             "| tuning seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        best = ", ".join(f"{k}={_fmt(v)}" for k, v in json.loads(r["best"]).items())
        lines.append(f"| {r['method']} | {best} | {r['validation']:.4f} | {r['test_mean']:.4f} ± {r['test_std']:.4f} "
                     f"| {r['trials']} ({r['stopped_early']}) | {r['tune_grad_evals']:,.0f} | {r['tune_seconds']:,.0f} |")
    lines += ["", "Search spaces:", ""] + [f"- {r['method']}: `{r['search']}`" for r in rows]
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    summary = {"operation": job.cfg.operation, "metric": metric, "mode": sc.mode, "chosen_on": chose,
               "measured_on": measured, "seconds": seconds, "methods": {
                   r["method"]: {k: (json.loads(v) if k in ("best", "search") else v) for k, v in r.items()
                                 if k != "method"} for r in rows}}
    atomic_write_json(out / "summary.json", summary)
    return summary
