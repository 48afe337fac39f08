"""`fipray paths` on a simulated three-node Ray cluster (`ray.cluster_utils.Cluster`) storing in S3 (moto).

- a worker node is removed (its processes killed) while one of its paths runs: that path restarts on a
  surviving node from its checkpoint in the bucket; the merged table and ensemble are complete, no row
  lost or twice, and the restarted path ends with the weights of an uninterrupted run (1e-6);
- (slow tier) GPU packing with fake GPUs (Ray's `num_gpus` on a CPU node): `ray.gpus_per_path: 0.5` puts two paths
  on each GPU, each path reports the GPU Ray assigned to it, and no node without GPUs gets a path.

The cluster runs in a subprocess (tests/ray/_cluster_run.py): the session's own Ray cannot share a process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from fipray.job import job_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from _moto import moto_s3  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
DIGITS = {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}}
NODE = {"object_store_memory": 80 * 1024**2, "node_ip_address": "127.0.0.1"}  # loopback only


def _config(num_paths: int, steps: int, **ray) -> dict:
    return {"operation": "undirected", "seeds": [0], "threads": 1, "data": DIGITS,
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 100},
            "path": {"lam": 1.0, "beta": 0.0, "steps": steps, "memory_batch_size": 64, "record_every": 50,
                     "checkpoint_every": 100, "heldout": 64},
            "ensemble": {"members": 2, "sample_every": steps // 2},
            "ray": {"num_paths": num_paths, "report_every_s": 0.2, **ray}}


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


def _run_cluster(tmp_path: Path, s3: dict, cfg: dict, head: dict, workers: list[dict], remove: bool) -> dict:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    ray_tmp = tempfile.mkdtemp(prefix="fpmn", dir="/tmp")  # short: Ray's socket paths are limited
    (Path(ray_tmp) / "ray").mkdir()  # where the Cluster writes its address file (RAY_TMPDIR/ray)
    spec = {"config": str(tmp_path / "job.yaml"), "out": str(tmp_path / "out"), "temp_dir": ray_tmp,
            "head": {**NODE, **head}, "workers": [{**NODE, **w} for w in workers], "remove_after_checkpoint": remove}
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: every node, and the driver, on 127.0.0.1 (RAY_NOTES.md pitfall 7).
    env = {**os.environ, **s3["env"], "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).parent / "_cluster_run.py"), json.dumps(spec)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    finally:
        from test_job_submit import _stop_head

        _stop_head([ray_tmp])  # whatever of the cluster outlived its driver
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.heavy
def test_node_removed_mid_run_paths_restart_elsewhere_from_storage(s3, tmp_path):
    from safetensors.torch import load as load_safetensors

    from fipray.ray.storage import open_storage
    from fipray.units import load_final, run_one_path

    uri = s3["uri"]("runs/multinode")
    cfg = _config(3, 1000, storage_path=uri)
    res = _run_cluster(tmp_path, s3, cfg, head={"num_cpus": 1}, workers=[{"num_cpus": 1}, {"num_cpus": 1}],
                       remove=True)
    s, removed, nodes = res["summary"], res["removed"], res["nodes"]
    assert removed, "no worker node was removed while one of its paths ran"
    assert nodes["driver"] == nodes["head"]  # the row collector lives there (pinned to the driver's node)
    by_path = {p["path"]: p for p in s["paths"]}
    k = removed["path"]
    assert by_path[k]["attempts"] == 2 and by_path[k]["resumed_from"] and by_path[k]["resumed_from"] > 0
    assert by_path[k]["node"] != removed["node"]  # finished on a surviving node
    assert all(p["attempts"] == 1 for j, p in by_path.items() if j != k)
    st = open_storage(uri)
    rows = pq.read_table(io.BytesIO(st.read_bytes("merged/path.parquet"))).to_pylist()
    keys = [(r["path"], r["phase"], r["phase_step"]) for r in rows]
    assert len(keys) == len(set(keys)) == 3 * (1000 // 50)  # complete, nothing twice
    assert s["streamed_rows_match_table"]
    meta = json.loads(st.read_text("merged/ensemble/ensemble.json"))["metadata"]
    assert meta["path_ids"] == [0, 0, 1, 1, 2, 2] and s["ensemble_members"] == 6
    # The restarted path's weights equal an uninterrupted run of it (in this process, no Ray, no S3).
    st.download_file("base/model.safetensors", tmp_path / "base.safetensors")
    run_one_path(job_from_dict(cfg).cfg, k, tmp_path / "base.safetensors", tmp_path / "ref")
    ref = load_final(tmp_path / "ref")
    got = load_safetensors(st.read_bytes(f"paths/path{k}/final.safetensors"))
    assert got.keys() == ref.keys()
    assert max(float((got[n] - ref[n]).abs().max()) for n in ref) <= 1e-6


@pytest.mark.slow  # a second simulated cluster (~70 s under load): out of the default tier's time budget
def test_fractional_gpus_pack_two_paths_per_gpu(s3, tmp_path):
    """4 paths x 0.5 GPU on a node with 2 (fake) GPUs; the CPU-only head never gets one."""
    cfg = _config(4, 300, gpus_per_path=0.5, storage_path=str(tmp_path / "storage"))
    res = _run_cluster(tmp_path, s3, cfg, head={"num_cpus": 2}, workers=[{"num_cpus": 4, "num_gpus": 2}],
                       remove=False)
    s, nodes = res["summary"], res["nodes"]
    gpu_node = nodes["workers"][0]
    assert [p["node"] for p in s["paths"]] == [gpu_node] * 4
    ids = [p["gpu_ids"] for p in s["paths"]]
    assert all(len(i) == 1 and i[0] in ("0", "1") for i in ids), ids
    assert all(p["device"] == "cpu" for p in s["paths"])  # the config asks for cpu: fake GPUs are never used
    # Placement: Ray never puts more than two 0.5-GPU paths on one GPU at the same time.
    spans = []
    for p in s["paths"]:
        w = json.loads((tmp_path / "storage" / "paths" / f"path{p['path']}" / "worker.json").read_text())
        spans.append((w["started_at"], w["started_at"] + p["seconds"], w["gpu_ids"][0]))
    for t, _, g in spans:
        assert sum(1 for a, b, g2 in spans if g2 == g and a <= t < b) <= 2
