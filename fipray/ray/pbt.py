"""`sweep.scheduler: pbt`: population-based training along FIP paths (Ray Tune's PopulationBasedTraining).

    run_pbt(job, out, storage, metric, concurrent, ...) -> summary     (called by `fipray.ray.sweep.run_sweep`)

Every trial is a path trial (`fipray.path_trial.PathTrial`, run by `fipray.ray.trainable.run_path_trial`): its
FIP path(s) from the base network, reporting every `sweep.perturbation_interval` path steps with a checkpoint,
scored on the held-out validation part of the training split. At each such step (synchronous PBT: the whole
population at the same path step) the bottom `sweep.pbt_quantile` of trials take the checkpoint of a top trial
(its path, Adam moments included) and continue it with its knobs perturbed (x0.8 / x1.2, or resampled with
`sweep.resample_probability`) and clipped to their range; `lineage.json` in the checkpoint records whose path
each stretch ran on and with which values.

Measured pitfall (an earlier attempt): asynchronous PBT with reused actors and 2 concurrent trials live-locked,
thousands of exploits at one iteration. Here: `synch=True`, fresh actors, the whole population created at once
(a search algorithm capped at the concurrency would only ever create that many trials), a stop criterion at the
path's last step, so the last report ends a trial instead of pausing it for one more perturbation, and `SyncedPBT`,
which keeps a resumed driver's population moving (Tune's PBT hung there, measured).

Outputs in `out`, as `fipray sweep` writes them: trials.parquet (one row per trial: final knob values, metric,
status, `parent`, `forked_at`, `forks`, `lineage` as JSON), reports.parquet, best_config.yaml (the best trial's
final values), summary.json (the sweep's keys plus the PBT ones), `schedule.png` (each mutated knob over the
path steps of the best trial, following its lineage) and Tune's experiment in `tune/` (resumed by the same
command after the driver was killed).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining

from fipray.atomic import atomic_write_json, write_parquet
from fipray.config import ConfigError, save_config
from fipray.job import JobConfig
from fipray.operation import get_operation
from fipray.path_trial import PathTrial, path_trial_operations
from fipray.ray.storage import Storage
from fipray.ray.trainable import plain, report_rows, run_path_trial, search_space, selected_on

KEEP_CHECKPOINTS = 4
REPORTS_FILE = "reports.jsonl"  # per trial; PBT warns that <= 2 can delete a checkpoint another trial is about to copy


def _field(cfg_dict: dict, key: str) -> Any:
    node: Any = cfg_dict
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config key 'sweep.mutations': {key!r} is not a config field")
        node = node[part]
    return node


def mutation_ranges(job: JobConfig) -> dict[str, tuple[float, float, bool]]:
    """{key: (low, high, log)}: what PBT perturbs and within which range (ConfigError naming the key otherwise).

    `sweep.mutations` {key: [low, high]} (log scale when 0 < low and high / low >= 10), or, when it is empty,
    every knob `sweep.search` draws from uniform / loguniform, within its search range."""
    cfg, sc = job.cfg, job.sweep
    plain = cfg.to_dict()
    if sc.mutations:
        spec = dict(sc.mutations)
    else:
        spec = {k: next(iter(s.values())) for k, s in sc.search.items() if next(iter(s)) in ("uniform", "loguniform")}
        if not spec:
            raise ConfigError("config key 'sweep.mutations' is empty and 'sweep.search' draws no knob from uniform or "
                              "loguniform: name the knobs PBT perturbs, e.g. mutations: {path.lam: [1, 100]}")
    out = {}
    for key, rng in spec.items():
        value = _field(plain, key)
        if isinstance(value, bool) or not isinstance(value, float):
            raise ConfigError(f"config key 'sweep.mutations.{key}': PBT perturbs real-valued knobs (x0.8 / x1.2); "
                              f"{key} is {type(value).__name__} {value!r}")
        if not (isinstance(rng, (list, tuple)) and len(rng) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)
                and float(rng[0]) < float(rng[1])):
            raise ConfigError(f"config key 'sweep.mutations.{key}': expected [low, high] with low < high, got {rng!r}")
        low, high = float(rng[0]), float(rng[1])
        for probe in (low, high):
            try:
                cfg.replace(**{key: probe})
            except ConfigError as e:
                raise ConfigError(f"config key 'sweep.mutations.{key}': [{low:g}, {high:g}] is a PBT mutation outside "
                                  f"the knob's range: {probe:g} is invalid ({e})") from None
        searched = sc.search.get(key, {})
        log = "loguniform" in searched if searched else (low > 0 and high / low >= 10)
        out[key] = (low, high, log)
    return out


def check_pbt(job: JobConfig) -> tuple[dict[str, tuple[float, float, bool]], int]:
    """Everything PBT needs, checked before any trial runs: (mutation ranges, path steps of a trial)."""
    cfg, sc = job.cfg, job.sweep
    if cfg.operation not in path_trial_operations():
        raise ConfigError(f"config key 'sweep.scheduler': pbt runs along the FIP paths of "
                          f"{', '.join(path_trial_operations())}, not {cfg.operation!r}")
    if sc.method != "fip":
        raise ConfigError(f"config key 'sweep.method': pbt perturbs FIP paths; {sc.method!r} has none (use asha)")
    if sc.trainable != "function":
        raise ConfigError("config key 'sweep.trainable': pbt runs function trainables (path trials), not 'train'")
    if sc.pbt_quantile > 0.5:
        raise ConfigError(f"config key 'sweep.pbt_quantile' = {sc.pbt_quantile}: at most 0.5 (top and bottom)")
    ranges = mutation_ranges(job)
    with tempfile.TemporaryDirectory() as tmp:  # builds the phases only: nothing is trained or written
        steps = PathTrial(cfg, Path(tmp) / "probe", **sc.options()).total_steps
    if sc.perturbation_interval > steps:
        raise ConfigError(f"config key 'sweep.perturbation_interval' = {sc.perturbation_interval} exceeds the "
                          f"{steps} steps of a trial's path: no perturbation would ever happen")
    return ranges, steps


class SyncedPBT(PopulationBasedTraining):
    """Synchronous PBT that survives a resumed driver.

    Tune does not keep a scheduler's state across `Tuner.restore`: the resumed PBT starts its bookkeeping at step 0
    while the trials continue from their checkpoints. Measured (the killed-driver test): when every trial then
    reports the same step S, PBT sets its next synchronisation point to S itself, pauses every trial and, finding
    none below it to run, spins forever. Here, once no live trial is below that point, it moves one interval past
    the least advanced trial.
    """

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None or not self._synch:
            return trial
        live = [t for t in tune_controller.get_live_trials() if t in self._trial_state]
        waiting = [t for t in live if t.status in (Trial.PENDING, Trial.PAUSED)]
        times = [self._trial_state[t].last_train_time for t in live]
        if waiting and min(times) >= self._next_perturbation_sync:
            self._next_perturbation_sync = min(times) + self._perturbation_interval
            trial = super().choose_trial_to_run(tune_controller)
        return trial


class ClipToRanges:
    """PBT's `custom_explore_fn`: a perturbed value (x1.2 after x1.2 ...) stays within its knob's range."""

    def __init__(self, ranges: dict[str, tuple[float, float, bool]]):
        self.ranges = {k: (lo, hi) for k, (lo, hi, _) in ranges.items()}

    def __call__(self, config: dict) -> dict:
        for k, (lo, hi) in self.ranges.items():
            if k in config:
                config[k] = float(min(max(float(config[k]), lo), hi))
        return config


class _Driver(tune.Callback):
    """The driver's view of the population: every report appended to `reports.jsonl` in the output folder (kept
    across a killed and resumed driver; Tune's own result files lose reports around PBT's pauses), and a progress
    bar of the trials that reached the path's end."""

    FIELDS = ("trial_id", "training_iteration", "path_step", "grad_evals", "stretch_grad_evals", "trial_seconds",
              "timestamp", "parent", "forked_at", "forks")

    def __init__(self, file: Path, metrics: tuple[str, ...], total: int, metric: str, mode: str, steps: int,
                 enabled: bool):
        self.file, self.metrics, self.total, self.metric, self.mode, self.steps = file, metrics, total, metric, mode, steps
        self.enabled = enabled
        self.best: float | None = None
        self._bar: Any = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bar": None}  # pickled into Tune's experiment state: no live bar

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = {k: result.get(k) for k in (*self.FIELDS, *self.metrics)}
        with open(self.file, "a") as f:
            f.write(json.dumps({**row, "trial_id": trial.trial_id}, default=str) + "\n")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc="pbt trials", disable=not self.enabled, leave=False)
        last = trial.last_result or {}
        if last.get("path_step", 0) >= self.steps and self.metric in last:
            v = float(last[self.metric])
            if self.best is None or (v > self.best if self.mode == "max" else v < self.best):
                self.best = v
        self._bar.update(1)
        self._bar.set_postfix({"best": None if self.best is None else round(self.best, 4)})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Budget(tune.Stopper):
    """Stops a trial at the path's last step, and the whole sweep if the population ever reports more than
    `factor` times what reaching the end takes (the live-lock seen with asynchronous PBT: a bound, not a hope)."""

    def __init__(self, steps: int, reports: int, factor: int = 4):
        self.steps, self.limit, self.count = steps, factor * reports, 0

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.count += 1
        return float(result.get("path_step", 0)) >= self.steps

    def stop_all(self) -> bool:
        return self.count > self.limit


