"""Importing fipray (everything but fipray.ray) never imports Ray, and works where Ray is absent.

The modules are discovered, not listed: every module of the package outside `fipray/ray/` is
imported with `ray` blocked, so a new module that imports Ray at the wrong floor fails here.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import fipray

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> list[str]:
    found = ["fipray"]
    for m in pkgutil.walk_packages(fipray.__path__, prefix="fipray."):
        if m.name == "fipray.ray" or m.name.startswith("fipray.ray."):
            continue
        found.append(m.name)
    return sorted(found)


MODULES = _modules()

_SCRIPT = r"""
import importlib, importlib.abc, json, sys

class BlockRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"ray is blocked in this test (import of {name!r})")
        return None

sys.meta_path.insert(0, BlockRay())
sys.modules.pop("ray", None)
failed = {}
for m in MODULES:
    try:
        importlib.import_module(m)
    except Exception as e:
        failed[m] = f"{type(e).__name__}: {e}"
# The finder must really block: a direct import fails.
try:
    import ray  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"failed": failed, "ray_loaded": sorted(k for k in sys.modules if k == "ray" or k.startswith("ray.")),
                  "blocked": blocked}))
"""


def _run(script: str) -> dict:
    code = f"MODULES = {MODULES!r}\n" + script
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_discovery_finds_the_engine_modules():
    # Not vacuous: the walk reaches the operations, the runtime and the units, and skips fipray.ray.
    for m in ("fipray.runtime", "fipray.operation", "fipray.units", "fipray.job", "fipray.serving",
              "fipray.ops.continual", "fipray.baselines.ensemble", "fipray.cli", "fipray.core.metric"):
        assert m in MODULES
    assert not any(m.startswith("fipray.ray") for m in MODULES)
    assert len(MODULES) > 40


def test_fipray_imports_without_ray():
    out = _run(_SCRIPT)
    assert out["blocked"] is True
    assert out["failed"] == {}
    assert out["ray_loaded"] == []
