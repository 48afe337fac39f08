"""One FIP path of `fipray paths`, without Ray: the shared base network w0 and path k from it.

Path k of a run starts at the shared base network w0 (trained once with seed s = seeds[0], exactly as
the core experiment trains it) and follows the core's phases with seed s + k: its own minibatch
order, replay memory (continual), random kicks (undirected walk). Path 0 is therefore the core
experiment's FIP path for seed s. Which phases run, per operation:

- continual: the FIP phases of tasks 1..T-1 (paper Algorithm 1);
- sparsify: the two phases to the largest of `sparsify.targets` (Algorithm 2);
- ensemble / undirected: the undirected walk, sampling every `ensemble.sample_every` steps (Algorithm 3).

Everything a path leaves behind lives in its own folder (`checkpoint.pt` from the core loop, then
`final.safetensors`, `samples.safetensors`, `records.parquet`, `result.json`), so a killed path that
is started again resumes from its checkpoint, and the Ray driver merges folders, never processes.
With `world > 1` (DDP ranks of a Train path) rank r trains on its own shard of the data and the
gradients are averaged, so the effective batch is `world` times larger.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fipray._io import atomic_write, atomic_write_json, write_parquet
from fipray.config import Config
from fipray.path import PathResult, Phase, run_path

BASE_DIR = "base"
BASE_FILE = "model.safetensors"


def path_seed(cfg: Config, k: int) -> int:
    return int(cfg.seeds[0]) + k


def path_steps(cfg: Config) -> int:
    """Optimizer steps of one path (for progress displays)."""
    if cfg.operation == "continual":
        return (cfg.continual.num_tasks - 1) * cfg.path.steps
    if cfg.operation == "sparsify":
        return cfg.path.steps + cfg.sparsify.invariance_steps
    return cfg.path.steps


def _save_state(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _strip(state: dict) -> dict:
    # DDP-wrapped models name their tensors "module.<name>".
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


@dataclass
class _Setting:
    """Data a path needs, on its device."""

    spec: dict
    tasks: Any = None  # continual: list[TaskTensors]
    xtr: Any = None
    ytr: Any = None
    xte: Any = None
    yte: Any = None


def _setting(cfg: Config, seed: int, device: torch.device) -> _Setting:
    from fipray.experiments._common import load_bundle, model_spec, tensors

    bundle = load_bundle(cfg)
    s = _Setting(model_spec(cfg, bundle))
    if cfg.operation == "continual":
        from fipray.experiments.continual import build_tasks

        s.tasks = build_tasks(cfg, bundle, device, seed)
    else:
        s.xtr, s.ytr = tensors(bundle.train, device)
        s.xte, s.yte = tensors(bundle.test, device)
    return s


def base_path(out: str | Path) -> Path:
    return Path(out) / BASE_DIR / BASE_FILE


def train_shared_base(cfg: Config, out: str | Path, device: str | torch.device = "cpu") -> Path:
    """Train w0 with seed seeds[0] (as the core experiment does) into `out/base/`, once."""
    from fipray.experiments._common import build_model, train_base

    target = base_path(out)
    if target.is_file():
        return target
    dev = torch.device(device)
    seed = int(cfg.seeds[0])
    s = _setting(cfg, seed, dev)
    model = build_model(s.spec, seed, dev)
    if cfg.operation == "continual":
        train_base(model, s.tasks[0].x_train, s.tasks[0].y_train, cfg, seed)
    else:
        train_base(model, s.xtr, s.ytr, cfg, seed)
    _save_state(target, model.state_dict(), {"seed": str(seed), "config_hash": cfg.run_id()})
    atomic_write_json(target.parent / "spec.json", s.spec)
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
               rank: int = 0, world: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None) -> PathJob:
    """Path k: the shared w0 loaded from `base_file`, the operation's phases with seed seeds[0] + k."""
    from fipray.core.distances import get_distance
    from fipray.experiments._common import accuracy, build_model

    dev = torch.device(device)
    seed = path_seed(cfg, k)
    s = _setting(cfg, seed, dev)
    model = build_model(s.spec, seed, dev)
    model.load_state_dict(_load_state(Path(base_file)))
    if wrap is not None:
        model = wrap(model)
    common = dict(record_every=cfg.path.record_every, checkpoint_every=cfg.path.checkpoint_every,
                  distance=get_distance(cfg.path.distance))
    if cfg.operation == "continual":
        from fipray.ops.continual import accuracy_along_path, fip_continual_phases

        tasks = s.tasks
        if world > 1:  # each rank its own shard of the new tasks' data
            tasks = [dataclasses.replace(t, x_train=t.x_train[rank::world], y_train=t.y_train[rank::world])
                     for t in tasks]
        phases = fip_continual_phases(tasks, cfg, seed)
        heldout = torch.cat([t.x_test for t in s.tasks])[: cfg.path.heldout]
        kwargs = dict(common, heldout=heldout, evaluate=accuracy_along_path(s.tasks))
    elif cfg.operation == "sparsify":
        from fipray.core.step import Anchor
        from fipray.eval.sparsity import sparsity
        from fipray.ops.sparsify import counted, fip_sparsify_phases

        xs = s.xtr[rank::world]
        names = counted(model, cfg.sparsify.exclude_head)  # names as the (possibly wrapped) model has them
        anchor = Anchor.from_model(model, xs)
        p = max(cfg.sparsify.targets)
        phases = fip_sparsify_phases(xs, anchor, p, cfg, seed, names)
        xte, yte = s.xte, s.yte
        kwargs = dict(common, heldout=xte[: cfg.path.heldout],
                      evaluate=lambda m: {"accuracy": accuracy(m, xte, yte), "sparsity": sparsity(m, names)})
    else:
        from fipray.ops.undirected import undirected_phase

        phases = [undirected_phase(s.xtr[rank::world], s.ytr[rank::world], cfg, seed)]
        xte, yte = s.xte, s.yte
        kwargs = dict(common, heldout=xte[: cfg.path.heldout], evaluate=lambda m: {"accuracy": accuracy(m, xte, yte)})
    return PathJob(model, phases, kwargs, s.spec, seed)


def write_path_outputs(path_dir: str | Path, k: int, job: PathJob, res: PathResult, extra: dict | None = None) -> dict:
    """final.safetensors, samples.safetensors, records.parquet, result.json of a finished path."""
    d = Path(path_dir)
    final = _strip(_unwrap(res.model).state_dict())
    _save_state(d / "final.safetensors", final)
    samples = [{"phase": s["phase"], "step": s["step"], "global_step": s["global_step"]} for s in res.samples]
    if res.samples:
        _save_state(d / "samples.safetensors",
                    {f"s{i}.{n}": t for i, s in enumerate(res.samples) for n, t in _strip(s["state"]).items()})
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


def load_samples(path_dir: str | Path, n: int) -> list[dict[str, torch.Tensor]]:
    """The n sampled state dicts of a finished path, in sampling order."""
    if n == 0:
        return []
    flat = _load_state(Path(path_dir) / "samples.safetensors")
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in flat.items():
        head, _, name = key.partition(".")
        out[int(head[1:])][name] = t
    return out


def load_final(path_dir: str | Path) -> dict[str, torch.Tensor]:
    return _load_state(Path(path_dir) / "final.safetensors")
