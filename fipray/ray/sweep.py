"""`fipray sweep`: search config fields (β, λ, η, ...) with Ray Tune and an ASHA scheduler.

    run_sweep(job, out) -> summary

Each trial is the core's FIP for one point of the search space (`fipray.units.run_trial`), run directly
in a Tune function trainable (cheap on small models), or with `sweep.trainable: train` inside a
one-worker `TorchTrainer` (a GPU per trial on a cluster; TuneReportCallback forwards its reports).
ASHA stops trials at rungs of the training iteration (one task phase, or one seed, per iteration).

Measured pitfalls (RAY_NOTES.md) and what this does about them:
- nested drivers deadlock the CPUs: a TorchTrainer trial's driver asks for 0.01 CPU and the number of
  concurrent trials is capped at what the cluster can hold with every trial's workers placed;
- ASHA-stopped Train trials leak their placement group without the dashboard's State API: the local
  Ray of a `trainable: train` sweep starts the dashboard;
- reports: one per iteration (a task phase = seconds of work), never per step.

Outputs in `out`: `trials.parquet` (one row per trial: searched values, metric, iterations, seconds,
status), `best_config.yaml` (a plain config `fipray continual|sparsify|ensemble|paths` accepts),
`metric_vs_<field>.png`, `summary.json` and Tune's own experiment folder `tune/` (what `Tuner.restore`
resumes from when the same command runs again after the driver was killed).

With `ray.storage_path` set (a folder every node sees, or a `s3://`, `gs://`, `file://` URI; see
`fipray.ray.storage`), Tune's experiment lives at `<storage>/tune/<sweep.name>` (resumed from there, on any
machine), TorchTrainer trials at `<storage>/train/`, and on an object store the outputs above are also
put under `<storage>/results/`. Fractional `ray.gpus_per_path` packs several trials on one GPU; a trial's
`device` is the GPU Ray assigned to it (`fipray.ray.cluster.worker_device`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from fipray.atomic import atomic_write_json, atomic_write_text, write_parquet
from fipray.config import ConfigError, save_config
from fipray.job import JobConfig, sweep_metric
from fipray.operation import get_operation
from fipray.ray.cluster import check_storage_on_nodes, joined_cluster, quiet_ray
from fipray.ray.data import check_engine
from fipray.ray.local import init_local
from fipray.ray.storage import Storage, check_storage, open_storage
from fipray.ray.trainable import plain, search_space, selected_on, trial_config
from fipray.runtime import prepare_out
from fipray.units import run_trial, trial_context, trial_iterations

REPORTS = "reports.jsonl"  # the driver's record of every report (Tune's own result files are off: quiet_ray)
TRAIN_DRIVER_CPU = 0.01  # a TorchTrainer trial's driver only waits; its workers hold the CPUs


def _function_trainable(params: dict, cfg_dict: dict, options: dict) -> None:
    run_trial(trial_config(cfg_dict, params), tune.report, **options)


def _trial_loop(config: dict) -> None:
    import ray.train

    from fipray.ray.data import worker_bundle

    cfg = trial_config(config["cfg"], config["params"])
    with worker_bundle(cfg) as bundle:  # data.engine: ray: the training split from Ray Data; else None
        run_trial(cfg, ray.train.report, bundle=bundle, **config["options"])


def _train_trainable(params: dict, cfg_dict: dict, options: dict, storage: str, cpus: float, gpus: float) -> None:
    """A trial as a one-worker TorchTrainer; `storage` is the URI or folder its Train run is kept in."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    st = open_storage(storage)
    trainer = TorchTrainer(
        _trial_loop,
        train_loop_config={"cfg": cfg_dict, "params": params, "options": options},
        **_ray_datasets(trial_config(cfg_dict, params)),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
        # A stable name per trial, so a restarted trial finds its own Train run.
        run_config=RunConfig(name=f"trial-{trial_id}", storage_path=st.path(), storage_filesystem=st.fs,
                             callbacks=[TuneReportCallback()]),  # type: ignore[list-item]
    )
    trainer.fit()


