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

Which ensemble answers is the ingress's ``user_config`` (``{"ensemble": folder, "members_sha256": ...}``):
Serve calls ``reconfigure``, which loads the new version (warming the shards) beside the old one and
swaps atomically; requests admitted before finish on the old one. A version that fails to load leaves
the old one answering. :func:`update_ensemble` first verifies the folder whole in the caller and touches
nothing when it is bad; the checksum in ``user_config`` makes a folder rewritten in place reload too. The
folder may be a URI (``s3://``, ``gs://``): every replica reads its node's cached copy (checksum checked on load).
The deployments' code version (:mod:`fipray.ray.serve_version`) leaves the folder out, so a switch only
reconfigures the running replicas (~1 s, none replaced). ``docs/serving.md``: switches, error bodies.

Backpressure: the ingress runs at most ``max_ongoing_requests`` predictions, lets at most
``max_queued_requests`` more wait, and answers the rest 503 with ``Retry-After`` and a JSON body
(Serve's own backpressure answer is plain text from its proxy, which ``backpressure_config`` cannot
change: it stays a backstop above the ingress's limit). A shard's refusal is the same JSON 503; no
request waits past ``request_timeout_s`` (504); a shard that dies mid-request gives 503 at once and
Serve restarts it (``health_check_period_s``). Direct ingress: :func:`direct_ingress_env`, :mod:`fipray.ray.serve_main`.

Started by ``fipray serve --ensemble DIR [--shards S] [--port PORT]`` (:mod:`fipray.ray.serve_main`: the
process, its signals, its smoke test), from Python with :func:`start`, or by ``serve run serve.yaml`` from a
Serve config file whose application has ``import_path: fipray.ray.serve:build_app`` (``docs/serving.md``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.config import AutoscalingConfig, BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse

from fipray.config import ConfigError
from fipray.ensemble_folder import fetch_ensemble, local_ensemble, read_ensemble_meta, tokenizer_dir
from fipray.ray.serve_version import code_version, versioned
from fipray.serving import EngineCache, ShardEngine, combine_log_parts, shard_upstreams, split_members
from fipray.serving_args import ServeArgs
from fipray.serving_requests import BadRequest, InputSpec, metadata_doc, parse_request

Version = tuple[str, str, tuple[int, ...]]  # (folder, members_sha256, member ids)
REFUSAL_ROOM = 1024  # requests the ingress may hold beyond its own limits, only to refuse them (JSON 503)


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
        self.switch_error: str | None = None  # why the last switch kept the old version (None: it did not)
        self._switching = asyncio.Lock()
        self._slots = asyncio.Semaphore(self.args.max_ongoing_requests)
        self._waiting = 0  # predictions waiting for a slot (at most max_queued_requests)
        self._predict.set_max_batch_size(self.args.max_batch_requests)  # type: ignore[attr-defined]
        self._predict.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)  # type: ignore[attr-defined]

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Switch to ``user_config["ensemble"]``; on failure keep the current version (if any: else fail)."""
        try:
            await self.switch(str(user_config["ensemble"]), user_config.get("members_sha256"))
            self.switch_error = None
        except Exception as e:
            if self.active is None:
                raise
            self.switch_error = failure_cause(e)

    def state(self) -> dict[str, Any]:
        """The version answering (folder, checksum) and why the last switch failed (None if it did not)."""
        a = self.active
        return {"ensemble": a and a.directory, "members_sha256": a and a.meta["members_sha256"],
                "switch_error": self.switch_error}

    async def switch(self, directory: str, sha256: str | None = None) -> dict[str, Any]:
        """Load ``directory`` (shards warmed first), then serve it; returns the new ``/metadata``.

        ``sha256``: the checksum the caller verified; the folder must still hold it (None: whatever it holds).
        """
        async with self._switching:
            current = self.active
            if current is not None and current.directory == directory and current.meta["members_sha256"] == (
                    sha256 or read_ensemble_meta(local_ensemble(directory))["members_sha256"]):
                return current.metadata
            folder = await asyncio.to_thread(local_ensemble, directory)  # a URI: this node's cached copy
            meta = read_ensemble_meta(folder)
            if sha256 is not None and meta["members_sha256"] != sha256:
                raise ValueError(f"{directory} changed after it was verified: ensemble.json records checksum "
                                 f"{meta['members_sha256'][:12]}..., the switch asked for {sha256[:12]}...")
            blocks = [tuple(b) for b in split_members(meta["num_members"], max(1, len(self.shards)))]
            tok = tokenizer_dir(folder, meta)
            local = None
            if self.shards:
                version = (directory, meta["members_sha256"])
                facts = (await asyncio.gather(*(s.prepare.remote((*version, blocks[i]))
                                                for i, s in enumerate(self.shards))))[0]
            else:
                device = "cuda" if self.args.gpus_per_shard > 0 else "cpu"
                local = await asyncio.to_thread(ShardEngine, folder, device=device, threads=self.args.threads)
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
        if self._slots.locked() and self._waiting >= self.args.max_queued_requests:
            return _error(503, f"the server is at capacity ({self.args.max_ongoing_requests} requests running, "
                               f"{self._waiting} waiting); retry later", self.args.retry_after_s)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await self._answer(request, active)
        finally:
            self._slots.release()

    async def _answer(self, request: Request, active: _Active) -> JSONResponse:
        """The ``/predict`` answer of ``request`` by ``active`` (a slot is held)."""
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


def build_app(args: Mapping[str, Any]):
    """Serve application builder: ``import_path: fipray.ray.serve:build_app`` with ``args`` (ServeArgs keys).

    Raises:
        ValueError: an unknown or badly typed arg, a missing ensemble folder, more shards than members,
            or an invalid autoscaling mapping.
    """
    a = ServeArgs.from_dict(args)
    return _app(a, {"ensemble": a.ensemble,
                    "members_sha256": read_ensemble_meta(local_ensemble(a.ensemble))["members_sha256"]})


def _app(a: ServeArgs, user_config: dict[str, Any]):
    """The app of validated ``a`` whose ingress serves the version ``user_config`` names."""
    common = {"max_queued_requests": a.max_queued_requests, "health_check_period_s": a.health_check_period_s,
              "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=a.retry_after_s)}
    if not a.access_log:
        # Only then: a deployment's logging_config replaces the app's (a Serve config's log level, encoding).
        common["logging_config"] = {"enable_access_log": False}
    shards = []
    version = code_version(asdict(a))
    if a.shards > 1:
        device = "cuda" if a.gpus_per_shard > 0 else "cpu"
        scaling = _autoscaling("shard_autoscaling", a.shard_autoscaling)
        for i in range(a.shards):
            shards.append(versioned(
                EnsembleShard.options(  # type: ignore[attr-defined]
                    name=f"EnsembleShard{i}", **common, **scaling,
                    ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": a.gpus_per_shard},
                ), version).bind(a.threads, device))
    ingress_gpus = a.gpus_per_shard if a.shards == 1 else 0.0
    # The ingress queues and refuses requests itself (JSON 503, EnsembleIngress.__call__). Serve's limits sit above
    # its running + waiting ones with room for a burst of refusals (answered at once, body unread), so Serve's own
    # plain-text 503 (its proxy's router queue full, which a burst fills while replicas are probed) is a backstop.
    cap = a.max_ongoing_requests + a.max_queued_requests + REFUSAL_ROOM
    return versioned(EnsembleIngress.options(  # type: ignore[attr-defined]
        max_ongoing_requests=cap, **{**common, "max_queued_requests": cap}, **_autoscaling("ingress_autoscaling", a.ingress_autoscaling),
        user_config=user_config, ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": ingress_gpus},
    ), version).bind({**asdict(a), "ensemble": ""}, shards)  # the folder comes from user_config (reconfigure) only


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


def start(args: Mapping[str, Any], *, host: str = "127.0.0.1", port: int = 8000, http: bool = True,
          route_prefix: str = "/"):
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
        # The proxy's logging: Serve applies it when this call starts Serve (a running Serve keeps its own). The
        # proxy waits a little longer than the ingress: a slow request gets the JSON 504, not the proxy's text 408.
        serve.start(http_options={"host": host, "port": int(port), "request_timeout_s": a.request_timeout_s + 2},
                    logging_config=None if a.access_log else {"enable_access_log": False})
    return serve.run(build_app(asdict(a)), name=a.name, route_prefix=route_prefix if http else None, blocking=False)


class SwitchFailed(ValueError):
    """A live switch that did not happen: the version that answered before still answers."""


def update_ensemble(args: Mapping[str, Any], *, http: bool = True, route_prefix: str = "/"):
    """Point the running app ``args["name"]`` at ``args["ensemble"]`` without dropping requests.

    The folder (or URI: fetched into this node's cache) is verified whole here first
    (:func:`~fipray.ensemble_folder.fetch_ensemble`); a bad one raises before any deployment is touched. Then the app is redeployed with the new ``user_config``
    (folder and checksum: a folder rewritten in place reloads too) and the ingress swaps to it (module
    docstring). Same arguments as :func:`start`'s ``args``.

    Returns:
        A ``DeploymentHandle`` of the ingress.

    Raises:
        FileNotFoundError, ValueError: the folder is missing or cannot be served (the message names the
            file and the cause); nothing changed.
        SwitchFailed: the ingress could not load it (it changed after the check, a shard failed); the
            old version still answers, and Serve's target is set back to it.
    """
    a = ServeArgs.from_dict(args)
    sha = fetch_ensemble(a.ensemble)[1]["members_sha256"]
    prefix = route_prefix if http else None
    before = serve.get_app_handle(a.name).state.remote().result()
    handle = serve.run(_app(a, {"ensemble": a.ensemble, "members_sha256": sha}), name=a.name, route_prefix=prefix,
                       blocking=False)
    after = handle.state.remote().result()
    if (after["ensemble"], after["members_sha256"]) != (a.ensemble, sha):
        old = {"ensemble": before["ensemble"], "members_sha256": before["members_sha256"]}
        serve.run(_app(dataclasses.replace(a, ensemble=old["ensemble"]), old), name=a.name, route_prefix=prefix,
                  blocking=False)  # only user_config differs: the replicas keep what they serve
        raise SwitchFailed(after["switch_error"] or f"the ingress still serves {after['ensemble']}")
    return handle


def failure_cause(e: BaseException) -> str:
    """One line saying why ``e`` happened: the remote error of a Ray task error, without its traceback."""
    if isinstance(e, RayTaskError) and e.cause is not None:
        e = e.cause
    return " ".join(str(e).split()) or type(e).__name__
