"""Your own Tuner over a fipray config: `fipray_trainable(cfg)` is a Ray Tune function trainable.

    from ray import tune
    from fipray.config import load_config
    from fipray.ray.trainable import fipray_trainable, optuna_search

    cfg = load_config("jobs/configs/continual_digits.yaml", ["seeds=[0]"])
    tuner = tune.Tuner(
        fipray_trainable(cfg),                       # or a JobConfig: its sweep section gives the options
        param_space={"path.lam": tune.loguniform(1, 100), "path.lr": tune.loguniform(3e-4, 3e-3)},
        tune_config=tune.TuneConfig(num_samples=8, search_alg=optuna_search(metric="acc_mean", mode="max")))
    best = tuner.fit().get_best_result(metric="acc_mean", mode="max")

The keys of `param_space` are dotted config keys (nested dicts are flattened to them); every value Tune draws
makes the trial's config (`Config.replace`, validated). A trial is the sweep's trial (`fipray sweep`): trained on
the training split less `validation` of it, scored on that held-out part; the test split is never read.

- Operations with path trials (continual, ensemble; `fipray.path_trial`) and `method: fip`: the trial's FIP
  paths advance `interval` path steps per report, each report carrying the operation's metrics, `path_step`,
  the compute so far and the path's lineage, with a checkpoint (the path checkpoints, `trial.json`,
  `lineage.json`). A trial restarted from a checkpoint (a failure, `Tuner.restore`, a PBT exploit) continues
  that path with the config Tune gives it, so PBT and every checkpoint-aware scheduler work.
- Anything else (sparsify, a baseline `method`, `checkpoint=False`): `fipray.units.run_trial`, one report per
  iteration of the operation's trial (a task phase, a seed), without checkpoints.

Each trial runs in its own process (Tune's default: one CPU); wrap it in `tune.with_resources` for more, or a GPU.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import tune

from fipray.config import Config, from_dict
from fipray.job import JobConfig
from fipray.path_trial import PathTrial, lineage_summary, path_trial_operations
from fipray.ray.cluster import worker_device
from fipray.units import run_trial


# The Tune-facing pieces every fipray trial shares (`fipray sweep`'s ASHA and PBT, users' own Tuners). They live
# here, below `fipray.ray.sweep` and `fipray.ray.pbt`, which both import them (sweep.py imports pbt to dispatch:
# pbt importing sweep would be a cycle).
def search_space(search: dict) -> dict:
    """YAML `sweep.search` -> Tune distributions (keys stay dotted config keys)."""
    make = {"uniform": lambda a: tune.uniform(float(a[0]), float(a[1])),
            "loguniform": lambda a: tune.loguniform(float(a[0]), float(a[1])),
            "randint": lambda a: tune.randint(int(a[0]), int(a[1])),
            "choice": lambda a: tune.choice(list(a)),
            "grid": lambda a: tune.grid_search(list(a))}
    return {key: make[next(iter(spec))](next(iter(spec.values()))) for key, spec in search.items()}


def plain(v: Any) -> Any:
    """A NumPy scalar Tune drew as the Python number a config takes."""
    return v.item() if hasattr(v, "item") else v


def trial_config(cfg_dict: dict, params: dict) -> Config:
    """The trial's config; a CUDA device becomes the GPU Ray assigned to this trial's process."""
    import os

    cfg = from_dict(cfg_dict).replace(**{k: plain(v) for k, v in params.items()})
    device = worker_device(cfg.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    return cfg if device == cfg.device else cfg.replace(device=device)


def report_rows(grid: Any, metric: str) -> list[dict]:
    """Every report of every trial (trial_id, iteration, metric, grad_evals, trial_seconds, timestamp), in time
    order, from each result's `metrics_dataframe`: what a sweep's best-so-far curve against compute is drawn from."""
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        if df is None or metric not in df:
            continue
        for rec in df.to_dict("records"):
            rows.append({"trial_id": str(rec.get("trial_id", "")), "iteration": int(rec.get("training_iteration", 0)),
                         "metric": float(rec[metric]),
                         "grad_evals": float(rec.get("grad_evals", float("nan"))),
                         "trial_seconds": float(rec.get("trial_seconds", float("nan"))),
                         "timestamp": float(rec.get("timestamp", float("nan")))})
    rows.sort(key=lambda r: (r["timestamp"], r["trial_id"], r["iteration"]))
    return rows


def selected_on(sc: Any) -> str:
    """The data a sweep's trials were scored on, as its reports say it."""
    v = sc.validation
    part = f"{v:.0%}" if v < 1 else f"{int(v)} examples"
    return (f"validation: {part} of the training split held out (stratified, seed {sc.validation_seed}), the same "
            f"for every trial and method; trials train on the rest; the test split is not read")


