"""Experiments: an operation compared with its baselines over seeds, written to an output folder.

`run_experiment(cfg, out_dir)` is what `fipray <operation>` calls; the operation itself (what runs,
what is aggregated and reported) is looked up in the registry (`fipray.operation`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fipray.atomic import atomic_write_json
from fipray.config import Config
from fipray.operation import get_operation
from fipray.runtime import prepare_out

__all__ = ["run_experiment"]


def run_experiment(cfg: Config, out_dir: str | Path, *, progress: bool = True, bundle: Any = None,
                   tasks: Any = None) -> dict:
    """Run the experiment named by `cfg.operation`, write everything to `out_dir`, return the summary.

    Args:
        bundle: a `fipray.data.DataBundle` built from the user's own datasets; None loads
            `cfg.data` through the dataset registry.
        tasks: for `continual`, a task stream built from the user's own data
            (`fipray.data.streams.TaskStream`: `class_split`, `datasets_stream`, `domain_stream`) instead
            of the stream the config describes.
    """
    op = get_operation(cfg.operation)
    out = prepare_out(cfg, out_dir)
    if cfg.threads:
        # Small networks on a few CPU cores run faster single-threaded, and far faster when another
        # process competes for the cores (OpenMP spin-waits); the config decides.
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    ctx = op.context(cfg, bundle=bundle, tasks=tasks, out=out, show_progress=progress)
    summary = op.run(ctx)
    summary["seconds_total"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", {**json.loads((out / "summary.json").read_text()),
                                             "seconds_total": summary["seconds_total"]})
    return summary
