"""Shared plumbing of the experiments: data, models, base training, output folder, progress."""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fipray._io import atomic_write_json, atomic_write_text, write_parquet
from fipray.config import Config, ConfigError, save_config
from fipray.ops._common import supervised_phase
from fipray.path import PathResult, run_path


def device_of(cfg: Config) -> torch.device:
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {cfg.device!r} requested but CUDA is not available")
    return dev


def load_bundle(cfg: Config):
    from fipray.data import get_data

    try:
        return get_data(cfg.data.name, **cfg.data.kwargs)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"config section 'data': {e.args[0] if e.args else e}") from None


def model_spec(cfg: Config, bundle: Any) -> dict:
    return {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs),
            "num_classes": int(bundle.num_classes), "input_shape": list(bundle.input_shape)}


def build_model(spec: dict, seed: int, device: torch.device) -> nn.Module:
    """A fresh network; its initialisation depends only on `seed` (global RNG untouched)."""
    from fipray.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = create_model(spec["name"], num_classes=spec["num_classes"],
                                 input_shape=tuple(spec["input_shape"]), **spec["kwargs"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config section 'model': {e.args[0] if e.args else e}") from None
    return model.to(device)


def tensors(ds: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    from fipray.data import as_tensors

    x, y = as_tensors(ds)
    return x.to(device), y.to(device).long()


def train_base(model: nn.Module, x: Tensor, y: Tensor, cfg: Config, seed: int, name: str = "base",
               progress: Any = None) -> PathResult:
    """Plain supervised training (the network w0 every path starts from)."""
    return run_path(model, [supervised_phase(name, x, y, cfg.train, seed)],
                    record_every=max(cfg.train.steps, 1), checkpoint_every=10**9, progress=progress)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was)
    return correct / max(len(x), 1)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def prepare_out(cfg: Config, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {str(out)!r} cannot be written: {e}") from None
    save_config(cfg, out / "config.yaml")
    return out


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def write_outputs(out: Path, cfg: Config, summary: dict, tables: dict[str, list[dict]], report: str) -> None:
    for name, rows in tables.items():
        if rows:
            write_parquet(out / f"{name}.parquet", rows)
    summary = {**summary, "run_id": cfg.run_id(), "environment": environment()}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", report)


def path_summary(records: list[dict]) -> dict:
    """PROTOCOLS.md path numbers from a path's records: FIP length, straight distance, mean drift."""
    if not records:
        return {}
    drift = [r["heldout_distance"] for r in records if "heldout_distance" in r]
    return {"fip_length": records[-1]["fip_length"], "straight_distance": records[-1]["weight_distance"],
            "heldout_distance_mean": float(sum(drift) / len(drift)) if drift else float("nan")}


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def run_experiment(cfg: Config, out_dir: str | Path, *, progress: bool = True, bundle: Any = None) -> dict:
    """Run the experiment named by `cfg.operation`, write everything to `out_dir`, return the summary.

    Args:
        bundle: a `fipray.data.DataBundle` built from the user's own datasets; None loads
            `cfg.data` through the dataset registry.
    """
    import importlib

    module = {"continual": "continual", "sparsify": "sparsify", "ensemble": "ensemble",
              "undirected": "ensemble", "spectrum": "spectrum", "compose": "compose"}[cfg.operation]
    runner = importlib.import_module(f"fipray.experiments.{module}").run
    out = prepare_out(cfg, out_dir)
    if cfg.threads:
        # Small networks on a few CPU cores run faster single-threaded, and far faster when another
        # process competes for the cores (OpenMP spin-waits); the config decides.
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    summary = runner(cfg, out, progress=progress, bundle=bundle)
    summary["seconds_total"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", {**json.loads((out / "summary.json").read_text()),
                                             "seconds_total": summary["seconds_total"]})
    return summary
