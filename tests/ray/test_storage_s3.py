"""Storage URIs (`ray.storage_path=s3://...`) against a local S3 endpoint (moto on 127.0.0.1).

- the storage layer: writes, reads, a staging workspace pushed with its marker last and resumed from the bucket;
- bad storage fails before any work, naming the problem (scheme, bucket, credentials, unreachable endpoint);
- `fipray paths ... ray.storage_path=s3://bucket/run` end to end: one path's process killed mid-run resumes
  from its checkpoint in the bucket; the merged outputs are read back from the bucket.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from fipray.config import ConfigError
from fipray.job import job_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from _moto import moto_s3  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIGITS = {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}}


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


def _config(**path) -> dict:
    return {"operation": "undirected", "seeds": [0], "threads": 1, "data": DIGITS,
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 100},
            "path": {"lam": 1.0, "beta": 0.0, "steps": 200, "memory_batch_size": 64, "record_every": 50,
                     "checkpoint_every": 100, "heldout": 64, **path},
            "ensemble": {"members": 2, "sample_every": 100}, "ray": {"num_paths": 2, "report_every_s": 0.2}}


def test_storage_roundtrip_and_workspace_resume(s3, tmp_path):
    from fipray.ray.storage import Workspace, check_storage, open_storage

    st = open_storage(s3["uri"]("unit"))
    assert st.root == "fipray-test/unit" and not st.is_local and st.display() == "s3://fipray-test/unit"
    check_storage(st)
    st.write_json("a/x.json", {"v": float("nan"), "n": 3})
    assert st.read_json("a/x.json") == {"v": None, "n": 3} and st.files("a") == ["x.json"]
    with Workspace(st, "paths/p") as ws:
        assert ws.dir.is_dir() and not list(ws.dir.iterdir())
        (ws.dir / "samples").mkdir()
        (ws.dir / "samples" / "s0.bin").write_bytes(b"0" * 10)
        (ws.dir / "checkpoint.pt").write_bytes(b"c1")
        assert ws.push(last=["checkpoint.pt"]) == ["samples/s0.bin", "checkpoint.pt"]  # the marker last
        assert ws.push(last=["checkpoint.pt"]) == []  # nothing changed, nothing sent
        (ws.dir / "checkpoint.pt").write_bytes(b"c2-longer")
        assert ws.push(last=["checkpoint.pt"]) == ["checkpoint.pt"]
        local = ws.dir
    assert not local.exists()  # the staging folder goes with the unit
    with Workspace(st, "paths/p") as ws:  # a restarted unit (any node) starts from what the bucket holds
        assert (ws.dir / "checkpoint.pt").read_bytes() == b"c2-longer"
        assert (ws.dir / "samples" / "s0.bin").read_bytes() == b"0" * 10
        assert ws.push() == []
    # A local folder and file:// are the same thing: the workspace is the storage folder itself.
    for spec in (str(tmp_path / "loc"), f"file://{tmp_path / 'loc'}"):
        loc = open_storage(spec)
        check_storage(loc)
        with Workspace(loc, "paths/p") as ws:
            assert ws.dir == tmp_path / "loc" / "paths" / "p"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_bad_storage_fails_before_any_work(s3, tmp_path, monkeypatch):
    from fipray.ray.paths import run_paths

    def attempt(uri: str, name: str) -> str:
        with pytest.raises(ConfigError) as e:  # at config load (scheme) or before Ray starts (the rest)
            run_paths(job_from_dict(_config(), {"ray.storage_path": uri}), tmp_path / name, progress=False)
        assert not (tmp_path / name / "storage").exists()
        return str(e.value)

    assert "scheme 'hdfs2' is not one of" in attempt("hdfs2://x/y", "a")
    assert "names no bucket" in attempt("s3://?endpoint_override=" + s3["endpoint"], "b")
    assert "bucket does not exist" in attempt(s3["uri"]("run", bucket="no-such-bucket"), "c")
    t0 = time.monotonic()
    msg = attempt(f"s3://fipray-test/run?endpoint_override=127.0.0.1:{_closed_port()}&scheme=http", "d")
    assert "endpoint is unreachable" in msg and time.monotonic() - t0 < 60
    assert "ray.storage_path" in msg and "s3://fipray-test/run" in msg
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert "no AWS credentials found" in attempt(s3["uri"]("run"), "e")


def _stop_tree(pid: int) -> None:
    """SIGKILL a process we started and every descendant of it (its private Ray included)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_job_submit import _procs

    procs = _procs()
    victims, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier and p not in victims}
        victims |= frontier
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_paths_killing_path0(s3: dict, st, job_file: Path, out: Path, checkpointed: Callable[[Any], bool], *,
                            deadline_s: float, finish_s: float) -> int:
    """Run `fipray paths --config job_file` (storage `st`, its own Ray on 127.0.0.1) and SIGKILL path 0's worker
    once `checkpointed(st)` holds, its worker.json is in the bucket and it has no result yet; the run must then
    finish (exit 0) within `finish_s`. Returns the killed pid; on failure the run's log is in the message."""
    env = {**os.environ, **s3["env"], "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="fps3", dir="/tmp")}  # short: Ray's socket paths are limited
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "fipray.cli", "paths", "--config", str(job_file), "--out", str(out),
           "--no-progress", f"ray.storage_path={st.uri}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        killed, deadline = None, time.monotonic() + deadline_s
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpointed(st):
                names = st.files("paths/path0")
                if "worker.json" in names and "result.json" not in names:
                    killed = int(st.read_json("paths/path0/worker.json")["pid"])
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.05)
        if killed is None:
            log = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
            raise AssertionError(f"path 0 finished (or never checkpointed) before it could be killed: {log[-3000:]}")
        log, _ = proc.communicate(timeout=finish_s)
        assert proc.returncode == 0, log[-4000:]
    finally:
        if proc.poll() is None:
            _stop_tree(proc.pid)
    return killed


