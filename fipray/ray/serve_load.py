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
    content_type: str = "application/json",
    timeline: bool = False,
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
        content_type: The bodies' ``Content-Type`` (``application/octet-stream`` for ``.npy`` bodies).
        timeline: Also return ``"timeline"``: per request ``(start_s, seconds, status)`` from the
            test's start, status 0 for a transport error (what fault tests read recovery from).

    Returns:
        ``{"requests", "ok", "errors", "error_samples", "error_statuses", "seconds", "throughput_rps",
        "examples_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "max_any_ms", "concurrency",
        "stopped_by_time_limit"}`` (``max_any_ms``: the slowest request, failed ones included).

    Raises:
        ValueError: a non-loopback URL, no bodies, or non-positive bounds.
    """
    host, port, path = _loopback_target(url)
    if not bodies or requests < 1 or concurrency < 1 or not time_limit_s > 0:
        raise ValueError("need bodies, requests >= 1, concurrency >= 1 and time_limit_s > 0")
    load = _Load(requests, time_limit_s)
    t_start = load.t0
    threads = [threading.Thread(target=_client, args=(load, host, port, path, bodies, timeout_s, content_type),
                                daemon=True)
               for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_limit_s + timeout_s + 5)
    seconds = time.perf_counter() - t_start
    out = _summary(load, seconds, concurrency=concurrency, examples_per_request=examples_per_request)
    if timeline:
        out["timeline"] = sorted(load.timeline)
    return out


def _loopback_target(url: str) -> tuple[str, int, str]:
    """``(host, port, path)`` of ``url``, refusing any host but loopback so a test never loads a real server."""
    parts = urlsplit(url)
    if parts.hostname not in _LOOPBACK:
        raise ValueError(f"the load test only targets loopback addresses, got {parts.hostname!r}")
    return parts.hostname, parts.port or 80, parts.path or "/"


class _Load:
    """State the client threads share: the next request index, the deadline, and what was measured."""

    def __init__(self, requests: int, time_limit_s: float):
        self.lock = threading.Lock()
        self.requests = requests
        self.next = 0
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.statuses: dict[int, int] = {}
        self.timeline: list[tuple[float, float, int]] = []
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + time_limit_s

    def claim(self) -> int | None:
        """The next request's index, or None once all are sent or time is up."""
        with self.lock:
            i = self.next
            if i >= self.requests or time.perf_counter() > self.deadline:
                return None
            self.next = i + 1
            return i

    def record(self, status: int, started: float, seconds: float, data: bytes) -> None:
        """Keep a success's latency, or the start of a failure's body as an error sample."""
        with self.lock:
            self.timeline.append((started - self.t0, seconds, status))
            if status == 200:
                self.latencies.append(seconds)
            else:
                self.errors.append(data[:200].decode(errors="replace"))
                self.statuses[status] = self.statuses.get(status, 0) + 1


def _client(load: _Load, host: str, port: int, path: str, bodies: Sequence[bytes], timeout_s: float,
            content_type: str) -> None:
    """One client thread: POST claimed bodies over one keep-alive connection, reconnecting after an error."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    headers = {"Content-Type": content_type}
    try:
        while (i := load.claim()) is not None:
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                status, data = 0, f"{type(e).__name__}: {e}".encode()
                # The connection may be half-used after a failure; a fresh one keeps later requests clean.
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
            load.record(status, t0, time.perf_counter() - t0, data)
    finally:
        conn.close()


def _summary(load: _Load, seconds: float, *, concurrency: int, examples_per_request: int) -> dict:
    """The result dict of :func:`load_test` (latency percentiles in ms are NaN when nothing succeeded)."""
    latencies, errors = load.latencies, load.errors
    lat = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    sent = load.next
    return {
        "requests": sent,
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "error_statuses": dict(load.statuses),
        "seconds": seconds,
        "throughput_rps": len(latencies) / seconds,
        "examples_per_s": len(latencies) * examples_per_request / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "max_any_ms": max((t[1] for t in load.timeline), default=float("nan")) * 1e3,
        "concurrency": concurrency,
        "stopped_by_time_limit": sent < load.requests,
    }
