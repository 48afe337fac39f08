"""The Serve code version covers every fipray module the serving path imports, and only the folder is left out."""

from __future__ import annotations

import shutil

from test_architecture import ROOT, imports, modules

from fipray.ray import serve_version
from fipray.ray.serve_version import SERVING_ROOT, code_version, serving_modules


def test_serving_modules_are_closed_under_the_import_graph():
    graph = imports(modules(ROOT))  # the architecture test's own reading of the imports
    covered = set(serving_modules())
    missing = {f"{m} imports {d}" for m in covered for d in graph[m] if d not in covered}
    assert missing == set()
    reachable, todo = set(), [SERVING_ROOT]
    while todo:
        m = todo.pop()
        if m not in reachable:
            reachable.add(m)
            todo += graph[m]
    assert covered == reachable


def test_serving_modules_include_the_split_modules():
    covered = set(serving_modules())
    assert {"fipray.ray.serve", "fipray.ray.serve_version", "fipray.serving", "fipray.serving_args",
            "fipray.serving_requests", "fipray.ensemble", "fipray.ensemble_folder", "fipray.models.hf",
            "fipray.data.tokenizer", "fipray.config"} <= covered
    assert "fipray.ray.serve_main" not in covered  # the `fipray serve` process runs in no replica


def test_code_version_follows_the_code_and_the_args_but_not_the_folder(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "fipray", tmp_path / "fipray", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(serve_version, "PACKAGE_DIR", tmp_path / "fipray")
    args = {"ensemble": "a", "shards": 2}
    v = code_version(args)
    assert code_version({**args, "ensemble": "b"}) == v
    assert code_version({**args, "shards": 3}) != v
    with open(tmp_path / "fipray" / "serving_requests.py", "a") as f:
        f.write("# changed\n")
    assert code_version(args) != v
