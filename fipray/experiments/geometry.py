"""Entry point of the geometry commands (`fipray spectrum`, `fipray compose`), like `run_experiment`."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from fipray._io import atomic_write_json
from fipray.config import Config
from fipray.experiments._common import prepare_out

GEOMETRY = ("spectrum", "compose")


def run_geometry(cfg: Config, out_dir: str | Path, *, progress: bool = True, bundle: Any = None) -> dict:
    """Run `cfg.operation` (spectrum or compose), write everything to `out_dir`, return the summary."""
    if cfg.operation not in GEOMETRY:
        raise ValueError(f"run_geometry runs {', '.join(GEOMETRY)}, not {cfg.operation!r}")
    runner = importlib.import_module(f"fipray.experiments.{cfg.operation}").run
    out = prepare_out(cfg, out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    summary = runner(cfg, out, progress=progress, bundle=bundle)
    summary["seconds_total"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", {**json.loads((out / "summary.json").read_text()),
                                             "seconds_total": summary["seconds_total"]})
    return summary
