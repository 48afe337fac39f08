"""The Ray sections of a fipray YAML file: `ray:` (how paths run) and `sweep:` (what Tune searches).

A fipray YAML file is a core `fipray.config.Config` plus, optionally, these two sections. They are
split off here, so the core config stays exactly what `fipray <operation>` accepts and the same file
runs on a laptop and on a cluster. Overrides address them as `ray.backend=train`,
`sweep.num_samples=4`; every other key goes to the core config. Both are built and validated by the
same code as every other section (`fipray.config.build_section`): ranges and choices sit next to the
fields. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fipray.config import (
    Config,
    ConfigError,
    build_section,
    expand,
    from_dict,
    knob,
    merge,
    parse_override,
    read_yaml_mapping,
)
from fipray.operation import check_trial_method, get_operation
from fipray.uri import SCHEMES as STORAGE_SCHEMES  # what fipray.ray.storage opens (pyarrow.fs, fipray.uri)

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint", "grid")


@dataclass(frozen=True)
class RayConfig:
    """How `fipray paths` (and TorchTrainer sweep trials) run on Ray.

    `backend: worker` runs each path's core loop in one Ray worker process (cheap; right for CPUs and
    small models). `backend: train` runs each path as its own Ray Train `TorchTrainer` with
    `workers_per_path` DDP ranks. Either way each path is its own unit of scheduling and failure.
    """

    backend: str = knob("worker", choices=("worker", "train"))
    num_paths: int = knob(1, ge=1)
    cpus_per_path: float = knob(1.0, gt=0)  # per DDP rank with backend: train
    # Per path (per DDP rank with backend: train; per trial in a sweep); fractional packs several on one
    # GPU (0.25: four per GPU). > 0 also sets use_gpu; the device is the GPU Ray assigned, never cuda:0.
    gpus_per_path: float = knob(0.0, ge=0)
    workers_per_path: int = knob(1, ge=1)  # ranks of one path (backend: train only)
    # How those ranks share a path (backend: train): ddp, each rank its own data shard (an effective batch
    # workers_per_path times larger); fsdp, the network's parameters sharded over the ranks (FSDP2) and
    # every rank on the path's own batches, so the path is the unsharded one, for networks larger than a device.
    parallel: str = knob("ddp", choices=("ddp", "fsdp"))
    max_failures: int = knob(3, ge=0)  # restarts of one path after its process dies
    # "" : <out>/storage (paths), <out> (sweeps). A folder every node sees, or a URI through pyarrow.fs:
    # s3://bucket/prefix, gs://bucket/prefix, file:///folder; options in the query string, as in Ray Train
    # (s3://b/p?endpoint_override=host:port&scheme=http). Checked (credentials, endpoint) before any work.
    storage_path: str = ""
    report_every_s: float = knob(2.0, ge=0)  # paths push their record rows to the driver at most this often

    def check(self) -> None:
        if self.workers_per_path > 1 and self.backend != "train":
            raise ConfigError("config key 'ray.workers_per_path' > 1 needs ray.backend: train (DDP ranks)")
        if self.parallel == "fsdp" and self.backend != "train":
            raise ConfigError("config key 'ray.parallel': fsdp needs ray.backend: train (ranks of a TorchTrainer)")
        scheme = self.storage_path.split("://", 1)[0].lower() if "://" in self.storage_path else ""
        if scheme and scheme not in STORAGE_SCHEMES:
            raise ConfigError(f"config key 'ray.storage_path': scheme {scheme!r} is not one of "
                              f"{', '.join(s + '://' for s in STORAGE_SCHEMES)} (or a folder)")


@dataclass(frozen=True)
class SweepConfig:
    """What `fipray sweep` searches and how (Ray Tune with ASHA)."""

    metric: str = ""  # "" : the operation's default (the first of its `metrics`)
    mode: str = knob("max", choices=("max", "min"))
    num_samples: int = knob(8, ge=1)
    max_concurrent_trials: int = knob(2, ge=1)
    search: dict = knob({})  # {"path.lam": {"loguniform": [1, 100]}, ...}
    grace_period: int = knob(1, ge=1)  # ASHA: iterations every trial gets before it may be stopped
    reduction_factor: int = knob(3, ge=2)
    trainable: str = knob("function", choices=("function", "train"))  # train: each trial a TorchTrainer
    include_base_config: bool = False  # also evaluate the file's own values as the first trial
    search_seed: int = 0
    eps: float = knob(0.0, ge=0)  # ensemble metrics: the ε of the white-box accuracy (0: the largest of ensemble.eps)
    target: float = knob(0.0, ge=0, lt=1)  # sparsify metrics: the sparsity target (0: the largest target)
    name: str = "sweep"
    # What each trial runs: "fip", or a baseline of the operation (`Operation.trial_methods`, e.g. derpp, er,
    # ewc, lora_r8), tuned through the same search, budget and scheduler.
    method: str = "fip"
    # The held-out part of the training split every trial trains without and scores on (a fraction < 1, or a
    # count of examples), stratified and fixed by validation_seed: the same for every trial and method. The
    # test split is never read by a sweep (`--compare` reads it only to report the chosen configs).
    validation: float = knob(0.2, gt=0)
    validation_seed: int = 0
    # asha: Tune's ASHA stops weak trials at rungs of iterations; pbt: population-based training along FIP
    # paths (`fipray.ray.pbt`): every `perturbation_interval` path steps the bottom `pbt_quantile` of trials
    # take a top trial's path checkpoint and continue it with perturbed `mutations` (continual, ensemble).
    scheduler: str = knob("asha", choices=("asha", "pbt"))
    perturbation_interval: int = knob(50, ge=1)
    # {"path.lam": [low, high], ...}: the knobs PBT perturbs (x0.8 / x1.2, or resampled) within [low, high];
    # {} : every searched float knob within its search range.
    mutations: dict = knob({})
    pbt_quantile: float = knob(0.25, gt=0, lt=0.51)
    resample_probability: float = knob(0.25, ge=0, lt=1.01)
    # `fipray sweep --compare` (or compare: true): sweep each of `compare_methods` with the same search budget
    # (num_samples, scheduler, seeds), then rerun each method's best config on the test split over
    # `test_seeds` (fipray.ray.compare). `spaces`: {method: {key: distribution}} search per method
    # (default: `search` for every method).
    compare: bool = False
    compare_methods: tuple[str, ...] = ()
    spaces: dict = knob({})
    test_seeds: tuple[int, ...] = knob((0, 1, 2), nonempty=True)

    def options(self) -> dict:
        """What a trial passes on (`fipray.units.run_trial(**options)`)."""
        return {"eps": self.eps, "target": self.target, "method": self.method, "validation": self.validation,
                "validation_seed": self.validation_seed}


@dataclass(frozen=True)
class JobConfig:
    """A core config plus its Ray sections."""

    cfg: Config
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict:
        return {**self.cfg.to_dict(), "ray": dataclasses.asdict(self.ray),
                "sweep": dataclasses.asdict(self.sweep)}


def _validate_sweep(sc: SweepConfig, cfg: Config) -> None:
    metrics = get_operation(cfg.operation).metrics
    if sc.metric and sc.metric not in metrics:
        raise ConfigError(f"config key 'sweep.metric': {cfg.operation} trials never report {sc.metric!r}; "
                          f"they report {', '.join(metrics) or 'nothing (no sweep trial)'}")
    _check_search(sc.search, cfg, "sweep.search")
    op = get_operation(cfg.operation)
    check_trial_method(op, cfg, sc.method)
    if sc.compare and not sc.compare_methods:
        raise ConfigError("config key 'sweep.compare_methods' is empty: `--compare` sweeps each method listed "
                          "there, e.g. [fip, er, derpp]")
    for i, m in enumerate(sc.compare_methods):
        check_trial_method(op, cfg, m, f"sweep.compare_methods[{i}]")
    if len(set(sc.compare_methods)) != len(sc.compare_methods):
        raise ConfigError(f"config key 'sweep.compare_methods' names a method twice: {list(sc.compare_methods)}")
    for m, space in sc.spaces.items():
        if m not in sc.compare_methods:
            raise ConfigError(f"config key 'sweep.spaces.{m}': {m!r} is not one of sweep.compare_methods "
                              f"({', '.join(sc.compare_methods) or 'none'})")
        if not isinstance(space, dict) or not space:
            raise ConfigError(f"config key 'sweep.spaces.{m}': expected a non-empty mapping of config keys to "
                              f"distributions, got {space!r}")
        _check_search(space, cfg, f"sweep.spaces.{m}")
    if sc.validation >= 1 and sc.validation != int(sc.validation):
        raise ConfigError(f"config key 'sweep.validation' = {sc.validation}: a fraction below 1, or a whole "
                          f"number of examples")


def _check_search(search: dict, cfg: Config, where: str) -> None:
    plain = cfg.to_dict()
    for key, spec in search.items():
        node: Any = plain
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"config key '{where}': {key!r} is not a config field")
            node = node[part]
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"config key '{where}.{key}': expected one of "
                              f"{{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
        dist, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"config key '{where}.{key}.{dist}': expected a list, got {args!r}")
        if dist in ("uniform", "loguniform", "randint") and len(args) != 2:
            raise ConfigError(f"config key '{where}.{key}.{dist}': expected [low, high], got {args!r}")
        if dist == "loguniform" and not (0 < float(args[0]) < float(args[1])):
            raise ConfigError(f"config key '{where}.{key}.loguniform': need 0 < low < high, got {args!r}")
        # Every value the search may draw must make a valid config (fails here, not in trial 7).
        for probe in (args if dist in ("choice", "grid") else [args[0], args[1]]):
            try:
                cfg.replace(**{key: float(probe) if dist in ("uniform", "loguniform") else probe})
            except ConfigError as e:
                raise ConfigError(f"config key '{where}.{key}': value {probe!r} is invalid: {e}") from None



def job_from_dict(data: dict, overrides: dict | None = None) -> JobConfig:
    """Split a mapping into the core config and the `ray` / `sweep` sections, validate all three."""
    data = merge(dict(data or {}), expand(overrides or {}))
    ray_part = data.pop("ray", {}) or {}
    sweep_part = data.pop("sweep", {}) or {}
    cfg = from_dict(data)
    rc = build_section(RayConfig, ray_part, "ray.")
    if cfg.device.startswith("cuda") and rc.gpus_per_path == 0:
        rc = dataclasses.replace(rc, gpus_per_path=1.0)  # a CUDA config asks Ray for a GPU per path (rank)
    rc.check()
    sc = build_section(SweepConfig, sweep_part, "sweep.")
    _validate_sweep(sc, cfg)
    return JobConfig(cfg, rc, sc)


def load_job(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a YAML file holding a core config and optional `ray:` / `sweep:` sections."""
    return job_from_dict(read_yaml_mapping(path), dict(parse_override(o) for o in overrides))


def sweep_metric(job: JobConfig) -> str:
    metrics = get_operation(job.cfg.operation).metrics
    if not job.sweep.metric and not metrics:
        raise ConfigError(f"operation {job.cfg.operation!r} has no sweep trial")
    return job.sweep.metric or metrics[0]


# `--smoke-test` of `fipray paths|sweep` and their jobs: the operation's own smoke overrides, plus these.
SMOKE_SWEEP = ("sweep.num_samples=2", "sweep.grace_period=1", "sweep.max_concurrent_trials=1", "sweep.perturbation_interval=10")
SMOKE_PATHS = ("ray.num_paths=2",)


def smoke_overrides(operation: str, sweep: bool) -> list[str]:
    """The overrides `--smoke-test` adds for an operation's paths or sweep."""
    return [*get_operation(operation).smoke, *(SMOKE_SWEEP if sweep else SMOKE_PATHS)]
