"""Faults under load: a shard replica's process killed mid-load; `fipray serve` stopped by a signal leaves no Ray."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _ensembles import free_port, processes_mentioning, random_ensemble

from fipray.ensemble_folder import load_ensemble

pytestmark = pytest.mark.ray
# `heavy` (run by .ci/run after README's command): the shard kill under load and the direct-ingress variant.

SHAPE = (1, 8, 8)
TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def ens_dir(tmp_path_factory):
    return random_ensemble(tmp_path_factory.mktemp("faults"), "small_cnn", {"width": 0.5, "fc": 32}, SHAPE,
                           num_classes=10, members=4, metadata={"operation": "ensemble"})


def _post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def fault_numbers(timeline: list[tuple[float, float, int]], t_kill: float, stall_s: float = 1.0) -> dict:
    """What the kill cost the load (``timeline`` rows are ``(start_s, seconds, status)``).

    A request is hit when it failed or took over ``stall_s`` (here requests take ~10-100 ms);
    recovery is from the kill to the end of the last hit request.
    """
    failed = [r for r in timeline if r[2] != 200]
    hit = [r for r in timeline if r[2] != 200 or r[1] > stall_s]
    end = max((r[0] + r[1] for r in hit), default=t_kill)
    return {"requests": len(timeline), "failed": len(failed), "failed_statuses": sorted({r[2] for r in failed}),
            "delayed_over_1s": len(hit) - len(failed), "slowest_s": max(r[1] for r in timeline),
            "recovery_s": end - t_kill, "ok_after_recovery": sum(r[2] == 200 and r[0] >= end for r in timeline)}


@pytest.mark.heavy
def test_killed_shard_replica_fails_fast_restarts_and_answers_correctly(ray_2cpus, ens_dir):
    from ray import serve

    from fipray.ray.serve import start
    from fipray.ray.serve_load import load_test

    port = free_port()
    try:
        start({"ensemble": str(ens_dir), "shards": 2, "request_timeout_s": TIMEOUT_S, "health_check_period_s": 1.0},
              port=port)
        shard = serve.get_deployment_handle("EnsembleShard0", app_name="fipray")
        pid = shard.info.remote().result()["pid"]
        torch.manual_seed(0)
        bodies = [json.dumps({"inputs": torch.rand(2, *SHAPE).tolist()}).encode() for _ in range(8)]
        out: dict = {}

        def load():
            out.update(load_test(f"http://127.0.0.1:{port}/predict", bodies, requests=100_000, concurrency=4,
                                 time_limit_s=30, timeout_s=TIMEOUT_S + 10, timeline=True))

        t = threading.Thread(target=load, daemon=True)
        t0 = time.perf_counter()
        t.start()
        time.sleep(3.0)
        t_kill = time.perf_counter() - t0
        os.kill(pid, signal.SIGKILL)
        new_pid = shard.info.remote().result(timeout_s=60)["pid"]  # answered once Serve restarted the replica
        restart_s = time.perf_counter() - t0 - t_kill
        t.join(90)
        numbers = {**fault_numbers(out["timeline"], t_kill), "replica_restart_s": restart_s}
        print(json.dumps({"fault_under_load": {k: round(v, 3) if isinstance(v, float) else v
                                               for k, v in numbers.items()}}))
        # The times (replica_restart_s, recovery_s, slowest_s) are measured and printed above, not asserted:
        # on a loaded 2-core machine they vary several-fold (README quotes measured ones). What is asserted
        # holds at any speed.
        assert not t.is_alive()
        assert numbers["failed"] < numbers["requests"] / 2  # bounded: most of the load was answered
        # Failures are the server's 5xx, never a transport error (status 0): a request that hung past the
        # client's timeout (Serve's request_timeout_s + 10 s) would show up here.
        assert all(500 <= s < 600 for s in numbers["failed_statuses"]), out["error_samples"]
        assert numbers["ok_after_recovery"] > 20  # the load was answered again after the last hit request
        assert new_pid != pid  # Serve restarted the replica (a new process answers its handle)
        x = torch.rand(5, *SHAPE)
        status, data = _post(port, json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200
        with torch.no_grad():
            assert torch.allclose(torch.tensor(json.loads(data)["probs"]), load_ensemble(ens_dir)(x).exp(), atol=1e-5)
    finally:
        serve.shutdown()


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _metadata(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metadata")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _sighup_and_wait(proc: subprocess.Popen, lines: list[bytes]) -> dict:
    """SIGHUP ``fipray serve`` and return the switch report it prints next."""
    before = len([ln for ln in lines if ln.startswith(b'{"switch')])
    proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 60
    while time.time() < deadline and len([ln for ln in lines if ln.startswith(b'{"switch')]) == before:
        assert proc.poll() is None, b"".join(lines[-20:]).decode()[-2000:]  # the server must not exit
        time.sleep(0.2)
    said = [json.loads(ln) for ln in lines if ln.startswith(b'{"switch')]
    assert len(said) == before + 1, [ln[-300:] for ln in lines[-20:]]
    return said[-1]


def _switch_by_sighup(proc: subprocess.Popen, port: int, link: Path, tmp_path: Path) -> None:
    """SIGHUP with ``link`` re-pointed at a corrupt folder: ``fipray serve`` reports why, stays up and keeps the
    old ensemble; then at another good ensemble: it reports and serves the new folder."""
    import shutil

    lines: list[bytes] = []

    def read():  # until the server exits: its pipe never fills
        for ln in iter(proc.stdout.readline, b""):  # type: ignore[union-attr]
            lines.append(ln)

    threading.Thread(target=read, daemon=True).start()
    old = link.resolve()
    bad = tmp_path / "bad"
    shutil.copytree(old, bad)
    data = (bad / "members.safetensors").read_bytes()
    (bad / "members.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    link.unlink()
    link.symlink_to(bad)
    said = _sighup_and_wait(proc, lines)
    assert "SHA-256 mismatch" in said.get("switch_failed", "") and said["serving"] == str(old), said
    x = torch.rand(3, *SHAPE)
    status, answer = _post(port, json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200 and _metadata(port)["ensemble"] == str(old)
    with torch.no_grad():
        assert torch.allclose(torch.tensor(json.loads(answer)["probs"]), load_ensemble(old)(x).exp(), atol=1e-5)

    new = random_ensemble(tmp_path / "next", "small_cnn", {"width": 0.5, "fc": 32}, SHAPE, num_classes=10,
                          members=4, seed=100, metadata={"operation": "ensemble"})
    link.unlink()
    link.symlink_to(new)
    said = _sighup_and_wait(proc, lines)
    assert said.get("switched_to") == str(new.resolve()), said
    assert _metadata(port)["ensemble"] == str(new.resolve())


def _cli(argv: list[str], tmp: str, timeout: float = 120) -> tuple[int, str, float]:
    """``fipray ARGV`` in a subprocess with a private Ray folder: exit code, stderr, seconds."""
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fipray.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err.decode(), time.perf_counter() - t0


@pytest.mark.parametrize("what", ["serve corrupt", "attack corrupt", "serve port taken"])
def test_startup_refuses_a_corrupt_folder_or_taken_port_in_one_line_before_ray(ens_dir, what, tmp_path):
    import shutil
    import socket

    folder = ens_dir
    if "corrupt" in what:
        folder = tmp_path / "corrupt"
        shutil.copytree(ens_dir, folder)
        data = (folder / "members.safetensors").read_bytes()
        (folder / "members.safetensors").write_bytes(data[: len(data) // 2])
    tmp = tempfile.mkdtemp(prefix="fst", dir="/tmp")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = (["attack", "--ensemble", str(folder), "--config", str(Path(__file__).parents[2] / "jobs/configs/"
                                                                      "ensemble_digits.yaml")]
                if what.startswith("attack") else
                ["serve", "--ensemble", str(folder), "--port", str(port if "port" in what else free_port())])
        try:
            rc, err, seconds = _cli(argv, tmp)
            ray_files = os.listdir(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err[-3000:]
    assert err.startswith("fipray: error: ")
    if "corrupt" in what:
        assert str(folder / "members.safetensors") in err and "SHA-256 mismatch" in err, err
    else:
        assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err, err
    assert ray_files == []  # Ray never started (it would have made its session folder here)
    print(json.dumps({"startup_refusal": what, "seconds": round(seconds, 1)}))
    assert seconds < 30  # seconds of Python imports; Ray and Serve starting took 25-35 s before the refusal


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig, how", [
    pytest.param(signal.SIGTERM, "ensemble", marks=pytest.mark.heavy),  # 25 s: a corrupt SIGHUP, a switch, a stop
    pytest.param(signal.SIGTERM, "direct", marks=pytest.mark.heavy),  # --direct-port: the ingress replica answers HTTP itself, beside the proxy
    pytest.param(signal.SIGINT, "config", marks=pytest.mark.slow),  # the same path; a Serve config file
])
def test_fipray_serve_stopped_by_signal_leaves_no_ray_process(ens_dir, sig, how, tmp_path):
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="fsg", dir="/tmp")  # short: Ray's socket paths stay < 107 characters
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    if how == "config":
        cfg = tmp_path / "serve.yaml"
        cfg.write_text(json.dumps({"http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 20},
                                   "applications": [{"name": "fipray", "route_prefix": "/",
                                                     "import_path": "fipray.ray.serve:build_app",
                                                     "args": {"ensemble": str(ens_dir), "shards": 2}}]}))
        what = ["--config", str(cfg)]
    else:
        # The ensemble variant serves through a symlink and re-points it under SIGHUP (README's live switch).
        link = tmp_path / "current"
        link.symlink_to(ens_dir)
        what = ["--ensemble", str(link), "--port", str(port)]
    direct = free_port() if how == "direct" else None
    if direct is not None:
        what += ["--direct-port", str(direct)]
    proc = subprocess.Popen([sys.executable, "-m", "fipray.cli", "serve", *what], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    ray_procs: Any = []
    try:
        deadline, up = time.time() + 120, False
        while time.time() < deadline and proc.poll() is None and not up:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                up = conn.getresponse().status == 200
                conn.close()
            except OSError:
                time.sleep(1.0)
        assert up, proc.stdout.read().decode()[-2000:] if proc.poll() is not None else "server did not come up"
        if direct is not None:
            body = json.dumps({"inputs": torch.rand(3, *SHAPE).tolist()}).encode()
            via_proxy, via_direct = _post(port, body), _post(direct, body)
            assert via_proxy[0] == via_direct[0] == 200, (via_proxy, via_direct)
            assert json.loads(via_direct[1]) == json.loads(via_proxy[1])  # the same replica answers both
            status, text = _post(direct, b'{"inputs": [[1, 2]]}')
            assert status == 400 and b"shape" in text, (status, text)
        if how == "ensemble":
            _switch_by_sighup(proc, port, link, tmp_path)
        # Its process tree, and anything naming its private Ray folder (a daemonised process would not be in the tree).
        ray_procs = {p.pid: p for p in _descendants(proc.pid) + processes_mentioning(tmp)}.values()
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_procs)
        proc.send_signal(sig)
        assert proc.wait(90) == 0
        deadline = time.time() + 30
        alive = list(ray_procs)
        while alive and time.time() < deadline:
            alive = [p for p in alive if _alive(p)]
            time.sleep(0.5)
        alive += [p for p in processes_mentioning(tmp) if _alive(p)]
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in ray_procs:  # whatever a failed run left behind
            if _alive(p):
                p.kill()
        import shutil

        shutil.rmtree(Path(tmp), ignore_errors=True)
