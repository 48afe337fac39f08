"""Serve an ensemble of path-sampled networks over HTTP with Ray Serve, members sharded over actors.

Deployments (built by :func:`build_app` from validated :class:`~fipray.serving.ServeArgs`):

- ``EnsembleShard`` (``shards`` > 1): holds a contiguous block of members, stacked so one call
  evaluates all of them, and returns their softmax sum (in log space) and, on request, its
  vector-Jacobian product. Each shard may ask for a GPU (``gpus_per_shard``).
- ``EnsembleIngress``: the HTTP entry point. ``POST /predict`` validates the body, merges concurrent
  requests with ``@serve.batch``, fans the batch out to the shards and combines their parts into
  log(mean softmax). With ``shards`` = 1 the ingress holds the members itself: one deployment, no
  composition hop (measured ~2.4x the throughput of ingress + 2 shards here, RAY_NOTES.md).
  ``GET /healthz``, ``GET /metadata``. Attack clients call ``log_probs_parts`` / ``vjp`` through a
  Ray handle (``fipray.ray.attack``).

Started by ``fipray serve --ensemble DIR [--shards S] [--port PORT]`` (HTTP on 127.0.0.1 unless
``--host`` says otherwise), or from a Serve config file::

    # serve run serve.yaml   (RAY_USAGE_STATS_ENABLED=0 offline)
    http_options: {host: 127.0.0.1, port: 8011}
    applications:
      - name: fipray
        route_prefix: /
        import_path: fipray.ray.serve:build_app
        args: {ensemble: runs/ensemble/ensembles/fip_seed0, shards: 2}
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from fipray.ensemble import read_ensemble_meta
from fipray.serving import (
    BadRequest,
    ServeArgs,
    ShardEngine,
    combine_log_parts,
    metadata_doc,
    parse_predict_body,
    shard_upstreams,
    split_members,
)


@serve.deployment(max_ongoing_requests=16)
class EnsembleShard:
    """A block of members behind a Ray actor (pure engine: :class:`ShardEngine`)."""

    def __init__(self, directory: str, member_ids: list[int], threads: int = 1, device: str = "cpu"):
        self.engine = ShardEngine(directory, member_ids, device=device, threads=threads)

    def log_prob_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine.log_prob_sum(x)

    def log_prob_sum_vjp(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine.log_prob_sum_vjp(x, u)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment
class EnsembleIngress:
    """HTTP ingress and aggregator. ``shards`` is a list of shard handles, or empty to hold the members."""

    def __init__(self, args: dict[str, Any], shards: list[Any]):
        self.args = ServeArgs(**args)
        self.shards = list(shards)
        if self.shards:
            self.local = None
            self.meta = read_ensemble_meta(self.args.ensemble)
        else:
            device = "cuda" if self.args.gpus_per_shard > 0 else "cpu"
            self.local = ShardEngine(self.args.ensemble, device=device, threads=self.args.threads)
            self.meta = self.local.meta
        self.num_members = self.meta["num_members"]
        self.input_shape = tuple(self.meta["model_spec"]["input_shape"])
        self.metadata = metadata_doc(self.meta, max(1, len(self.shards)))
        self._predict.set_max_batch_size(self.args.max_batch_requests)  # type: ignore[attr-defined]
        self._predict.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)  # type: ignore[attr-defined]

    # --- the maths, used by HTTP and by attack clients through a handle ---------------------------
    async def log_probs_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log(mean softmax) ``(B, C)`` and the shards' log softmax sums ``(S, B, C)``."""
        if self.local is not None:
            # Off the event loop, so the replica keeps parsing (and batching) requests meanwhile.
            parts = (await asyncio.to_thread(self.local.log_prob_sum, x)).unsqueeze(0)
        else:
            parts = torch.stack(await asyncio.gather(*(s.log_prob_sum.remote(x) for s in self.shards)))
        return combine_log_parts(parts, self.num_members), parts

    async def vjp(self, x: torch.Tensor, g: torch.Tensor, parts: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``∇ₓ ⟨g, log p(x)⟩`` ``(B, *input_shape)`` assembled from the shards' VJPs.

        ``parts`` (from :meth:`log_probs_parts` on the same ``x``) saves the first round; without it
        the shards' sums are computed here first.
        """
        if parts is None:
            _, parts = await self.log_probs_parts(x)
        u = shard_upstreams(parts, g)
        if self.local is not None:
            return (await asyncio.to_thread(self.local.log_prob_sum_vjp, x, u[0]))[1]
        outs = await asyncio.gather(*(s.log_prob_sum_vjp.remote(x, u[i]) for i, s in enumerate(self.shards)))
        return torch.stack([grad for _, grad in outs]).sum(0)

    async def info(self) -> dict[str, Any]:
        return self.metadata

    # --- HTTP ------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _predict(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        logp, _ = await self.log_probs_parts(torch.cat(batches))
        return list(logp.split([len(b) for b in batches]))

    async def _read_body(self, request: Request) -> bytes:
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"request body of {declared} bytes exceeds the limit of {limit} bytes", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # chunked bodies carry no length: stop reading at the limit
                raise BadRequest(f"request body exceeds the limit of {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def __call__(self, request: Request) -> JSONResponse:
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/predict": "POST", "/healthz": "GET", "/metadata": "GET"}
        if path not in routes:
            return _error(404, f"unknown path {path!r}; use POST /predict, GET /healthz or GET /metadata")
        if method != routes[path]:
            return _error(405, f"{path} accepts {routes[path]} only, got {method}")
        if path == "/healthz":
            return JSONResponse({"status": "ok", "members": self.num_members})
        if path == "/metadata":
            return JSONResponse(self.metadata)
        try:
            body = await self._read_body(request)
            x = parse_predict_body(
                body, self.input_shape, max_inputs=self.args.max_inputs, max_body_bytes=self.args.max_body_bytes
            )
        except BadRequest as e:
            return _error(e.status, str(e))
        logp = await self._predict(x)
        probs = logp.exp()
        return JSONResponse(
            {"labels": logp.argmax(-1).tolist(), "probs": probs.tolist(), "members": self.num_members}
        )


def build_app(args: Mapping[str, Any]):
    """Serve application builder: ``import_path: fipray.ray.serve:build_app`` with ``args`` (ServeArgs keys).

    Raises:
        ValueError: an unknown or badly typed arg, a missing ensemble folder, or more shards than members.
    """
    a = ServeArgs.from_dict(args)
    n = read_ensemble_meta(a.ensemble)["num_members"]
    blocks = split_members(n, a.shards)
    shards = []
    if a.shards > 1:
        for i, ids in enumerate(blocks):
            device = "cuda" if a.gpus_per_shard > 0 else "cpu"
            shards.append(
                EnsembleShard.options(  # type: ignore[attr-defined]
                    name=f"EnsembleShard{i}",
                    ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": a.gpus_per_shard},
                ).bind(a.ensemble, ids, a.threads, device)
            )
    ingress_gpus = a.gpus_per_shard if a.shards == 1 else 0.0
    return EnsembleIngress.options(  # type: ignore[attr-defined]
        max_ongoing_requests=a.max_ongoing_requests,
        ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": ingress_gpus},
    ).bind(_asdict(a), shards)


def _asdict(a: ServeArgs) -> dict[str, Any]:
    return dataclasses.asdict(a)


def start(
    args: Mapping[str, Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    http: bool = True,
):
    """Deploy the app on the running Ray instance and return a handle to its ingress.

    Args:
        args: ServeArgs keys (``ensemble`` required).
        host: HTTP bind address (loopback unless asked otherwise).
        port: HTTP port.
        http: Expose HTTP (False: handle-only, e.g. for ``fipray attack``).

    Returns:
        A ``DeploymentHandle`` of the ingress.
    """
    a = ServeArgs.from_dict(args)
    if http:
        serve.start(http_options={"host": host, "port": int(port)})
    return serve.run(build_app(_asdict(a)), name=a.name, route_prefix="/" if http else None, blocking=False)


def main_serve(args: Mapping[str, Any], *, host: str, port: int, address: str | None = None,
               smoke_test: bool = False) -> int:
    """``fipray serve``: start local Ray (or join ``address``), deploy, wait for Ctrl-C, shut down.

    With ``smoke_test`` it answers one ``/predict`` request (zeros of the members' input shape) over
    HTTP on ``host:port``, prints the answer and shuts down instead of waiting.
    """
    import signal

    import ray

    from fipray.ray._local import init_local

    ServeArgs.from_dict(args)  # bad args fail before Ray starts
    started = not ray.is_initialized()  # the Ray this call starts, it also stops
    init_local(address=address)

    def _stop(signum, frame):  # SIGTERM shuts Serve and Ray down like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)

    try:
        start(args, host=host, port=port)
        url = f"http://{host}:{port}"
        print(json.dumps({"url": url, "predict": f"{url}/predict", "healthz": f"{url}/healthz",
                          "metadata": f"{url}/metadata"}), flush=True)
        if smoke_test:
            print(json.dumps(_smoke_request(url, ServeArgs.from_dict(args).ensemble)), flush=True)
            return 0
        print("serving; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return 0


def _smoke_request(url: str, ensemble: str) -> dict[str, Any]:
    """POST one all-zeros input to ``url``/predict; the answer's labels and shape."""
    import urllib.request

    shape = read_ensemble_meta(ensemble)["model_spec"]["input_shape"]
    body = json.dumps({"inputs": [np.zeros(shape).tolist()]}).encode()
    req = urllib.request.Request(f"{url}/predict", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    return {"smoke_test": "ok", "status": 200, "labels": answer["labels"], "members": answer.get("members")}
