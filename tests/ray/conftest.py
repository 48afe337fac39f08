"""Fixtures of the Ray tier (opt-in: `pytest -m ray`).

One private local Ray for the whole session (RAY_NOTES.md: ~4 s and ~0.8 GiB per start): 2 CPUs,
a private temp dir (never a stale cluster file), the dashboard on (Tune's ASHA frees the placement
groups of stopped Train trials through its State API), usage stats off.
"""

from __future__ import annotations

import os
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_2cpus():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from fipray.ray._local import init_local

    if ray.is_initialized():  # another fixture of this tier already started one
        yield ray
        return
    # Short path: Ray's unix socket paths must stay under ~107 characters.
    tmp = tempfile.mkdtemp(prefix="fprt", dir="/tmp")
    init_local(num_cpus=2, temp_dir=tmp, include_dashboard=True, object_store_memory=256 * 1024**2)
    try:
        yield ray
    finally:
        ray.shutdown()
