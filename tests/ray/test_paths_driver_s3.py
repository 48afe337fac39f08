"""The whole `fipray paths` driver SIGKILLed (its local Ray too) on object storage, rerun from another machine's view.

`fipray paths ... ray.storage_path=s3://bucket/run` (moto on 127.0.0.1): once every path's checkpoint is in the
bucket and no path has finished, the CLI's process group and every process it started die at once. The same
command, run again from another working folder with another --out (nothing local survives), resumes every path
from its newest checkpoint in the bucket: the merged rows, the ensemble members and every path's final weights
equal an uninterrupted run's (its own bucket prefix), and the rerun computed none of the checkpointed steps again.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _moto import moto_s3  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS, RECORD, CKPT, SAMPLE = 4000, 100, 200, 2000
CONFIG = {"operation": "undirected", "seeds": [0], "threads": 1,
          "data": {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}},
          "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 100},
          "path": {"lam": 1.0, "beta": 0.0, "steps": STEPS, "memory_batch_size": 64, "record_every": RECORD,
                   "checkpoint_every": CKPT, "heldout": 64},
          "ensemble": {"members": 2, "sample_every": SAMPLE}, "ray": {"num_paths": 2, "report_every_s": 0.2}}
TIMING = ("seconds",)  # wall-clock columns: the only ones allowed to differ between runs


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


def _start(s3: dict, uri: str, where: Path) -> subprocess.Popen:
    """`fipray paths` from its own working folder, --out inside it, its own Ray temp dir, in a new session."""
    where.mkdir(parents=True)
    (where / "job.yaml").write_text(yaml.safe_dump(CONFIG))
    ray_tmp = tempfile.mkdtemp(prefix="fpdk", dir="/tmp")  # short: Ray's socket paths are limited
    env = {**os.environ, **s3["env"], "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "fipray.cli", "paths", "--config", "job.yaml", "--out", "out", "--no-progress",
           f"ray.storage_path={uri}"]
    return subprocess.Popen(cmd, cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) if d.name.isdigit() else None
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") if ppid else ""
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            out[int(d.name)] = (ppid, cmd)
    return out


def _tree(pid: int) -> set[int]:
    procs = _procs()
    found, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def _kill_driver(proc: subprocess.Popen) -> set[int]:
    """SIGKILL the CLI's process group and every process it started (its local Ray); returns their ids."""
    victims = _tree(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and victims & set(_procs()):
        time.sleep(0.1)
    return victims


def _checkpoint_step(st, k: int) -> int:
    import torch

    return int(torch.load(io.BytesIO(st.read_bytes(f"paths/path{k}/checkpoint.pt")), weights_only=False)
               ["global_step"])


def _outputs(st) -> dict:
    """What a finished run leaves in the bucket: merged rows, ensemble members and metadata, final weights."""
    from safetensors.torch import load as load_safetensors

    rows = pq.read_table(io.BytesIO(st.read_bytes("merged/path.parquet"))).to_pylist()
    ens = json.loads(st.read_text("merged/ensemble/ensemble.json"))
    members = {n: load_safetensors(st.read_bytes(f"merged/ensemble/{n}")) for n in st.files("merged/ensemble")
               if n.endswith(".safetensors")}
    finals = {k: load_safetensors(st.read_bytes(f"paths/path{k}/final.safetensors")) for k in range(2)}
    return {"rows": rows, "ens": ens["metadata"], "members": members, "finals": finals,
            "summary": st.read_json("merged/summary.json")}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _same_rows(got: list[dict], ref: list[dict]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.keys() == r.keys()
        for c, v in r.items():
            if c in TIMING:
                continue
            if isinstance(v, float):
                assert abs(g[c] - v) <= 1e-6, (c, g, r)
            else:
                assert g[c] == v, (c, g, r)


@pytest.mark.ray
@pytest.mark.heavy
def test_killed_driver_resumes_every_path_from_the_bucket_elsewhere(s3, tmp_path):
    from fipray.ray.storage import open_storage

    ref_st, st = open_storage(s3["uri"]("driver/ref")), open_storage(s3["uri"]("driver/run"))
    first = _start(s3, s3["uri"]("driver/run"), tmp_path / "a")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            names = [set(st.files(f"paths/path{k}")) for k in range(2)]
            if all("checkpoint.pt" in n and "result.json" not in n for n in names):
                break
            time.sleep(0.05)
    finally:
        victims = _kill_driver(first)
    assert first.returncode == -signal.SIGKILL, "the driver finished before it could be killed"
    assert not victims & set(_procs()), "a process of the killed driver survived"
    assert not st.exists("merged/summary.json") and not any(st.exists(f"paths/path{k}/result.json") for k in range(2))
    ckpt = {k: _checkpoint_step(st, k) for k in range(2)}  # what the bucket holds: the rerun's only source
    assert all(0 < c < STEPS for c in ckpt.values()), ckpt

    second = _start(s3, s3["uri"]("driver/run"), tmp_path / "b")  # another folder, another --out
    ref = _start(s3, s3["uri"]("driver/ref"), tmp_path / "ref")  # meanwhile: uninterrupted, its own prefix
    _finish(second)
    _finish(ref)

    got, want = _outputs(st), _outputs(ref_st)
    _same_rows(got["rows"], want["rows"])  # nothing lost, nothing twice
    keys = [(r["path"], r["phase"], r["phase_step"]) for r in got["rows"]]
    assert len(keys) == len(set(keys)) == 2 * (STEPS // RECORD)
    assert got["ens"]["path_ids"] == want["ens"]["path_ids"] == [0] * (STEPS // SAMPLE) + [1] * (STEPS // SAMPLE)
    assert got["ens"]["steps"] == want["ens"]["steps"]
    assert got["members"].keys() == want["members"].keys() and got["members"]
    assert max(_max_diff(got["members"][n], want["members"][n]) for n in want["members"]) <= 1e-6
    assert max(_max_diff(got["finals"][k], want["finals"][k]) for k in range(2)) <= 1e-6
    assert (tmp_path / "b" / "out" / "path.parquet").is_file() and not (tmp_path / "a" / "out" / "path.parquet").exists()

    # No checkpointed step computed again: each path started at its newest checkpoint in the bucket; the rerun
    # streamed a record row (only a step the loop runs makes one) for exactly the steps after it, and the rows
    # up to it came from the checkpoint (restored, never streamed by this driver).
    summary = got["summary"]
    assert {p["path"]: p["resumed_from"] for p in summary["paths"]} == ckpt
    after = sum(r["step"] > ckpt[r["path"]] for r in got["rows"])
    assert summary["streamed_rows"] == after and summary["restored_rows"] == len(got["rows"]) - after > 0
    assert summary["streamed_duplicates_dropped"] == 0 and summary["streamed_rows_match_table"]
    assert want["summary"]["streamed_rows"] == len(want["rows"]) and want["summary"]["restored_rows"] == 0
    assert all(p["resumed_from"] is None for p in want["summary"]["paths"])
