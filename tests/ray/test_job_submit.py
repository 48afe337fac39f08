"""`ray job submit` of jobs/sweep.py --smoke-test to a head started here on 127.0.0.1, then stopped.

The head gets its own ports and temp dir, and only its own processes are stopped at the end (found by
its temp dir and ports, then their descendants): `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _ensembles import free_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
GCS_PORT = 6391


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def _stop_head(markers: list[str]) -> list[int]:
    """Kill the head's processes (command line names its temp dir or ports) and all their descendants."""
    procs = _procs()
    me = os.getpid()
    roots = {p for p, (_, cmd) in procs.items() if p != me and any(m in cmd for m in markers)}
    victims, frontier = set(roots), set(roots)
    while frontier:
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier and p not in victims and p != me}
        victims |= frontier
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in victims:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
    return sorted(victims)


@pytest.fixture
def ray_head():
    tmp = tempfile.mkdtemp(prefix="fpjs", dir="/tmp")  # short: unix socket paths are limited
    dash, client, agent = free_port(), free_port(), free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",  # the job's `python` is ours
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    markers = [tmp, f"127.0.0.1:{GCS_PORT}", f"--port={dash}"]
    cmd = [f"{venv_bin}/ray", "start", "--head", f"--port={GCS_PORT}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", f"--temp-dir={tmp}", "--disable-usage-stats"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield {"env": env, "address": f"http://127.0.0.1:{dash}", "venv_bin": venv_bin}
    finally:
        killed = _stop_head(markers)
        assert killed, "found none of the head's processes to stop"
        left = [p for p, (_, c) in _procs().items() if tmp in c]
        assert not left, f"head processes still alive: {left}"


@pytest.mark.heavy  # ~38 s with its `ray start --head`: README's tier stays under 6 minutes
def test_job_submit_runs_the_sweep_smoke_test(ray_head, tmp_path):
    out = tmp_path / "sweep"
    cmd = [f"{ray_head['venv_bin']}/ray", "job", "submit", "--address", ray_head["address"], "--working-dir", ".",
           "--", "python", "jobs/sweep.py", "--smoke-test", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_trials"] == 2 and summary["metric"] == "acc_mean"
    assert (out / "trials.parquet").is_file() and (out / "best_config.yaml").is_file()
