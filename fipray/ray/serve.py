"""Serve an ensemble of path-sampled networks over HTTP with Ray Serve, members sharded over actors.

Deployments (built by :func:`build_app` from validated :class:`~fipray.serving_args.ServeArgs`):

- ``EnsembleShard`` (``shards`` > 1): evaluates a contiguous block of members, stacked so one call
  evaluates all of them, and returns their softmax sum (in log space) and, on request, its
  vector-Jacobian product. Every call names the ensemble version it wants (folder, checksum, member
  ids); a shard loads a version the first time it is asked for it and keeps the last two
  (:class:`~fipray.serving.EngineCache`), so an answer never mixes two ensembles, a live switch
  needs no shard restart, and a replica Serve restarted after a crash serves whatever it is asked.
  Each shard may ask for a GPU (``gpus_per_shard``).
- ``EnsembleIngress``: the HTTP entry point. ``POST /predict`` validates the body (JSON inputs, JSON
  texts for text ensembles, or a binary ``.npy``; :func:`~fipray.serving_requests.parse_request`), merges
  concurrent requests with ``@serve.batch``, fans the batch out to the shards and combines their
  parts into log(mean softmax). With ``shards`` = 1 the ingress holds the members itself: one
  deployment, no composition hop (measured ~2.4x the throughput of ingress + 2 shards here,
  RAY_NOTES.md). ``GET /healthz``, ``GET /metadata`` (which folder and checksum answer). Attack
  clients call ``log_probs_parts`` / ``vjp`` through a Ray handle (``fipray.ray.attack``).

Which ensemble answers is the ingress's ``user_config`` (``{"ensemble": folder}``): Serve calls
``reconfigure`` with it, which loads the new version (warming the shards) beside the old one and
then switches atomically; requests admitted before the switch finish on the old version.
:func:`update_ensemble` redeploys the app with a new folder; a Serve config whose ``args.ensemble``
changes does the same through ``serve deploy``. The deployments carry a code version made of the
serving code and every arg but the folder (:mod:`fipray.ray.serve_version`), so a switch changes only
``user_config`` and Serve reconfigures the running replicas in place: no replica is replaced
(shards included), a switch takes about a second instead of a rolling restart's 6-12 s.

Backpressure: each deployment queues at most ``max_queued_requests`` per caller; beyond that the
proxy answers 503 with ``Retry-After`` (Serve's ``backpressure_config``), and a shard's refusal
reaches the client as the same 503. No request waits past ``request_timeout_s`` (504). A shard
that dies mid-request gives 503 at once; Serve restarts it (``health_check_period_s``).

Direct ingress (``fipray serve --direct-port PORT``): the ingress replica answers HTTP itself on
``PORT`` (Ray Serve's ``RAY_SERVE_ENABLE_DIRECT_INGRESS`` with its throughput-optimised settings,
:func:`direct_ingress_env`), skipping the proxy actor. Profiled with one input per request (py-spy
and per-process CPU): the proxy costs ~6 ms of CPU per request and the replica ~4 ms more fetching
each request's body back from the proxy (ASGI receive calls); a direct request costs ~4 ms in all.
``benchmarks/bench_serve.py``: 2x the throughput of 1-input ``.npy`` requests (0.64 vs 0.32 of the
in-process ensemble's). The proxy keeps serving ``--port`` beside it. Limits (Ray's feature is
marked limited): exactly one ingress replica (no ingress autoscaling), ``PORT`` must be free, and it
needs Ray started by ``fipray serve`` (the settings are environment variables of Ray's processes; on
a cluster set them on every node). A live switch keeps the replica (see below), so ``PORT`` stays up.

Started by ``fipray serve --ensemble DIR [--shards S] [--port PORT]`` (HTTP on 127.0.0.1 unless
``--host`` says otherwise; the process, its signals and its smoke test are :mod:`fipray.ray.serve_main`),
from Python with :func:`start`, or from a Serve config file::

    # serve run serve.yaml   (RAY_USAGE_STATS_ENABLED=0 offline)
    http_options: {host: 127.0.0.1, port: 8011, request_timeout_s: 30}
    applications:
      - name: fipray
        route_prefix: /
        import_path: fipray.ray.serve:build_app
        args: {ensemble: runs/ensemble/ensembles/fip_seed0, shards: 2,
               shard_autoscaling: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 4}}
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.config import AutoscalingConfig, BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse

from fipray.config import ConfigError
from fipray.ensemble_folder import read_ensemble_meta, tokenizer_dir
from fipray.ray.serve_version import code_version
from fipray.serving import EngineCache, ShardEngine, combine_log_parts, shard_upstreams, split_members
from fipray.serving_args import ServeArgs
from fipray.serving_requests import BadRequest, InputSpec, metadata_doc, parse_request

Version = tuple[str, str, tuple[int, ...]]  # (folder, members_sha256, member ids)


@serve.deployment(max_ongoing_requests=16)
class EnsembleShard:
    """A block of members behind a Ray actor, by version (pure engines: :class:`EngineCache`)."""

    def __init__(self, threads: int = 1, device: str = "cpu"):
        self.cache = EngineCache(device=device, threads=threads)
        self._lock = threading.Lock()  # sync methods may run in a thread pool: load a version once

    def _engine(self, version: Version) -> ShardEngine:
        with self._lock:
            return self.cache.get(*version)

    def prepare(self, version: Version) -> dict[str, Any]:
        """Load ``version`` now (a switch warms the shards) and say what its members take."""
        return self._engine(version).input_facts()

    def log_prob_sum(self, version: Version, x: torch.Tensor) -> torch.Tensor:
        return self._engine(version).log_prob_sum(x)

    def log_prob_sum_vjp(self, version: Version, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._engine(version).log_prob_sum_vjp(x, u)

    def info(self) -> dict[str, Any]:
        """This replica's process id and the versions it holds (fault tests kill the process)."""
        return {"pid": os.getpid(), "versions": [list(v[:2]) + [list(v[2])] for v in self.cache.versions()]}


