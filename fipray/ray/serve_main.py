"""The ``fipray serve`` process: check its arguments, start (or join) Ray, deploy, serve until a signal.

Each piece has one job: :func:`main_serve` strings them together; the checks that must fail before Ray
starts (the ensemble folder verified whole, the metrics port, the HTTP and direct-ingress ports probed),
the URLs printed at start-up, the signal handlers (:class:`ServeSignals`: SIGTERM and SIGINT stop, SIGHUP
re-reads the ensemble folder: :func:`switch_to_current_folder`, which never takes the server down), the
serve loop, the smoke test and the shutdown. The deployments and the app they form are
:mod:`fipray.ray.serve` (its docstring describes live switches and backpressure).

Direct ingress (``--direct-port PORT``): the ingress replica answers HTTP itself on ``PORT`` (Ray Serve's
``RAY_SERVE_ENABLE_DIRECT_INGRESS`` in its throughput-optimised mode, ``direct_ingress_env``), skipping the
proxy. Profiled with one input per request (py-spy, per-process CPU): the proxy costs ~6 ms of CPU per
request and the replica ~4 ms more fetching the body back from it; a direct request ~4 ms in all
(``benchmarks/bench_serve.py``: 2x the throughput of 1-input ``.npy`` requests). Limits (Ray marks the
feature limited): one ingress replica, ``PORT`` free, Ray started by ``fipray serve`` (the settings are
environment variables of Ray's processes). A live switch keeps the replica, so ``PORT`` stays up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

from fipray.config import ConfigError, read_yaml_mapping
from fipray.ensemble_folder import fetch_ensemble, local_ensemble, read_ensemble_meta
from fipray.ray.local import init_local
from fipray.ray.serve import direct_ingress_env, failure_cause, start, update_ensemble
from fipray.serving_args import ServeArgs
from fipray.uri import display, is_uri

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main_serve(args: Mapping[str, Any], *, host: str, port: int, address: str | None = None,
               smoke_test: bool = False, metrics_port: int | None = None, direct_port: int | None = None) -> int:
    """``fipray serve``: start local Ray (or join ``address``), deploy, wait for a signal, shut down.

    SIGTERM, SIGINT and SIGHUP are handled: the first two shut Serve and the Ray this call started
    down (no Ray process is left behind); SIGHUP re-reads ``args["ensemble"]`` (e.g. a symlink
    pointed at a new folder, or a URI whose objects were replaced) and switches to it without dropping
    requests. ``args["ensemble"]`` may be a URI (``s3://``, ``gs://``; ``fipray.ensemble_folder.fetch_ensemble``). With ``smoke_test`` it
    answers one ``/predict`` request (zeros of the members' input shape) over HTTP on
    ``host:port``, prints the answer and shuts down instead of waiting. ``metrics_port`` exposes
    Ray's Prometheus metrics (Serve's ``ray_serve_*`` included) on that port of the local Ray (bound by
    Ray: loopback when the node's address is loopback, else every interface). ``direct_port``: the
    ingress replica also answers on ``host:direct_port`` without the proxy (``fipray.ray.serve``'s
    module docstring).
    """
    a = ServeArgs.from_dict(args)  # bad args, and a folder that cannot be served, fail before Ray starts
    fetch_ensemble(a.ensemble)  # a URI: copied into this node's cache, then verified whole (errors name the URI)
    check_metrics_port(metrics_port, address)
    if not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        probe_port(host, port, "--port")  # a Serve already running keeps its own proxy
    if direct_port is not None:
        os.environ.update(direct_port_env(a, host, direct_port, address))
    started = not ray.is_initialized()  # the Ray this call starts, it also stops
    extra: dict[str, Any] = {"_metrics_export_port": int(metrics_port)} if metrics_port else {}
    init_local(address=address, **extra)
    signals = ServeSignals()
    try:
        start(args, host=host, port=port)
        print(json.dumps(serve_urls(host, port, metrics_port, direct_port)), flush=True)
        if smoke_test:
            run_smoke_test(a.ensemble, host, port, direct_port)
            return 0
        print("serving; Ctrl-C or SIGTERM stops, SIGHUP re-reads the ensemble folder", flush=True)
        serve_until_stopped(args, signals.reload)
    except KeyboardInterrupt:
        pass
    finally:
        shut_down(signals, started)
    return 0


def check_metrics_port(metrics_port: int | None, address: str | None) -> None:
    """Refuse ``--metrics-port`` on a joined cluster (its nodes export metrics on their own port)."""
    if metrics_port and (address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError("--metrics-port sets up the local Ray that fipray serve starts; a cluster joined with "
                          "--address/RAY_ADDRESS exports metrics on the port its nodes were started with")


def direct_port_env(a: ServeArgs, host: str, direct_port: int, address: str | None) -> dict[str, str]:
    """The environment of direct ingress on ``direct_port``, after checking it can be served here.

    The user's arguments first (range, autoscaling), then the state of this process's Ray, then the port.
    """
    direct_env = direct_ingress_env(int(direct_port))  # checks the port's range
    if a.ingress_autoscaling:
        raise ConfigError("--direct-port serves from exactly one ingress replica; drop ingress_autoscaling")
    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        raise ConfigError("--direct-port configures the local Ray that fipray serve starts; on a running Ray or "
                          "cluster set the environment of fipray.ray.serve.direct_ingress_env on its nodes")
    probe_port(host, direct_port, "--direct-port")
    return direct_env


def probe_port(host: str, port: int, flag: str) -> None:
    """Refuse a port (of option ``flag``) this machine cannot listen on (taken, or a foreign address).

    Binds as Serve's proxy does (no ``SO_REUSEADDR``), so what the probe refuses the proxy would fail on
    too, after Ray had started.
    """
    with socket.socket() as probe:
        try:
            probe.bind((host, int(port)))
        except OSError as e:
            raise ConfigError(f"{flag} {port}: cannot listen on {host}:{port} ({e})") from None


def serve_urls(host: str, port: int, metrics_port: int | None, direct_port: int | None) -> dict[str, str]:
    """The URLs printed at start-up: the app's routes, and the metrics and direct-ingress ones when asked for."""
    url = f"http://{host}:{port}"
    urls = {"url": url, "predict": f"{url}/predict", "healthz": f"{url}/healthz", "metadata": f"{url}/metadata"}
    if metrics_port:
        urls["metrics"] = f"http://127.0.0.1:{metrics_port}/metrics"
    if direct_port is not None:
        urls["direct_predict"] = f"http://{host}:{direct_port}/predict"
    return urls


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


class ServeSignals:
    """The process's handlers while it serves: SIGTERM stops like Ctrl-C does, SIGHUP sets :attr:`reload`.

    The handlers found at construction are kept; :meth:`restore` puts them back.
    """

    def __init__(self) -> None:
        self.reload = threading.Event()
        self.saved = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # SIGTERM stops like Ctrl-C does
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reload.set())

    def ignore_stops(self) -> None:
        """Ignore SIGTERM and SIGINT: a second signal must not cut the shutdown short."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def serve_until_stopped(args: Mapping[str, Any], reload: threading.Event) -> None:
    """Wait for signals forever (a stop arrives as KeyboardInterrupt); each ``reload`` switches the folder."""
    while True:
        if reload.wait(3600):
            reload.clear()
            switch_to_current_folder(args)


def switch_to_current_folder(args: Mapping[str, Any]) -> None:
    """Switch to ``args["ensemble"]`` as it resolves now; on any failure keep serving the old one. Prints which.

    Prints ``{"switched_to": folder, "members_sha256": ...}`` once the ingress serves the verified folder, else
    ``{"switch_failed": cause, "serving": folder}`` (:func:`~fipray.ray.serve.update_ensemble` touches nothing
    for a folder that fails verification, and sets a switch the ingress could not load back).
    """
    try:
        # The folder as of now (a symlink re-pointed since start-up), not the one resolved at start-up.
        target = ServeArgs.from_dict(args)
        update_ensemble(dataclasses.asdict(target))
        state = serve.get_app_handle(target.name).state.remote().result()
        print(json.dumps({"switched_to": shown(state["ensemble"]), "members_sha256": state["members_sha256"]}),
              flush=True)
    except Exception as e:  # whatever failed, the server keeps answering with the ensemble it had
        print(json.dumps({"switch_failed": failure_cause(e), "serving": serving_folder(args)}), flush=True)


def serving_folder(args: Mapping[str, Any]) -> str | None:
    """The folder (or URI, :func:`shown`) the app answers from now (None if it cannot be asked)."""
    try:
        return shown(serve.get_app_handle(str(args.get("name", "fipray"))).state.remote().result(timeout_s=30)[
            "ensemble"])
    except Exception:  # the report of a failed switch must not fail itself
        return None


def shown(folder: str | None) -> str | None:
    """A folder as printed: a URI without credentials or query options (:func:`fipray.uri.display`)."""
    return display(folder) if folder and is_uri(folder) else folder


def shut_down(signals: ServeSignals, started: bool) -> None:
    """Shut Serve down, then the Ray this process started (if it did), then restore the signal handlers."""
    signals.ignore_stops()
    try:
        serve.shutdown()
    finally:
        if started:
            ray.shutdown()
        signals.restore()


def run_smoke_test(ensemble: str, host: str, port: int, direct_port: int | None) -> None:
    """One request through the proxy (and one to the direct-ingress port, when served); prints the answers."""
    print(json.dumps(smoke_request(f"http://{host}:{port}", ensemble)), flush=True)
    if direct_port is not None:
        direct = smoke_request(f"http://{host}:{direct_port}", ensemble)
        print(json.dumps({**direct, "direct": True}), flush=True)


def smoke_request(url: str, ensemble: str) -> dict[str, Any]:
    """POST one all-zeros input to ``url``/predict; the answer's labels and shape."""
    import urllib.request

    shape = read_ensemble_meta(local_ensemble(ensemble))["model_spec"]["input_shape"]
    body = json.dumps({"inputs": [np.zeros(shape, dtype=np.int64).tolist()]}).encode()
    req = urllib.request.Request(f"{url}/predict", data=body, headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    return {"smoke_test": "ok", "status": 200, "labels": answer["labels"], "members": answer.get("members"),
            "seconds": round(time.perf_counter() - t0, 3)}


def args_from_serve_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fipray app's ``args`` (with its ``name``) and the ``http_options`` of a Serve config file.

    Raises:
        ConfigError: not a mapping with one application whose import_path is ``fipray.ray.serve:build_app``.
    """
    doc = read_yaml_mapping(path)
    apps = [a for a in doc.get("applications") or [] if isinstance(a, dict)
            and a.get("import_path") == "fipray.ray.serve:build_app"]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected exactly one application with import_path "
                          f"fipray.ray.serve:build_app under 'applications', found {len(apps)}")
    args = dict(apps[0].get("args") or {})
    if "name" in apps[0]:
        args.setdefault("name", apps[0]["name"])
    http = doc.get("http_options") or {}
    if not isinstance(http, dict):
        raise ConfigError(f"{path}: 'http_options' must be a mapping")
    if "request_timeout_s" in http:
        args.setdefault("request_timeout_s", http["request_timeout_s"])
    return args, http