def _flat(params: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def path_trial_report(trial: PathTrial, metrics: dict) -> dict:
    """What a path trial reports: its metrics, where its path came from (`parent`, `forked_at`, `forks`) and its
    lineage as a JSON string."""
    return {**metrics, **lineage_summary(trial.lineage), "lineage": json.dumps(trial.lineage)}


def run_path_trial(config: dict, cfg_dict: dict, options: dict, interval: int) -> None:
    """The body of a path-trial Tune trial: restore from Tune's checkpoint if there is one, then advance the
    path `interval` steps per report (each with a checkpoint) to its end."""
    from ray.tune import Checkpoint

    params = _flat(config)
    cfg = trial_config(cfg_dict, params)
    trial_id = tune.get_context().get_trial_id() or "trial"
    work = Path(tempfile.mkdtemp(prefix="fipray-trial-"))
    try:
        trial = PathTrial(cfg, work / "path", trial_id=trial_id, params=params, **options)
        restored = tune.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                trial.restore(d)
            trial.set_params(params)  # an exploit's new values (none on a plain restart)
        while not trial.done:
            m = trial.advance(interval)
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                trial.save(tmp)
                tune.report(path_trial_report(trial, m), checkpoint=Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_plain_trial(config: dict, cfg_dict: dict, options: dict) -> None:
    """The body of a trial without checkpoints: the operation's sweep trial (`fipray.units.run_trial`)."""
    run_trial(trial_config(cfg_dict, _flat(config)), tune.report, **options)


def fipray_trainable(cfg: Config | JobConfig, *, interval: int | None = None, checkpoint: bool = True,
                     **options: Any) -> Callable[[dict], None]:
    """A Tune function trainable running `cfg`'s sweep trial for the values Tune draws (dotted config keys).

    Args:
        cfg: a core `Config`, or a `JobConfig` (a YAML file with a `sweep:` section) whose sweep options
            (method, validation, validation_seed, eps, target) and `perturbation_interval` are the defaults.
        interval: path steps between reports of a path trial (default: the job's `sweep.perturbation_interval`,
            else `path.steps`).
        checkpoint: False runs the plain sweep trial even where a path trial could run.
        options: the trial options (`SweepConfig.options()`): method ("fip" or a baseline), validation (the
            held-out fraction or count the trial scores on), validation_seed, eps (ensemble), target (sparsify).

    Returns:
        `trainable(config)`, for `tune.Tuner(trainable, param_space=...)`; it reports the operation's metrics
        (`fipray.operation.Operation.metrics`, e.g. acc_mean for continual) every iteration.
    """
    if isinstance(cfg, JobConfig):
        options = {**cfg.sweep.options(), **options}
        interval = interval or cfg.sweep.perturbation_interval
        cfg = cfg.cfg
    opts = {"method": "fip", **options}
    cfg_dict = cfg.to_dict()
    steps = int(interval or cfg.path.steps)
    if steps < 1:
        raise ValueError(f"interval must be a positive number of path steps, got {interval}")
    paths = checkpoint and opts["method"] == "fip" and cfg.operation in path_trial_operations()

    def trainable(config: dict) -> None:
        if paths:
            run_path_trial(config, cfg_dict, opts, steps)
        else:
            run_plain_trial(config, cfg_dict, opts)

    trainable.__name__ = f"fipray_{cfg.operation}"
    trainable.__qualname__ = trainable.__name__
    return trainable


def optuna_search(**kwargs: Any) -> Any:
    """`ray.tune.search.optuna.OptunaSearch(**kwargs)` (e.g. metric="acc_mean", mode="max", seed=0).

    Optuna is fipray's optional extra `optuna` (`pip install 'fipray[optuna]'`); without it this raises an
    ImportError saying so."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ImportError("optuna_search needs Optuna, fipray's optional extra 'optuna': "
                          "pip install 'fipray[optuna]'") from None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(**kwargs)
