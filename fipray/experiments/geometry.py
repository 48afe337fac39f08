"""Entry point of the geometry commands (`fipray spectrum`, `fipray compose`), like `run_experiment`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fipray.config import Config
from fipray.experiments._common import run_experiment

GEOMETRY = ("spectrum", "compose")


def run_geometry(cfg: Config, out_dir: str | Path, *, progress: bool = True, bundle: Any = None) -> dict:
    """Run `cfg.operation` (spectrum or compose), write everything to `out_dir`, return the summary."""
    if cfg.operation not in GEOMETRY:
        raise ValueError(f"run_geometry runs {', '.join(GEOMETRY)}, not {cfg.operation!r}")
    return run_experiment(cfg, out_dir, progress=progress, bundle=bundle)
