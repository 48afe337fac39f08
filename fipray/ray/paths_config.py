"""The Ray sections of a fipray YAML file: `ray:` (how paths run) and `sweep:` (what Tune searches).

A fipray YAML file is a core `fipray.config.Config` plus, optionally, these two sections. They are
split off here, so the core config stays exactly what `fipray continual|sparsify|ensemble` accepts and
the same file runs on a laptop and on a cluster. Overrides address them as `ray.backend=train`,
`sweep.num_samples=4`; every other key goes to the core config. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fipray.config import (
    Config,
    ConfigError,
    _build,
    _expand,
    _merge,
    from_dict,
    parse_override,
    read_yaml_mapping,
)

BACKENDS = ("worker", "train")
TRAINABLES = ("function", "train")
MODES = ("max", "min")
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint", "grid")


@dataclass(frozen=True)
class RayConfig:
    """How `fipray paths` (and TorchTrainer sweep trials) run on Ray.

    `backend: worker` runs each path's core loop in one Ray worker process (cheap; right for CPUs and
    small models). `backend: train` runs each path as its own Ray Train `TorchTrainer` with
    `workers_per_path` DDP ranks. Either way each path is its own unit of scheduling and failure.
    """

    backend: str = "worker"
    num_paths: int = 1
    cpus_per_path: float = 1.0  # per DDP rank with backend: train
    gpus_per_path: float = 0.0  # per DDP rank with backend: train; > 0 also sets use_gpu
    workers_per_path: int = 1  # DDP ranks of one path (backend: train only)
    max_failures: int = 3  # restarts of one path after its process dies
    storage_path: str = ""  # "" : <out>/storage; any local/shared folder (Train also takes s3://, gs://)
    report_every_s: float = 2.0  # paths push their record rows to the driver at most this often


@dataclass(frozen=True)
class SweepConfig:
    """What `fipray sweep` searches and how (Ray Tune with ASHA)."""

    metric: str = ""  # "" : the operation's default (continual acc_mean, sparsify accuracy, ensemble whitebox)
    mode: str = "max"
    num_samples: int = 8
    max_concurrent_trials: int = 2
    search: dict = field(default_factory=dict)  # {"path.lam": {"loguniform": [1, 100]}, ...}
    grace_period: int = 1  # ASHA: iterations every trial gets before it may be stopped
    reduction_factor: int = 3
    trainable: str = "function"  # "train": each trial runs as a TorchTrainer (ray.workers_per_path ranks)
    include_base_config: bool = False  # also evaluate the file's own values as the first trial
    search_seed: int = 0
    eps: float = 0.0  # ensemble metrics: the ε of the white-box accuracy (0: the largest of ensemble.eps)
    target: float = 0.0  # sparsify metrics: the sparsity target (0: the largest of sparsify.targets)
    name: str = "sweep"


@dataclass(frozen=True)
class JobConfig:
    """A core config plus its Ray sections."""

    cfg: Config
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict:
        return {**self.cfg.to_dict(), "ray": dataclasses.asdict(self.ray),
                "sweep": dataclasses.asdict(self.sweep)}


# Metrics each operation's sweep trials report (sweep_trial.py); a sweep naming another fails at once.
METRICS = {
    "continual": ("acc_mean", "task_acc_mean", "bwt_mean"),
    "sparsify": ("accuracy", "sparsity"),
    "ensemble": ("whitebox", "clean", "transfer"),
    "undirected": ("whitebox", "clean", "transfer"),
}
DEFAULT_METRIC = {"continual": "acc_mean", "sparsify": "accuracy", "ensemble": "whitebox",
                  "undirected": "whitebox"}


def _validate_ray(rc: RayConfig) -> None:
    if rc.backend not in BACKENDS:
        raise ConfigError(f"config key 'ray.backend': {rc.backend!r} is not one of {', '.join(BACKENDS)}")
    if rc.num_paths < 1:
        raise ConfigError(f"number of paths (ray.num_paths / --num-paths) must be >= 1, got {rc.num_paths}")
    if rc.workers_per_path < 1:
        raise ConfigError(f"config key 'ray.workers_per_path' must be >= 1, got {rc.workers_per_path}")
    if rc.workers_per_path > 1 and rc.backend != "train":
        raise ConfigError("config key 'ray.workers_per_path' > 1 needs ray.backend: train (DDP ranks)")
    if not rc.cpus_per_path > 0 or not rc.gpus_per_path >= 0:
        raise ConfigError("config keys 'ray.cpus_per_path' must be > 0 and 'ray.gpus_per_path' >= 0")
    if rc.max_failures < 0 or not rc.report_every_s >= 0:
        raise ConfigError("config keys 'ray.max_failures' and 'ray.report_every_s' must be >= 0")


def _validate_sweep(sc: SweepConfig, cfg: Config) -> None:
    metrics = METRICS[cfg.operation]
    if sc.metric and sc.metric not in metrics:
        raise ConfigError(f"config key 'sweep.metric': {cfg.operation} trials never report {sc.metric!r}; "
                          f"they report {', '.join(metrics)}")
    if sc.mode not in MODES:
        raise ConfigError(f"config key 'sweep.mode': {sc.mode!r} is not one of {', '.join(MODES)}")
    if sc.trainable not in TRAINABLES:
        raise ConfigError(f"config key 'sweep.trainable': {sc.trainable!r} is not one of {', '.join(TRAINABLES)}")
    for k, v in {"sweep.num_samples": sc.num_samples, "sweep.max_concurrent_trials": sc.max_concurrent_trials,
                 "sweep.grace_period": sc.grace_period}.items():
        if v < 1:
            raise ConfigError(f"config key {k!r} must be >= 1, got {v}")
    if sc.reduction_factor < 2:
        raise ConfigError(f"config key 'sweep.reduction_factor' must be >= 2, got {sc.reduction_factor}")
    plain = cfg.to_dict()
    for key, spec in sc.search.items():
        node: Any = plain
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"config key 'sweep.search': {key!r} is not a config field")
            node = node[part]
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"config key 'sweep.search.{key}': expected one of "
                              f"{{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
        dist, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"config key 'sweep.search.{key}.{dist}': expected a list, got {args!r}")
        if dist in ("uniform", "loguniform", "randint") and len(args) != 2:
            raise ConfigError(f"config key 'sweep.search.{key}.{dist}': expected [low, high], got {args!r}")
        if dist == "loguniform" and not (0 < float(args[0]) < float(args[1])):
            raise ConfigError(f"config key 'sweep.search.{key}.loguniform': need 0 < low < high, got {args!r}")
        # Every value the search may draw must make a valid config (fails here, not in trial 7).
        for probe in (args if dist in ("choice", "grid") else [args[0], args[1]]):
            try:
                cfg.replace(**{key: float(probe) if dist in ("uniform", "loguniform") else probe})
            except ConfigError as e:
                raise ConfigError(f"config key 'sweep.search.{key}': value {probe!r} is invalid: {e}") from None


def job_from_dict(data: dict, overrides: dict | None = None) -> JobConfig:
    """Split a mapping into the core config and the `ray` / `sweep` sections, validate all three."""
    data = _merge(dict(data or {}), _expand(overrides or {}))
    ray_part = data.pop("ray", {}) or {}
    sweep_part = data.pop("sweep", {}) or {}
    cfg = from_dict(data)
    rc = _build(RayConfig, ray_part, "ray.")
    if cfg.device.startswith("cuda") and rc.gpus_per_path == 0:
        rc = dataclasses.replace(rc, gpus_per_path=1.0)  # a CUDA config asks Ray for a GPU per path (rank)
    sc = _build(SweepConfig, sweep_part, "sweep.")
    _validate_ray(rc)
    _validate_sweep(sc, cfg)
    return JobConfig(cfg, rc, sc)


def load_job(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a YAML file holding a core config and optional `ray:` / `sweep:` sections."""
    return job_from_dict(read_yaml_mapping(path), dict(parse_override(o) for o in overrides))