def run_pbt(job: JobConfig, out: Path, st: Storage, metric: str, concurrent: int, *, progress: bool, t0: float,
            ray_start: float) -> dict:
    """Run (or resume) the PBT sweep of `job` into `out`; returns the summary (`fipray sweep`'s keys plus pbt)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cfg, rc, sc = job.cfg, job.ray, job.sweep
    ranges, steps = check_pbt(job)
    trainable = tune.with_resources(
        tune.with_parameters(run_path_trial, cfg_dict=cfg.to_dict(), options=sc.options(),
                             interval=sc.perturbation_interval),
        {"cpu": rc.cpus_per_path, "gpu": rc.gpus_per_path})
    cb = _Driver(out / REPORTS_FILE, get_operation(cfg.operation).metrics, sc.num_samples, metric, sc.mode, steps,
                 progress)
    run_config = tune.RunConfig(
        name=sc.name, storage_path=st.path("tune"), storage_filesystem=st.fs, verbose=0, callbacks=[cb],
        stop=Budget(steps, sc.num_samples * math.ceil(steps / sc.perturbation_interval)), checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS))
    exp = st.path(f"tune/{sc.name}")
    random.seed(sc.search_seed)  # PBT's exploit / explore draws (Python's and NumPy's global generators)
    np.random.seed(sc.search_seed)
    resumed = tune.Tuner.can_restore(exp, storage_filesystem=st.fs)
    if resumed:
        tuner = tune.Tuner.restore(exp, trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=st.fs)
    else:
        plain = cfg.to_dict()
        points = [{k: _field(plain, k) for k in sc.search}] if sc.include_base_config else None
        pbt = SyncedPBT(
            time_attr="path_step", perturbation_interval=sc.perturbation_interval,
            hyperparam_mutations={k: (tune.loguniform if log else tune.uniform)(lo, hi)
                                  for k, (lo, hi, log) in ranges.items()},
            quantile_fraction=sc.pbt_quantile, resample_probability=sc.resample_probability,
            custom_explore_fn=ClipToRanges(ranges), synch=True)
        tuner = tune.Tuner(
            trainable, param_space=search_space(sc.search),
            tune_config=tune.TuneConfig(
                metric=metric, mode=sc.mode, num_samples=sc.num_samples, scheduler=pbt, reuse_actors=True,
                # No cap on the generator: PBT time-multiplexes the whole population on the cluster's CPUs.
                search_alg=BasicVariantGenerator(points_to_evaluate=points, random_state=sc.search_seed)),
            run_config=run_config)
    try:
        grid = tuner.fit()
    finally:
        cb.close()
    summary = write_pbt(job, out, metric, grid, ranges, steps, time.perf_counter() - t0, ray_start, resumed,
                        concurrent)
    if st.local is None:  # a cluster without a shared filesystem: the results where every machine reads them
        for f in sorted(out.iterdir()):
            if f.is_file():
                st.upload_file(f, f"results/{f.name}")
    return summary


def read_reports(out: Path) -> dict[str, list[dict]]:
    """Every trial's reports from `reports.jsonl` ({trial_id: rows in iteration order}; a report written twice,
    by a driver killed after writing it and the resumed one, counts once)."""
    by: dict[str, dict[tuple, dict]] = {}
    f = out / REPORTS_FILE
    for line in f.read_text().splitlines() if f.is_file() else []:
        r = json.loads(line)
        by.setdefault(str(r["trial_id"]), {})[(r["training_iteration"], r["path_step"])] = r
    return {t: [rows[k] for k in sorted(rows)] for t, rows in by.items()}


class _Reported:
    """What `report_rows` reads of a Tune result: the trial's reports as a DataFrame."""

    def __init__(self, rows: list[dict]):
        import pandas as pd

        self.metrics_dataframe = pd.DataFrame(rows)