def _ray_datasets(cfg: Any) -> dict:
    """`data.engine: ray`: the trial's TorchTrainer gets the training split as a Ray Dataset, its one worker all
    of it (materialised by row index: the local engine's rows, so the same trial numbers); else nothing."""
    if cfg.data.engine != "ray":
        return {}
    from ray.train import DataConfig

    from fipray.ray.data import train_dataset

    return {"datasets": {"train": train_dataset(cfg)}, "dataset_config": DataConfig(datasets_to_split=[])}


class _Progress(tune.Callback):
    """One progress display: trials finished / started, best metric of the finished ones so far."""

    def __init__(self, total: int, metric: str, mode: str, max_t: int, enabled: bool, reports: Path | None = None):
        self.total, self.metric, self.mode, self.max_t, self.enabled = total, metric, mode, max_t, enabled
        self.reports = reports  # every report appended here (JSON lines), kept across a killed driver
        self.best: float | None = None
        self.stopped = 0
        self._bar: Any = None

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into the experiment state; a live progress bar must not go with them.
        return {**self.__dict__, "_bar": None}

    @property
    def bar(self) -> Any:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc="sweep trials", disable=not self.enabled, dynamic_ncols=True,
                             leave=False)
        return self._bar

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.reports is None or self.metric not in result:
            return
        row = {"trial_id": trial.trial_id, "iteration": int(result.get("training_iteration", 0)),
               "metric": float(result[self.metric]), **{k: float(result.get(k, float("nan")))
                                                      for k in ("grad_evals", "trial_seconds", "timestamp")}}
        with open(self.reports, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get("training_iteration", 0) >= self.max_t and self.metric in last:
            v = float(last[self.metric])
            if self.best is None or (v > self.best if self.mode == "max" else v < self.best):
                self.best = v
        else:
            self.stopped += 1
        self.bar.update(1)
        self.bar.set_postfix({"best": None if self.best is None else round(self.best, 4), "stopped": self.stopped})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def check_sweep_resources(job: JobConfig, *, strict: bool = True) -> int:
    """The number of trials that can run at once without starving each other; fails if none can.

    On a joined cluster (`strict=False`) an autoscaler may add nodes later: a shortfall is a warning and
    the configured `sweep.max_concurrent_trials` stands.
    """
    rc, sc = job.ray, job.sweep
    if not strict:
        try:
            return check_sweep_resources(job, strict=True)
        except ConfigError as e:
            import sys

            print(f"fipray: warning: {e} (waiting for the cluster's autoscaler, if it has one)", file=sys.stderr)
            return sc.max_concurrent_trials
    total = ray.cluster_resources()
    per_trial = rc.cpus_per_path + (TRAIN_DRIVER_CPU if sc.trainable == "train" else 0.0)
    fit = math.floor(total.get("CPU", 0) / per_trial + 1e-9)
    if rc.gpus_per_path:
        fit = min(fit, math.floor(total.get("GPU", 0) / rc.gpus_per_path + 1e-9))
    if fit < 1:
        raise ConfigError(f"one trial needs {per_trial:g} CPU and {rc.gpus_per_path:g} GPU, but the cluster has "
                          f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU")
    return min(sc.max_concurrent_trials, fit)


def run_sweep(job: JobConfig, out: str | Path, *, progress: bool = True, address: str | None = None,
              num_cpus: int | None = None, temp_dir: str | None = None) -> dict:
    """Run (or resume) the sweep of `job.sweep` into `out`; returns the summary."""
    cfg, rc, sc = job.cfg, job.ray, job.sweep
    metric = sweep_metric(job)
    if not sc.search:
        raise ConfigError("config key 'sweep.search' is empty: name at least one field, e.g. "
                          "path.lam: {loguniform: [1, 100]}")
    if sc.trainable == "train" and rc.workers_per_path > 1:
        raise ConfigError("sweep.trainable: train runs one worker per trial; ray.workers_per_path > 1 "
                          "(DDP) is for `fipray paths` with ray.backend: train")
    get_operation(cfg.operation).check_sweep(cfg)
    check_engine(cfg, sc.trainable, "sweep.trainable")
    if cfg.data.engine == "ray" and sc.scheduler == "pbt":
        raise ConfigError("config key 'data.engine': ray feeds plain TorchTrainer trials; sweep.scheduler: pbt "
                          "runs path trials in function trainables: use data.engine: local")
    if cfg.data.engine != "ray":  # the driver does not read a Ray Data split; its trials make their held-out part
        trial_context(cfg, validation=sc.validation, validation_seed=sc.validation_seed)  # it can be made
    out = Path(out).resolve()
    storage = open_storage(rc.storage_path or out, "ray.storage_path")  # a bad URI fails here
    prepare_out(cfg, out)
    check_storage(storage)  # no credentials, unreachable endpoint, no bucket: before any work
    atomic_write_text(out / "job.yaml", __import__("yaml").safe_dump(job.to_dict(), sort_keys=False))
    t0 = time.perf_counter()
    started = not ray.is_initialized()
    quiet_ray()
    init_local(num_cpus=num_cpus, address=address, temp_dir=temp_dir,
               include_dashboard=sc.trainable == "train", logging_level=logging.ERROR)
    ray_start = time.perf_counter() - t0
    try:
        concurrent = check_sweep_resources(job, strict=not joined_cluster(address))
        check_storage_on_nodes(storage)
        return _sweep(job, out, storage, metric, concurrent, progress=progress, t0=t0, ray_start=ray_start)
    finally:
        if started:
            ray.shutdown()


def _sweep(job: JobConfig, out: Path, st: Storage, metric: str, concurrent: int, *, progress: bool, t0: float,
           ray_start: float) -> dict:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cfg, rc, sc = job.cfg, job.ray, job.sweep
    if sc.scheduler == "pbt":
        from fipray.ray.pbt import run_pbt

        return run_pbt(job, out, st, metric, concurrent, progress=progress, t0=t0, ray_start=ray_start)
    cfg_dict = cfg.to_dict()
    options = sc.options()
    max_t = trial_iterations(cfg)
    if sc.trainable == "function":
        trainable = tune.with_resources(
            tune.with_parameters(_function_trainable, cfg_dict=cfg_dict, options=options),
            {"cpu": rc.cpus_per_path, "gpu": rc.gpus_per_path})
    else:
        trainable = tune.with_resources(
            tune.with_parameters(_train_trainable, cfg_dict=cfg_dict, options=options,
                                 storage=st.child("train").uri, cpus=rc.cpus_per_path, gpus=rc.gpus_per_path),
            {"cpu": TRAIN_DRIVER_CPU})
    grid = any(next(iter(s)) == "grid" for s in sc.search.values())
    total = sc.num_samples * math.prod(len(next(iter(s.values()))) for s in sc.search.values()
                                       if next(iter(s)) == "grid")
    points = [] if grid or not sc.include_base_config else [
        {k: _get(cfg_dict, k) for k in sc.search}]
    cb = _Progress(total, metric, sc.mode, max_t, progress, out / REPORTS)
    run_config = tune.RunConfig(name=sc.name, storage_path=st.path("tune"), storage_filesystem=st.fs, verbose=0,
                                callbacks=[cb])
    exp = st.path(f"tune/{sc.name}")
    if tune.Tuner.can_restore(exp, storage_filesystem=st.fs):
        tuner = tune.Tuner.restore(exp, trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=st.fs)
        resumed = True
    else:
        tuner = tune.Tuner(
            trainable, param_space=search_space(sc.search),
            tune_config=tune.TuneConfig(
                metric=metric, mode=sc.mode, num_samples=sc.num_samples, max_concurrent_trials=concurrent,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=sc.grace_period,
                                        reduction_factor=sc.reduction_factor),
                search_alg=BasicVariantGenerator(points_to_evaluate=points or None, random_state=sc.search_seed,
                                                 max_concurrent=concurrent)),
            run_config=run_config)
        resumed = False
    try:
        grid_result = tuner.fit()
    finally:
        cb.close()
    summary = _write(job, out, metric, grid_result, max_t, time.perf_counter() - t0, ray_start, resumed, concurrent)
    if st.local is None:  # a cluster without a shared filesystem: the results where every machine reads them
        for f in sorted(out.iterdir()):
            if f.is_file():
                st.upload_file(f, f"results/{f.name}")
    return summary


def _get(d: dict, key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def _write(job: JobConfig, out: Path, metric: str, grid: Any, max_t: int, seconds: float, ray_start: float,
           resumed: bool, concurrent: int) -> dict:
    cfg, sc = job.cfg, job.sweep
    keys = list(sc.search)
    reported = get_operation(cfg.operation).metrics
    rows = []
    for r in grid:
        m = r.metrics or {}
        its = int(m.get("training_iteration", 0))
        status = "error" if r.error is not None else ("completed" if its >= max_t else "stopped_early")
        rows.append({"trial_id": m.get("trial_id", ""), **{k: plain(r.config.get(k)) for k in keys},
                     "metric": float(m[metric]) if metric in m else float("nan"), "iterations": its,
                     "seconds": float(m.get("time_total_s", float("nan"))), "status": status,
                     "grad_evals": float(m.get("grad_evals", float("nan"))),
                     **{f"last_{k}": float(v) for k, v in m.items()
                        if k in reported and k != metric}})
    rows.sort(key=lambda r: r["trial_id"])
    write_parquet(out / "trials.parquet", rows)
    write_parquet(out / "reports.parquet", read_reports(out / REPORTS))
    done = [r for r in rows if r["status"] == "completed" and r["metric"] == r["metric"]]
    if not done:
        raise RuntimeError(f"no trial of the sweep in {out} completed all {max_t} iterations; see trials.parquet")
    # Only trials that ran every iteration compete: a stopped trial's last value is a partial running mean.
    best = (max if sc.mode == "max" else min)(done, key=lambda r: r["metric"])
    best_params = {k: best[k] for k in keys}
    best_cfg = cfg.replace(**best_params)
    save_config(best_cfg, out / "best_config.yaml")
    _plots(rows, keys, metric, out)
    summary = {"metric": metric, "mode": sc.mode, "best_config": best_params, "best_metric": best["metric"],
               "num_trials": len(rows), "num_stopped_early": sum(r["status"] == "stopped_early" for r in rows),
               "seconds": seconds, "num_errors": sum(r["status"] == "error" for r in rows),
               "best_trial_id": best["trial_id"], "max_iterations": max_t, "max_concurrent_trials": concurrent,
               "trainable": sc.trainable, "resumed": resumed, "ray_start_seconds": ray_start,
               "operation": cfg.operation, "best_config_file": str(out / "best_config.yaml"),
               "seeds": list(cfg.seeds), "config_hash": cfg.run_id(), "method": sc.method,
               "grad_evals": float(sum(r["grad_evals"] for r in rows if r["grad_evals"] == r["grad_evals"])),
               "selected_on": selected_on(sc)}
    atomic_write_json(out / "summary.json", summary)
    return summary


def read_reports(file: Path) -> list[dict]:
    """Every report of every trial from the driver's `reports.jsonl` (trial_id, iteration, metric, grad_evals,
    trial_seconds, timestamp), in time order; a report written by a killed driver and again after the resume
    counts once. What a sweep's best-so-far curve against compute is drawn from (`benchmarks/bench_sweep.py`)."""
    rows: dict[tuple, dict] = {}
    for line in file.read_text().splitlines() if file.is_file() else []:
        r = json.loads(line)
        rows[(r["trial_id"], r["iteration"])] = r
    return sorted(rows.values(), key=lambda r: (r["timestamp"], r["trial_id"], r["iteration"]))


def _plots(rows: list[dict], keys: list[str], metric: str, out: Path) -> None:
    from fipray.report import pyplot, save_figure

    plt = pyplot()
    for k in keys:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        numeric = all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for r in rows)
        cats = sorted({str(r[k]) for r in rows})  # a choice of strings: one x position per value

        def x(r: dict, numeric: bool = numeric, cats: list = cats, k: str = k) -> float:
            return float(r[k]) if numeric else float(cats.index(str(r[k])))

        for status, marker in (("completed", "o"), ("stopped_early", "x"), ("error", "s")):
            sel = [r for r in rows if r["status"] == status]
            if sel:
                ax.scatter([x(r) for r in sel], [r["metric"] for r in sel], marker=marker, label=status)
        if not numeric:
            ax.set_xticks(range(len(cats)), cats)
        vals = [r[k] for r in rows if numeric and r[k] > 0]
        if vals and max(vals) / min(vals) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(f"{metric} (last report)")
        ax.legend(fontsize=8)
        ax.set_title(f"{metric} vs {k}")
        save_figure(fig, out / f"metric_vs_{k}.png")
