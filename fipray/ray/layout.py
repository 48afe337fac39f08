"""Where a `fipray paths` run keeps its files in storage (`fipray.ray.storage`), shared by the driver and its units.

    <storage>/config.yaml          the config whose checkpoints storage holds (resume refuses another)
    <storage>/base/                w0; BASE_REL (its weights) is written last
    <storage>/paths/path<k>/       path_rel(k): path k's checkpoint, records, samples, result.json, worker.json
    <storage>/train/               Ray Train's runs (`backend: train`)
    <storage>/merged/              the merged outputs, on an object store

`run_storage(job, out)` opens `ray.storage_path`, or `<out>/storage` when it is empty.
"""

from __future__ import annotations

from pathlib import Path

from fipray.job import JobConfig
from fipray.ray.storage import Storage, open_storage
from fipray.units import BASE_DIR, BASE_FILE

BASE_REL = f"{BASE_DIR}/{BASE_FILE}"  # w0 in storage; written last, so its presence means w0 is complete


def path_rel(k: int) -> str:
    """Path k's folder in storage."""
    return f"paths/path{k}"


def run_storage(job: JobConfig, out: Path) -> Storage:
    """The run's storage: `ray.storage_path` (a folder or a URI), or `<out>/storage` when it is empty."""
    sp = job.ray.storage_path
    return open_storage(sp if sp else out / "storage", "ray.storage_path")
