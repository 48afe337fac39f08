"""Fixtures of the Ray tier (`pytest -m ray`; README's command runs it without its `heavy` tests, which
.ci/run runs next with `-m "heavy and not slow"`; both tiers share this one Ray).

One private local Ray for this folder's tests (RAY_NOTES.md: ~4 s and ~0.8 GiB per start): 2 CPUs,
a private temp dir (never a stale cluster file), the dashboard on (Tune's ASHA frees the placement
groups of stopped Train trials through its State API), usage stats off. It stops after the folder's
last test, so the tiers that run after this one (tests/slow, tests/unit) never see it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ray_2cpus():
    """The tier's Ray, started by the first module that needs it and kept for the next ones (a check
    per module); :func:`pytest_runtest_teardown` stops it after this folder's last test."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from fipray.ray.local import init_local

    if not ray.is_initialized():
        # Short path: Ray's unix socket paths must stay under ~107 characters.
        tmp = tempfile.mkdtemp(prefix="fprt", dir="/tmp")
        init_local(num_cpus=2, temp_dir=tmp, include_dashboard=True, object_store_memory=256 * 1024**2)
    yield ray


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After this folder's last test (and its fixtures' teardown), stop the tier's Ray.

    Left running, the tiers after this one saw a Ray they did not start (in CI a unit test of
    ``fipray serve``'s refusals got the running-Ray error instead of its own). A selection that comes
    back to this folder later starts a fresh Ray (``ray_2cpus`` is module-scoped for that; pytest's
    package scope would need an ``__init__.py``, making this folder a package named ``ray``).
    """
    yield
    if nextitem is None or _HERE not in Path(nextitem.path).resolve().parents:
        import ray

        if ray.is_initialized():
            ray.shutdown()