def sweep_metric(job: JobConfig) -> str:
    return job.sweep.metric or DEFAULT_METRIC[job.cfg.operation]


# `--smoke-test` of jobs/paths.py and jobs/sweep.py: the same code path in seconds (tiny steps, one seed).
SMOKE = {
    "continual": ["seeds=[0]", "train.steps=40", "path.steps=20", "path.record_every=10", "path.checkpoint_every=20"],
    "sparsify": ["seeds=[0]", "train.steps=40", "path.steps=30", "sparsify.invariance_steps=10",
                 "path.record_every=10", "path.checkpoint_every=20"],
    "ensemble": ["seeds=[0]", "train.steps=40", "path.steps=40", "ensemble.members=2", "ensemble.sample_every=20",
                 "ensemble.pgd_steps=2", "ensemble.eval_examples=50", "path.record_every=20",
                 "path.checkpoint_every=20"],
}
SMOKE["undirected"] = SMOKE["ensemble"]
SMOKE_SWEEP = ["sweep.num_samples=2", "sweep.grace_period=1", "sweep.max_concurrent_trials=1"]
SMOKE_PATHS = ["ray.num_paths=2"]


def smoke_overrides(path: str | Path | None, sweep: bool) -> list[str]:
    """The overrides `--smoke-test` adds for the file's operation."""
    op = load_job(path).cfg.operation
    return SMOKE[op] + (SMOKE_SWEEP if sweep else SMOKE_PATHS)