@dataclass(frozen=True)
class _Active:
    """One ensemble version as the ingress serves it (replaced whole on a switch, never mutated)."""

    directory: str
    meta: dict
    blocks: list[tuple[int, ...]]
    local: ShardEngine | None
    spec: InputSpec
    metadata: dict

    @property
    def num_members(self) -> int:
        return int(self.meta["num_members"])

    def version(self, shard: int) -> Version:
        return (self.directory, self.meta["members_sha256"], self.blocks[shard])


def _error(status: int, message: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@serve.deployment
class EnsembleIngress:
    """HTTP ingress and aggregator. ``shards`` is a list of shard handles, or empty to hold the members.

    The ensemble folder comes from ``user_config`` (:meth:`reconfigure`); ``args`` holds the rest.
    """

    def __init__(self, args: dict[str, Any], shards: list[Any]):
        self.args = ServeArgs(**args)
        self.shards = list(shards)
        self.active: _Active | None = None
        self._switching = asyncio.Lock()
        self._predict.set_max_batch_size(self.args.max_batch_requests)  # type: ignore[attr-defined]
        self._predict.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)  # type: ignore[attr-defined]

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Switch to ``user_config["ensemble"]``: load it beside the current one, then swap atomically."""
        await self.switch(str(user_config["ensemble"]))

    async def switch(self, directory: str) -> dict[str, Any]:
        """Load ``directory`` (shards warmed first), then serve it; returns the new ``/metadata``."""
        async with self._switching:
            if self.active is not None and self.active.directory == directory and \
                    read_ensemble_meta(directory)["members_sha256"] == self.active.meta["members_sha256"]:
                return self.active.metadata
            meta = read_ensemble_meta(directory)
            blocks = [tuple(b) for b in split_members(meta["num_members"], max(1, len(self.shards)))]
            tok = tokenizer_dir(directory, meta)
            local = None
            if self.shards:
                version = (directory, meta["members_sha256"])
                facts = (await asyncio.gather(*(s.prepare.remote((*version, blocks[i]))
                                                for i, s in enumerate(self.shards))))[0]
            else:
                device = "cuda" if self.args.gpus_per_shard > 0 else "cpu"
                local = await asyncio.to_thread(ShardEngine, directory, device=device, threads=self.args.threads)
                facts = local.input_facts()
            a = self.args
            spec = InputSpec(tuple(meta["model_spec"]["input_shape"]), a.max_inputs, a.max_body_bytes,
                             tokens=facts["tokens"], vocab_size=facts["vocab_size"],
                             type_vocab_size=facts["type_vocab_size"], tokenizer=None if tok is None else str(tok),
                             truncate_texts=a.truncate_texts)
            doc = metadata_doc(meta, max(1, len(self.shards)), directory, spec)
            self.active = _Active(directory, meta, blocks, local, spec, doc)
            return doc

    # --- the maths, used by HTTP and by attack clients through a handle ---------------------------
    async def log_probs_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log(mean softmax) ``(B, C)`` and the shards' log softmax sums ``(S, B, C)`` (current ensemble)."""
        assert self.active is not None
        return await self._log_probs_parts(self.active, x)

    async def _log_probs_parts(self, active: _Active, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if active.local is not None:
            if x.shape[0] <= 4:  # a thread hop costs more than a tiny forward
                parts = active.local.log_prob_sum(x).unsqueeze(0)
            else:  # off the event loop, so the replica keeps parsing (and batching) requests meanwhile
                parts = (await asyncio.to_thread(active.local.log_prob_sum, x)).unsqueeze(0)
        else:
            parts = torch.stack(await asyncio.gather(
                *(s.log_prob_sum.remote(active.version(i), x) for i, s in enumerate(self.shards))))
        return combine_log_parts(parts, active.num_members), parts

    async def vjp(self, x: torch.Tensor, g: torch.Tensor, parts: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``∇ₓ ⟨g, log p(x)⟩`` ``(B, *input_shape)`` assembled from the shards' VJPs.

        ``parts`` (from :meth:`log_probs_parts` on the same ``x``) saves the first round; without it
        the shards' sums are computed here first.
        """
        active = self.active
        assert active is not None
        if parts is None:
            _, parts = await self._log_probs_parts(active, x)
        u = shard_upstreams(parts, g)
        if active.local is not None:
            return (await asyncio.to_thread(active.local.log_prob_sum_vjp, x, u[0]))[1]
        outs = await asyncio.gather(*(s.log_prob_sum_vjp.remote(active.version(i), x, u[i])
                                      for i, s in enumerate(self.shards)))
        return torch.stack([grad for _, grad in outs]).sum(0)

    async def info(self) -> dict[str, Any]:
        assert self.active is not None
        return self.active.metadata

    # --- HTTP ------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _predict(self, items: list[tuple[_Active, torch.Tensor]]) -> list[torch.Tensor]:
        # Requests admitted under different versions (a switch landed mid-batch) are computed apart.
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (active, _) in enumerate(items):
            groups.setdefault(id(active), []).append(i)
        for idx in groups.values():
            active = items[idx[0]][0]
            xs = [items[i][1] for i in idx]
            logp, _ = await self._log_probs_parts(active, torch.cat(xs))
            for i, part in zip(idx, logp.split([len(x) for x in xs])):
                out[i] = part
        return out

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
        path, root = request.url.path, request.scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix sees its own routes
            path = path[len(root):]
        path, method = path.rstrip("/") or "/", request.method
        routes = {"/predict": "POST", "/healthz": "GET", "/metadata": "GET"}
        if path not in routes:
            return _error(404, f"unknown path {path!r}; use POST /predict, GET /healthz or GET /metadata")
        if method != routes[path]:
            return _error(405, f"{path} accepts {routes[path]} only, got {method}")
        active = self.active  # this request is answered by this version, whatever switches meanwhile
        assert active is not None
        if path == "/healthz":
            return JSONResponse({"status": "ok", "members": active.num_members})
        if path == "/metadata":
            return JSONResponse(active.metadata)
        try:
            body = await self._read_body(request)
            x = parse_request(body, request.headers.get("content-type"), active.spec)
        except BadRequest as e:
            return _error(e.status, str(e))
        try:
            logp = await asyncio.wait_for(self._predict((active, x)), self.args.request_timeout_s)
        except TimeoutError:
            return _error(504, f"no answer within request_timeout_s={self.args.request_timeout_s:g} s",
                          self.args.retry_after_s)
        except BackPressureError:
            return _error(503, "a shard's queue is full; retry later", self.args.retry_after_s)
        except RayTaskError as e:  # a shard raised: a server-side failure, named
            return _error(500, f"a shard failed: {type(e.cause).__name__ if e.cause else 'error'}: {e.cause}")
        except (RayError, DeploymentUnavailableError, ReplicaUnavailableError) as e:
            return _error(503, f"a shard is unavailable ({type(e).__name__}); retry later", self.args.retry_after_s)
        return JSONResponse(
            {"labels": logp.argmax(-1).tolist(), "probs": logp.exp().tolist(), "members": active.num_members}
        )


def _autoscaling(where: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """``num_replicas`` / ``autoscaling_config`` options from a ServeArgs mapping ({} = one replica)."""
    if not value:
        return {"num_replicas": 1}
    unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
    if unknown:  # the config model itself ignores unknown keys: a typo would silently do nothing
        raise ConfigError(f"config key 'serve.{where}': unknown autoscaling option(s) {unknown}; valid: "
                          f"{', '.join(sorted(AutoscalingConfig.model_fields))}")
    try:
        AutoscalingConfig(**value)
    except Exception as e:  # pydantic's ValidationError names the bad field
        raise ConfigError(f"config key 'serve.{where}': {e}") from None
    return {"num_replicas": "auto", "autoscaling_config": dict(value)}


def _versioned(deployment: Any, version: str) -> Any:
    """``deployment`` carrying Serve code version ``version`` (:func:`~fipray.ray.serve_version.code_version`).

    Ray 2.60 removed ``version`` from ``Deployment.options``; the deployment's ``_version`` (which
    ``serve.run`` reads, else a random string) carries it (a test checks the replicas survive a
    switch, so a Ray that stops honouring it fails loudly).
    """
    deployment._version = version
    return deployment


def build_app(args: Mapping[str, Any]):
    """Serve application builder: ``import_path: fipray.ray.serve:build_app`` with ``args`` (ServeArgs keys).

    Raises:
        ValueError: an unknown or badly typed arg, a missing ensemble folder, more shards than members,
            or an invalid autoscaling mapping.
    """
    a = ServeArgs.from_dict(args)
    common = {"max_queued_requests": a.max_queued_requests, "health_check_period_s": a.health_check_period_s,
              "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=a.retry_after_s)}
    if not a.access_log:
        # Only then: a deployment's logging_config replaces the app's (a Serve config's log level, encoding).
        common["logging_config"] = {"enable_access_log": False}
    shards = []
    version = code_version(_asdict(a))
    if a.shards > 1:
        device = "cuda" if a.gpus_per_shard > 0 else "cpu"
        scaling = _autoscaling("shard_autoscaling", a.shard_autoscaling)
        for i in range(a.shards):
            shards.append(_versioned(
                EnsembleShard.options(  # type: ignore[attr-defined]
                    name=f"EnsembleShard{i}", **common, **scaling,
                    ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": a.gpus_per_shard},
                ), version).bind(a.threads, device))
    ingress_gpus = a.gpus_per_shard if a.shards == 1 else 0.0
    return _versioned(EnsembleIngress.options(  # type: ignore[attr-defined]
        max_ongoing_requests=a.max_ongoing_requests, **common, **_autoscaling("ingress_autoscaling",
                                                                              a.ingress_autoscaling),
        user_config={"ensemble": a.ensemble},
        ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": ingress_gpus},
    ), version).bind({**_asdict(a), "ensemble": ""}, shards)  # the folder comes from user_config (reconfigure) only


def _asdict(a: ServeArgs) -> dict[str, Any]:
    return dataclasses.asdict(a)


def direct_ingress_env(port: int) -> dict[str, str]:
    """Environment of a Ray whose Serve ingress replica answers HTTP itself on ``port``.

    Ray Serve's throughput-optimised mode (direct ingress, gRPC between deployments, user code on the
    replica's event loop), the ingress replica on ``port`` and no other (a taken port fails the replica
    rather than moving it), no quarantine of a released port (a restarted replica gets ``port`` back)
    and a 2 s drain on shutdown instead of 30 s. Must be in the environment before Ray starts.
    """
    if not 1 <= port <= 65534:
        raise ConfigError(f"--direct-port must be in 1..65534, got {port}")
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        # Ray's range excludes its maximum: exactly `port`, never another one silently.
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def start(
    args: Mapping[str, Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    http: bool = True,
    route_prefix: str = "/",
):
    """Deploy the app on the running Ray instance and return a handle to its ingress.

    Args:
        args: ServeArgs keys (``ensemble`` required).
        host: HTTP bind address (loopback unless asked otherwise).
        port: HTTP port.
        http: Expose HTTP (False: handle-only, e.g. for ``fipray attack``).
        route_prefix: Where the app's routes live (``/text`` serves ``/text/predict``).

    Returns:
        A ``DeploymentHandle`` of the ingress.
    """
    a = ServeArgs.from_dict(args)
    if http:
        # The proxy's logging: Serve applies it when this call starts Serve (a running Serve keeps its own).
        serve.start(http_options={"host": host, "port": int(port), "request_timeout_s": a.request_timeout_s},
                    logging_config=None if a.access_log else {"enable_access_log": False})
    return serve.run(build_app(_asdict(a)), name=a.name, route_prefix=route_prefix if http else None, blocking=False)


def update_ensemble(args: Mapping[str, Any], *, http: bool = True, route_prefix: str = "/"):
    """Point the running app ``args["name"]`` at ``args["ensemble"]`` without dropping requests.

    Redeploys the app with the new ServeArgs: Serve starts the new replicas, which load and warm the
    new version, before it drains the old ones; shards answer both versions meanwhile (every call
    names its version). Same arguments as :func:`start`'s ``args``; the shard count must not exceed
    the new ensemble's members.

    Returns:
        A ``DeploymentHandle`` of the ingress.
    """
    a = ServeArgs.from_dict(args)
    return serve.run(build_app(_asdict(a)), name=a.name, route_prefix=route_prefix if http else None, blocking=False)


def args_from_serve_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fipray app's ``args`` (with its ``name``) and the ``http_options`` of a Serve config file.

    Raises:
        ConfigError: not a mapping with one application whose import_path is this module's build_app.
    """
    from fipray.config import read_yaml_mapping

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
