"""The units Ray runs, without Ray: one FIP path of `fipray paths`, and one trial of `fipray sweep`.

Both dispatch to the operation (`fipray.operation`): any registered operation with FIP paths
(`supports_paths`) runs as paths, any with a `trial` as sweep trials; nothing here names one.

FIP paths: the shared base network w0 and path k from it.

Path k of a run starts at the shared base network w0 (trained once with seed s = seeds[0], exactly as
the core experiment trains it) and follows the core's phases with seed s + k: its own minibatch
order, replay memory (continual), random kicks (undirected walk). Path 0 is therefore the core
experiment's FIP path for seed s. Which phases run is the operation's `path` (e.g. continual: the
FIP phases of tasks 1..T-1; sparsify: the two phases to the largest target; ensemble: the walk).

Everything a path leaves behind lives in its own folder (`checkpoint.pt` from the core loop, then
`final.safetensors`, `samples/s<i>.safetensors`, `records.parquet`, `result.json`), so a killed path that
is started again resumes from its checkpoint, and the Ray driver merges folders, never processes.
With `world > 1` (DDP ranks of a Train path) rank r trains on its own shard of the data and the
gradients are averaged, so the effective batch is `world` times larger.

Sweep trials: `run_trial(cfg, report)` runs exactly one method of the operation's experiment (FIP, or a
baseline with `method=`; same base network, phases and seeds) on the training split less a held-out
validation part, which it scores on (the test split is never read), calling `report(metrics)` once per
iteration (Tune's training iteration; ASHA stops trials at iterations), each metric a running mean
over the work done so far; `trial_iterations(cfg)` says how many reports a full trial makes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fipray.atomic import atomic_write, atomic_write_json, write_parquet
from fipray.config import Config, ConfigError
from fipray.models import load_state_dict_file
from fipray.operation import Operation, Report, check_trial_method, get_operation, operation_classes
from fipray.path import PathResult, Phase, run_path

BASE_DIR = "base"
BASE_FILE = "model.safetensors"


def path_seed(cfg: Config, k: int) -> int:
    return int(cfg.seeds[0]) + k


def path_operation(cfg: Config) -> Operation:
    """The config's operation, which must run as FIP paths (a ConfigError names the ones that do)."""
    op = get_operation(cfg.operation)
    if not op.supports_paths:
        able = [n for n, cls in operation_classes().items() if cls.supports_paths]
        raise ConfigError(f"config key 'operation': {cfg.operation!r} has no FIP paths to run; operations with "
                          f"paths: {', '.join(able)}")
    return op


def path_steps(cfg: Config) -> int:
    """Optimizer steps of one path (for progress displays)."""
    return get_operation(cfg.operation).path_steps(cfg)