def trial_rows(job: JobConfig, grid: Any, metric: str, keys: list[str], steps: int,
               reports: dict[str, list[dict]]) -> list[dict]:
    """One row per trial: its knobs' final values, metric, status, compute and where its path came from."""
    reported = get_operation(job.cfg.operation).metrics
    rows = []
    for r in grid:
        m = r.metrics or {}
        tid = str(m.get("trial_id", ""))
        done = float(m.get("path_step", 0)) >= steps
        status = "error" if r.error is not None else ("completed" if done else "stopped_early")
        rows.append({"trial_id": tid, **{k: plain(r.config.get(k)) for k in keys},
                     "metric": float(m[metric]) if metric in m else math.nan, "path_step": int(m.get("path_step", 0)),
                     "iterations": len(reports.get(tid, [])), "seconds": float(m.get("trial_seconds", math.nan)),
                     "status": status, "grad_evals": float(m.get("grad_evals", math.nan)),
                     # What this trial itself ran (grad_evals counts the copied stretches of its path too).
                     "ran_grad_evals": float(sum(x.get("stretch_grad_evals") or 0.0 for x in reports.get(tid, []))),
                     "parent": str(m.get("parent", "")), "forked_at": int(m.get("forked_at", -1)),
                     "forks": int(m.get("forks", 0)), "lineage": str(m.get("lineage", "[]")),
                     **{f"last_{k}": float(v) for k, v in m.items() if k in reported and k != metric}})
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def write_pbt(job: JobConfig, out: Path, metric: str, grid: Any, ranges: dict, steps: int, seconds: float,
              ray_start: float, resumed: bool, concurrent: int) -> dict:
    """trials.parquet, reports.parquet, best_config.yaml, schedule.png and summary.json of a PBT sweep."""
    cfg, sc = job.cfg, job.sweep
    keys = list(dict.fromkeys([*sc.search, *ranges]))
    reports = read_reports(out)
    rows = trial_rows(job, grid, metric, keys, steps, reports)
    write_parquet(out / "trials.parquet", rows)
    write_parquet(out / "reports.parquet", report_rows([_Reported(r) for r in reports.values()], metric))
    done = [r for r in rows if r["status"] == "completed" and r["metric"] == r["metric"]]
    if not done:
        raise RuntimeError(f"no trial of the PBT sweep in {out} reached the path's end ({steps} steps); see "
                           f"trials.parquet")
    best = (max if sc.mode == "max" else min)(done, key=lambda r: r["metric"])
    best_params = {k: best[k] for k in keys}
    save_config(cfg.replace(**best_params), out / "best_config.yaml")
    lineage = json.loads(best["lineage"])
    plot_schedule(lineage, list(ranges), steps, out / "schedule.png", f"{metric} = {best['metric']:.4f}")
    exploits = {(s["trial_id"], s["forked_at_step"]) for r in rows for s in json.loads(r["lineage"])
                if s["parent"] is not None and s["parent"] != s["trial_id"]}
    summary = {"metric": metric, "mode": sc.mode, "best_config": best_params, "best_metric": best["metric"],
               "num_trials": len(rows), "num_stopped_early": sum(r["status"] == "stopped_early" for r in rows),
               "seconds": seconds, "num_errors": sum(r["status"] == "error" for r in rows),
               "best_trial_id": best["trial_id"], "max_iterations": math.ceil(steps / sc.perturbation_interval),
               "max_concurrent_trials": concurrent, "trainable": sc.trainable, "resumed": resumed,
               "ray_start_seconds": ray_start, "operation": cfg.operation,
               "best_config_file": str(out / "best_config.yaml"), "seeds": list(cfg.seeds),
               "config_hash": cfg.run_id(), "method": sc.method,
               "grad_evals": float(sum(r["ran_grad_evals"] for r in rows)),
               "selected_on": selected_on(sc),
               "scheduler": "pbt", "pbt": {
                   "perturbation_interval": sc.perturbation_interval, "path_steps": steps,
                   "mutations": {k: [lo, hi] for k, (lo, hi, _) in ranges.items()},
                   "log_scale": [k for k, (_, _, log) in ranges.items() if log], "quantile": sc.pbt_quantile,
                   "resample_probability": sc.resample_probability, "population": len(rows),
                   "num_exploits": len(exploits), "best_lineage": lineage, "best_forks": best["forks"],
                   "schedule_plot": str(out / "schedule.png")}}
    atomic_write_json(out / "summary.json", summary)
    return summary