@pytest.mark.ray
@pytest.mark.heavy
def test_fipray_paths_on_s3_resumes_a_killed_path_from_the_bucket(s3, tmp_path):
    """`fipray paths --config F ray.storage_path=s3://...`: SIGKILL path 0 once its checkpoint is in the bucket;
    it restarts from that checkpoint, and the outputs read back from the bucket equal an uninterrupted run."""
    from safetensors.torch import load as load_safetensors

    from fipray.ray.storage import open_storage
    from fipray.units import load_final, run_one_path

    cfg = _config(steps=1000, checkpoint_every=100, record_every=50)
    cfg["ensemble"]["sample_every"] = 500
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    uri = s3["uri"]("runs/kill")
    st = open_storage(uri)
    out = tmp_path / "out"
    run_paths_killing_path0(s3, st, tmp_path / "job.yaml", out, lambda st: "checkpoint.pt" in st.files("paths/path0"),
                            deadline_s=180, finish_s=240)
    # Everything below is read back from the bucket.
    summary = st.read_json("merged/summary.json")
    by_path = {p["path"]: p for p in summary["paths"]}
    assert by_path[0]["attempts"] == 2 and by_path[0]["resumed_from"] and by_path[0]["resumed_from"] > 0
    assert by_path[1]["attempts"] == 1 and by_path[1]["resumed_from"] is None
    assert summary["storage"] == "s3://fipray-test/runs/kill"
    rows = pq.read_table(io.BytesIO(st.read_bytes("merged/path.parquet"))).to_pylist()
    keys = [(r["path"], r["phase"], r["phase_step"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * (1000 // 50)  # nothing lost, nothing twice
    assert summary["streamed_rows_match_table"]
    ens = json.loads(st.read_text("merged/ensemble/ensemble.json"))
    assert ens["metadata"]["path_ids"] == [0, 0, 1, 1]
    assert not [n for n in st.files("") if ".fipray-write-test" in n]  # the probe cleaned up
    # Path 0's final weights equal an uninterrupted run of the same path in this process (no Ray, no S3).
    st.download_file("base/model.safetensors", tmp_path / "base" / "model.safetensors")
    ref_dir = tmp_path / "ref0"
    run_one_path(job_from_dict(cfg).cfg, 0, tmp_path / "base" / "model.safetensors", ref_dir)
    ref = load_final(ref_dir)
    got = load_safetensors(st.read_bytes("paths/path0/final.safetensors"))
    assert got.keys() == ref.keys()
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-6
    # The local --out folder holds the same merged outputs.
    assert pq.read_table(out / "path.parquet").num_rows == len(rows)


@pytest.mark.slow  # two sweeps, each its own Ray (~1-2 min under load)
def test_fipray_sweep_on_s3_keeps_tune_in_the_bucket_and_resumes_from_it(s3, tmp_path):
    from fipray.ray.storage import open_storage

    uri = s3["uri"]("runs/sweep")
    st = open_storage(uri)
    env = {**os.environ, **s3["env"], "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "fipray.cli", "sweep", "--smoke-test", "--config",
           str(ROOT / "jobs/configs/sweep_continual_digits.yaml"), "--no-progress", f"ray.storage_path={uri}"]
    summaries = []
    for i in range(2):  # the second run, from another --out, finds the finished experiment in the bucket
        ray_tmp = tempfile.mkdtemp(prefix="fpsw", dir="/tmp")
        r = subprocess.run([*cmd, "--out", str(tmp_path / f"out{i}")], cwd=ROOT, env={**env, "RAY_TMPDIR": ray_tmp},
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        summaries.append(st.read_json("results/summary.json"))
    assert [s["resumed"] for s in summaries] == [False, True]
    assert summaries[0]["num_trials"] == summaries[1]["num_trials"] == 2
    assert summaries[1]["best_metric"] == summaries[0]["best_metric"]
    assert [n for n in st.files("tune") if "experiment_state" in n]
    assert pq.read_table(io.BytesIO(st.read_bytes("results/trials.parquet"))).num_rows == 2
    assert "continual" in st.read_text("results/best_config.yaml")
