"""`fipray paths` on a local 2-CPU Ray: merged tables, ensembles, fault tolerance, DDP, bad input."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from fipray.config import ConfigError
from fipray.job import job_from_dict

pytestmark = pytest.mark.ray

DIGITS = {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}}


def _job(**over):
    base = {"operation": "undirected", "seeds": [0], "threads": 1, "data": DIGITS,
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
            "train": {"steps": 100}, "path": {"lam": 1.0, "beta": 0.0, "steps": 200, "memory_batch_size": 64,
                                              "record_every": 50, "checkpoint_every": 100, "heldout": 64},
            "ensemble": {"members": 2, "sample_every": 100}, "ray": {"num_paths": 2, "report_every_s": 0.2}}
    return job_from_dict(base, over)


def _serial_reference(job, k: int, storage: Path, tmp: Path) -> tuple[dict, list[dict]]:
    """Path k run in this process without Ray (same base network), the uninterrupted reference."""
    from fipray.units import base_path, load_final, run_one_path

    d = tmp / f"ref{k}"
    run_one_path(job.cfg, k, base_path(storage), d)
    return load_final(d), pq.read_table(d / "records.parquet").to_pylist()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_paths_merge_into_one_table_and_one_ensemble(ray_2cpus, tmp_path):
    from fipray.ensemble_folder import load_ensemble
    from fipray.ray.paths import run_paths
    from fipray.units import load_final

    job = _job()
    s = run_paths(job, tmp_path / "out", progress=False)
    rows = pq.read_table(tmp_path / "out" / "path.parquet").to_pylist()
    assert {r["path"] for r in rows} == {0, 1}
    assert sorted({r["seed"] for r in rows}) == [0, 1]  # path k uses seed + k
    keys = [(r["path"], r["phase"], r["phase_step"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * (200 // 50)
    assert s["streamed_rows_match_table"] and s["streamed_rows"] == len(rows)
    ens = load_ensemble(tmp_path / "out" / "ensemble")
    assert len(ens) == s["ensemble_members"] == 2 * (200 // 100)  # the union of both paths' samples
    meta = json.loads((tmp_path / "out" / "ensemble" / "ensemble.json").read_text())["metadata"]
    assert meta["path_ids"] == [0, 0, 1, 1]
    # Different seeds walk different paths from the same w0.
    storage = Path(s["storage"])
    f0, f1 = load_final(storage / "paths" / "path0"), load_final(storage / "paths" / "path1")
    assert _max_diff(f0, f1) > 1e-4
    # A path run by a Ray worker is the core loop: same weights as in this process.
    ref, _ = _serial_reference(job, 1, storage, tmp_path)
    assert _max_diff(f1, ref) <= 1e-6


@pytest.mark.heavy  # a path's process killed mid-run (the S3 variant in test_storage_s3 is heavy too)
def test_killed_path_resumes_from_its_checkpoint(ray_2cpus, tmp_path):
    """SIGKILL path 0's process mid-run: it restarts from its checkpoint, path 1 carries on, and the final
    weights and merged rows equal an uninterrupted run's."""
    from fipray.ray.paths import run_paths
    from fipray.units import load_final

    job = _job(**{"path.steps": 4000, "path.checkpoint_every": 250, "path.record_every": 100,
                  "ensemble.sample_every": 1000})
    out = tmp_path / "out"
    storage = out / "storage"
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(s=run_paths(job, out, progress=False)), daemon=True)
    runner.start()
    p0 = storage / "paths" / "path0"
    killed = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and runner.is_alive():
        if (p0 / "checkpoint.pt").is_file() and (p0 / "worker.json").is_file() and not (p0 / "result.json").is_file():
            info = json.loads((p0 / "worker.json").read_text())
            os.kill(info["pid"], signal.SIGKILL)
            killed = info["pid"]
            break
        time.sleep(0.02)
    assert killed is not None, "path 0 finished (or never checkpointed) before it could be killed"
    runner.join(timeout=120)
    assert not runner.is_alive()
    s = box["s"]
    by_path = {p["path"]: p for p in s["paths"]}
    assert by_path[0]["attempts"] == 2 and by_path[0]["resumed_from"] and by_path[0]["resumed_from"] > 0
    assert by_path[1]["attempts"] == 1 and by_path[1]["resumed_from"] is None
    ref, ref_rows = _serial_reference(job, 0, storage, tmp_path)
    assert _max_diff(load_final(p0), ref) <= 1e-6
    rows = pq.read_table(out / "path.parquet").to_pylist()
    got = [r for r in rows if r["path"] == 0]
    keys = [(r["path"], r["phase"], r["phase_step"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * (4000 // 100)  # nothing lost, nothing twice
    assert [r["step"] for r in got] == [r["step"] for r in ref_rows]
    for a, b in zip(got, ref_rows):
        assert abs(a["weight_distance"] - b["weight_distance"]) <= 1e-6
    # Rows that the killed process had sent after its last checkpoint were sent again, and dropped.
    assert s["streamed_rows_match_table"]


@pytest.mark.heavy  # DDP on 2 CPU ranks; Train itself stays in the default run (test_sweep's TorchTrainer trials)
def test_train_backend_runs_a_path_on_two_ddp_ranks(ray_2cpus, tmp_path):
    from fipray.ensemble_folder import load_ensemble
    from fipray.ray.paths import run_paths

    job = _job(**{"ray.backend": "train", "ray.num_paths": 1, "ray.workers_per_path": 2,
                  "path.checkpoint_every": 200})
    s = run_paths(job, tmp_path / "out", progress=False)
    (p,) = s["paths"]
    assert p["world"] == 2 and p["steps"] == 200
    rows = pq.read_table(tmp_path / "out" / "path.parquet").to_pylist()
    assert [r["step"] for r in rows] == [50, 100, 150, 200]
    assert rows[-1]["weight_distance"] > 0 and rows[-1]["heldout_distance"] < 0.1
    assert len(load_ensemble(tmp_path / "out" / "ensemble")) == 2
    # Train kept the path's checkpoint in the run's storage.
    assert list((Path(s["storage"]) / "train").rglob("checkpoint.pt"))


@pytest.mark.parametrize("over, match", [
    ({"ray.num_paths": 0}, "must be >= 1"),
    ({"operation": "prune"}, "'operation': 'prune' is not one of"),
    ({"ray.backend": "actors"}, "'ray.backend'"),
    ({"ray.workers_per_path": 2}, "needs ray.backend: train"),
])
def test_bad_config_fails_before_work(over, match):
    with pytest.raises(ConfigError, match=match):
        _job(**over)


def test_bad_resources_and_storage_fail_before_work(ray_2cpus, tmp_path):
    from fipray.ray.paths import run_paths

    with pytest.raises(ConfigError, match="cluster has 2 CPU"):
        run_paths(_job(**{"ray.backend": "train", "ray.workers_per_path": 3}), tmp_path / "a", progress=False)
    blocked = tmp_path / "ro"
    blocked.write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="storage path"):
        run_paths(_job(**{"ray.storage_path": str(blocked / "sub")}), tmp_path / "b", progress=False)
    assert not (tmp_path / "a" / "storage" / "base").exists()  # nothing started
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("requested, gpu_ids, visible, want", [
    ("cpu", ["0"], "0", "cpu"),  # the config's cpu stands, even on a (fake) GPU Ray assigned
    ("cuda", ["3"], "3", "cuda:0"),  # Ray narrowed CUDA_VISIBLE_DEVICES to the assigned GPU
    ("cuda:0", ["3"], "2,3", "cuda:1"),  # the assigned GPU's place among the visible ones, not cuda:0
    ("cuda", ["1"], None, "cuda:1"),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the GPU's own index
])
def test_worker_device_is_the_gpu_ray_assigned(requested, gpu_ids, visible, want):
    from fipray.ray.cluster import worker_device

    assert worker_device(requested, gpu_ids, visible) == want


def test_worker_device_without_an_assigned_gpu_is_an_error():
    from fipray.ray.cluster import worker_device

    with pytest.raises(ConfigError, match="assigned this worker no GPU"):
        worker_device("cuda", [], None)
