"""The Serve code version of fipray's deployments: a hash of the serving code and of the app's arguments.

Serve restarts replicas only when a deployment's code version changes; a switch to another ensemble
folder then changes nothing but the ingress's ``user_config``, which Serve applies in place
(``reconfigure`` on the running replica) instead of replacing every replica (what an unversioned
``serve.run`` does, shards included). The code hashed is every fipray module the serving path
imports, found by reading the imports of :data:`SERVING_ROOT` and of each module it reaches (imports
inside functions too), so a module added to the serving path is covered without a list to keep up.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fipray
from fipray.importgraph import module_imports

SERVING_ROOT = "fipray.ray.serve"  # the deployments; everything their replicas run is imported from here
PACKAGE_DIR = Path(fipray.__file__).resolve().parent


def module_file(name: str) -> Path | None:
    """The source file of fipray module ``name`` (a package by its ``__init__.py``), or None if none."""
    parts = name.split(".")
    if parts[0] != "fipray":
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py") if len(parts) > 1 else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def imported_modules(name: str) -> set[str]:
    """The fipray modules that module ``name`` imports anywhere in its file (function-local imports too)."""
    path = module_file(name)
    assert path is not None, name
    return set(_file_imports(name, path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=512)
def _file_imports(name: str, path: Path, mtime_ns: int) -> frozenset[str]:
    """:func:`imported_modules` of one version of the file (a redeploy re-reads only files that changed)."""
    return frozenset(module_imports(path.read_text(), name, path.name == "__init__.py",
                                    lambda target: module_file(target) is not None))


def serving_modules(root: str = SERVING_ROOT) -> list[str]:
    """``root`` and every fipray module it imports, directly or through other modules, sorted."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported_modules(name) - seen
    return sorted(seen)


def code_version(args: Mapping[str, Any]) -> str:
    """The deployments' code version: the serving code (:func:`serving_modules`), fipray's version and
    every app argument but the ensemble folder (``args``: the ``ServeArgs`` fields as a mapping)."""
    h = hashlib.sha256(json.dumps({**args, "ensemble": None}, sort_keys=True, default=str).encode())
    h.update(fipray.__version__.encode())
    for name in serving_modules():
        path = module_file(name)
        assert path is not None, name
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def versioned(deployment: Any, version: str) -> Any:
    """``deployment`` carrying Serve code version ``version`` (:func:`code_version`).

    Ray 2.60 removed ``version`` from ``Deployment.options``; the deployment's ``_version`` (which
    ``serve.run`` reads, else a random string) carries it (a test checks the replicas survive a
    switch, so a Ray that stops honouring it fails loudly).
    """
    deployment._version = version
    return deployment