def _save_state(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _strip(state: dict) -> dict:
    # DDP-wrapped models name their tensors "module.<name>".
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def base_path(out: str | Path) -> Path:
    return Path(out) / BASE_DIR / BASE_FILE


def train_shared_base(cfg: Config, out: str | Path, device: str | torch.device = "cpu", bundle: Any = None) -> Path:
    """Train w0 with seed seeds[0] (as the core experiment does) into `out/base/`, once (`bundle`: ready data,
    e.g. `data.engine: ray`'s; None: `cfg.data`)."""
    target = base_path(out)
    if target.is_file():
        return target
    op = path_operation(cfg)
    seed = int(cfg.seeds[0])
    ctx = op.context(cfg, device=device, bundle=bundle)
    model = ctx.model(seed)
    op.train_base(ctx, model, seed)
    _save_state(target, model.state_dict(), {"seed": str(seed), "config_hash": cfg.run_id()})
    atomic_write_json(target.parent / "spec.json", ctx.spec)
    return target


@dataclass
class PathJob:
    """Everything `run_path` needs for path k, built from the config alone."""

    model: nn.Module
    phases: list[Phase]
    kwargs: dict
    spec: dict
    seed: int


def build_path(cfg: Config, k: int, base_file: str | Path, *, device: str | torch.device = "cpu",
               rank: int = 0, world: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None,
               bundle: Any = None) -> PathJob:
    """Path k: the shared w0 loaded from `base_file`, the operation's phases with seed seeds[0] + k (`bundle`:
    ready data, e.g. `data.engine: ray`'s; None: `cfg.data`)."""
    op = path_operation(cfg)
    seed = path_seed(cfg, k)
    ctx = op.context(cfg, device=device, bundle=bundle)
    model = ctx.model(seed)
    model.load_state_dict(load_state_dict_file(Path(base_file)))
    if wrap is not None:
        model = wrap(model)
    phases, extra = op.path(ctx, model, seed, rank=rank, world=world)
    kwargs = {**ctx.path_kwargs(), "progress": None, **extra}
    return PathJob(model, phases, kwargs, ctx.spec, seed)


def write_path_outputs(path_dir: str | Path, k: int, job: PathJob, res: PathResult, extra: dict | None = None) -> dict:
    """final.safetensors, samples/s<i>.safetensors, records.parquet, result.json of a finished path."""
    d = Path(path_dir)
    final = _strip(_unwrap(res.model).state_dict())
    _save_state(d / "final.safetensors", final)
    samples = []
    for i, s in enumerate(res.samples):
        rec = {"phase": s["phase"], "step": s["step"], "global_step": s["global_step"], "file": s.get("file")}
        if res.out_dir is None or res.out_dir.resolve() != d.resolve() or "file" not in s:
            # The path ran elsewhere (a Train rank's private folder) or in memory: copy, one network at a time.
            rec["file"] = f"samples/s{i}.safetensors"
            _save_state(d / rec["file"], _strip(res.sample_state(i)))
        samples.append(rec)
    rows = [{"path": k, "seed": job.seed, **r} for r in res.records]
    if rows:
        write_parquet(d / "records.parquet", rows)
    result = {"path": k, "seed": job.seed, "steps": res.steps, "seconds": res.seconds,
              "resumed_from": res.resumed_from, "phase_results": res.phase_results, "samples": samples,
              "records": len(rows), "final": rows[-1] if rows else {}, **(extra or {})}
    atomic_write_json(d / "result.json", result)
    return result


def run_one_path(cfg: Config, k: int, base_file: str | Path, path_dir: str | Path, *,
                 callback: Callable[[str, dict], None] | None = None, device: str | torch.device = "cpu",
                 extra: dict | None = None) -> dict:
    """Run (or resume) path k into `path_dir` and write its outputs; returns result.json's content."""
    job = build_path(cfg, k, base_file, device=device)
    res = run_path(job.model, job.phases, out_dir=path_dir, callback=callback, **job.kwargs)
    return write_path_outputs(path_dir, k, job, res, extra)


def load_path_result(path_dir: str | Path) -> dict:
    return json.loads((Path(path_dir) / "result.json").read_text())


def load_samples(path_dir: str | Path) -> list[dict[str, torch.Tensor]]:
    """The sampled state dicts of a finished path, in sampling order (names without a DDP prefix)."""
    result = load_path_result(path_dir)
    return [_strip(load_state_dict_file(Path(path_dir) / s["file"])) for s in result["samples"]]


def load_final(path_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_state_dict_file(Path(path_dir) / "final.safetensors")


# Sweep trials -----------------------------------------------------------------------------------------
def trial_iterations(cfg: Config) -> int:
    """How many reports a full trial makes (ASHA's max_t)."""
    return get_operation(cfg.operation).trial_iterations(cfg)


def trial_context(cfg: Config, *, validation: float = 0.2, validation_seed: int = 0, bundle: Any = None,
                  **kwargs: Any) -> Any:
    """The run context a sweep trial works in: the operation's own, with `validation` of the training split
    held out as its test split (`Operation.validation_context`). The test split is never read."""
    op = get_operation(cfg.operation)
    ctx = op.context(cfg, bundle=bundle, **kwargs)
    try:
        return op.validation_context(ctx, validation, validation_seed)
    except ValueError as e:
        raise ConfigError(f"config key 'sweep.validation': {e}") from None


def run_trial(cfg: Config, report: Report, *, method: str = "fip", validation: float = 0.2,
              validation_seed: int = 0, bundle: Any = None, **options: Any) -> None:
    """One sweep trial: the operation's `method` (FIP or a baseline) over `cfg.seeds`, trained on the training
    split less its held-out part and scored on that part (`trial_context`), reporting once per iteration.
    Every report carries the compute spent so far: `grad_evals` (optimizer steps of any phase, base
    network included) and `trial_seconds`.

    Args:
        method: `sweep.method` (one of the operation's `trial_methods`).
        validation, validation_seed: `sweep.validation` and `sweep.validation_seed`.
        bundle: the data (None: `cfg.data`), e.g. a user's DataBundle.
        options: the sweep's operation options (`sweep.eps`, `sweep.target`); each operation reads
            the ones it knows.
    """
    from fipray.eval.compute import StepCounter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    op = get_operation(cfg.operation)
    check_trial_method(op, cfg, method)
    ctx = trial_context(cfg, validation=validation, validation_seed=validation_seed, bundle=bundle)
    with StepCounter() as counter:
        op.trial(ctx, lambda m: report({**m, **counter.metrics()}), method=method, **options)


def run_test(cfg: Config, *, method: str = "fip", bundle: Any = None, **options: Any) -> dict:
    """A chosen config measured on the test split: the operation's `method` trained on the whole training split
    (no held-out part) over `cfg.seeds` and scored on the test split, as the trial scores on validation.
    Returns the last report (the means over the seeds, with `grad_evals` and `trial_seconds`). Only
    `fipray sweep --compare` calls this, after selection."""
    from fipray.eval.compute import StepCounter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    op = get_operation(cfg.operation)
    check_trial_method(op, cfg, method)
    reports: list[dict] = []
    with StepCounter() as counter:
        op.trial(op.context(cfg, bundle=bundle), lambda m: reports.append({**m, **counter.metrics()}),
                 method=method, **{k: v for k, v in options.items() if k not in ("validation", "validation_seed")})
    if not reports:
        raise RuntimeError(f"the {cfg.operation} trial of {method!r} reported nothing")
    return reports[-1]