def schedule_points(lineage: list[dict], key: str, steps: int) -> list[tuple[int, int, float, str]]:
    """[(from step, to step, value, trial)]: the knob `key` along a lineage's segments."""
    ends = [int(s["forked_at_step"]) for s in lineage[1:]] + [steps]
    return [(int(s["forked_at_step"]), end, float(s["params"][key]), str(s["trial_id"]))
            for s, end in zip(lineage, ends) if key in s["params"] and end > int(s["forked_at_step"])]


def plot_schedule(lineage: list[dict], keys: list[str], steps: int, path: Path, title: str) -> None:
    """Each mutated knob over the path steps of one trial's lineage: the value each stretch ran with, the
    exploits (dashed: the path copied from another trial there) and the trial each stretch ran in."""
    from fipray.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(len(keys), 1, figsize=(6.5, 2.2 + 1.6 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        segs = schedule_points(lineage, key, steps)
        for a, b, v, tid in segs:
            ax.hlines(v, a, b, lw=2.5)
            ax.annotate(tid[-5:], ((a + b) / 2, v), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=7)
        for s in lineage[1:]:
            if s["parent"] != s["trial_id"]:
                ax.axvline(int(s["forked_at_step"]), ls="--", lw=0.8, color="grey")
        ax.margins(y=0.3)
        vals = [v for *_, v, _ in segs]
        if vals and min(vals) > 0 and max(vals) / min(vals) > 5:
            ax.set_yscale("log")
        ax.set_ylabel(key)
    axes[-1, 0].set_xlabel("path step (labels: the trial each stretch ran in; dashed: an exploit)")
    axes[0, 0].set_title(f"PBT schedule of the best trial ({title})", fontsize=10)
    save_figure(fig, path)
