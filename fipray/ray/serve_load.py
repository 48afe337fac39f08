"""A bounded HTTP load test for the ensemble server: fixed request count, time limit, loopback only.

Threads with one keep-alive connection each send ``POST /predict`` bodies until ``requests`` have
been sent or ``time_limit_s`` has passed, whichever comes first, so the test always stops by itself.
No Ray here: it is a plain client of the HTTP API.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import numpy as np

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_test(
    url: str,
    bodies: Sequence[bytes],
    *,
    requests: int = 500,
    concurrency: int = 8,
    time_limit_s: float = 120.0,
    timeout_s: float = 30.0,
    examples_per_request: int = 1,
) -> dict:
    """Send ``requests`` POSTs (body ``i`` = ``bodies[i % len(bodies)]``) with ``concurrency`` clients.

    Args:
        url: The ``/predict`` URL; its host must be a loopback address.
        bodies: JSON bodies to cycle through.
        requests: Total requests (the bound).
        concurrency: Client threads, each with one keep-alive connection.
        time_limit_s: Wall-clock bound; requests not started by then are not sent.
        timeout_s: Per-request socket timeout.
        examples_per_request: Inputs per body, for the examples/s figure.

    Returns:
        ``{"requests", "ok", "errors", "error_samples", "seconds", "throughput_rps", "examples_per_s",
        "p50_ms", "p90_ms", "p99_ms", "max_ms", "concurrency", "stopped_by_time_limit"}``.

    Raises:
        ValueError: a non-loopback URL, no bodies, or non-positive bounds.
    """
    parts = urlsplit(url)
    if parts.hostname not in _LOOPBACK:
        raise ValueError(f"the load test only targets loopback addresses, got {parts.hostname!r}")
    if not bodies or requests < 1 or concurrency < 1 or not time_limit_s > 0:
        raise ValueError("need bodies, requests >= 1, concurrency >= 1 and time_limit_s > 0")
    host, port, path = parts.hostname, parts.port or 80, parts.path or "/"
    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + time_limit_s

    def claim() -> int | None:
        with lock:
            i = state["next"]
            if i >= requests or time.perf_counter() > deadline:
                return None
            state["next"] = i + 1
            return i

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        try:
            while (i := claim()) is not None:
                body = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try:
                    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    ok = resp.status == 200
                except (OSError, http.client.HTTPException) as e:
                    ok, data = False, f"{type(e).__name__}: {e}".encode()
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors.append(data[:200].decode(errors="replace"))
        finally:
            conn.close()

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_limit_s + timeout_s + 5)
    seconds = time.perf_counter() - t_start
    lat = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    sent = state["next"]
    return {
        "requests": sent,
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": seconds,
        "throughput_rps": len(latencies) / seconds,
        "examples_per_s": len(latencies) * examples_per_request / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "concurrency": concurrency,
        "stopped_by_time_limit": sent < requests,
    }
