"""Validated arguments of the Serve application (:class:`ServeArgs`), checked before anything is deployed.

Built by the config system, so a typo in a Serve config fails at deploy time naming its key; the
ensemble folder (and its tokenizer) and the shard count are checked against the folder here too. The folder
may be a URI (``s3://bucket/run/merged/ensemble?endpoint_override=...``): it stays the URI (each node reads
its own cached copy, :func:`fipray.ensemble_folder.local_ensemble`); a local path is made absolute.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fipray.config import ConfigError, build_section, knob
from fipray.ensemble_folder import local_ensemble, read_ensemble_meta, tokenizer_dir, uri_errors
from fipray.serving import split_members
from fipray.uri import is_uri


@dataclass(frozen=True)
class ServeArgs:
    """Validated arguments of the Serve application (``fipray.ray.serve:build_app``).

    ``ensemble`` is the only required key. Built by the config system (``fipray.config.build_section``,
    keys named ``serve.<arg>`` in errors): unknown keys and wrongly typed values raise ``ConfigError``
    (a ``ValueError``) naming them, so a typo in a Serve config file fails at deploy time, not at the
    first request.
    """

    ensemble: str = ""
    shards: int = knob(1, ge=1)  # 1: the ingress holds every member (one deployment; fastest when they fit)
    max_inputs: int = knob(256, ge=1)  # examples per request
    max_body_bytes: int = knob(16 << 20, ge=1)
    max_batch_requests: int = knob(16, ge=1)  # requests merged by @serve.batch
    batch_wait_timeout_s: float = knob(0.005, ge=0)
    max_ongoing_requests: int = knob(32, ge=1)  # the default 5 would cap @serve.batch at 5 (RAY_NOTES.md)
    # Backpressure: requests waiting at each caller (proxy, ingress) beyond this get 503 + Retry-After.
    max_queued_requests: int = knob(64, ge=1)
    retry_after_s: float = knob(1.0, ge=0)  # the Retry-After header of a 503
    request_timeout_s: float = knob(30.0, gt=0)  # end-to-end HTTP timeout and the ingress's wait on shards
    health_check_period_s: float = knob(2.0, gt=0)  # how soon Serve notices a dead replica
    # Serve autoscaling_config of each deployment ({} = one replica), e.g. {min_replicas: 1, max_replicas: 4}.
    ingress_autoscaling: dict[str, Any] = knob({})
    shard_autoscaling: dict[str, Any] = knob({})
    truncate_texts: bool = False  # False: texts over the model's length get 400; True: cut like training
    access_log: bool = True  # Serve's log line per request (proxy and replicas); false: none written
    cpus_per_replica: float = knob(0.25, ge=0)
    gpus_per_shard: float = knob(0.0, ge=0)
    threads: int = knob(1, ge=0)  # torch threads per replica
    name: str = "fipray"  # Serve application name

    @classmethod
    def from_dict(cls, args: Mapping[str, Any]) -> ServeArgs:
        """Build from a mapping (a Serve config's ``args``; values may be strings from the command line)."""
        if not isinstance(args, Mapping):
            raise ConfigError(f"serve args must be a mapping, got {type(args).__name__}")
        if "ensemble" not in args:
            raise ConfigError("config key 'serve.ensemble' (the ensemble folder) is required")
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        data = {k: _from_text(v, kinds.get(k)) for k, v in args.items()}
        out: ServeArgs = build_section(cls, data, "serve.")
        folder = local_ensemble(out.ensemble)  # a URI: fetched into this node's cache (UriError naming it)
        with uri_errors(out.ensemble, folder):
            meta = read_ensemble_meta(folder)  # fails now, naming the folder or file
            tokenizer_dir(folder, meta)  # a recorded but missing tokenizer fails now too
        split_members(meta["num_members"], out.shards)
        if is_uri(out.ensemble):
            return out
        return dataclasses.replace(out, ensemble=str(Path(out.ensemble).resolve()))


def _from_text(value: Any, kind: Any) -> Any:
    """Command-line strings to the field's type ('2' -> 2, 'true' -> True, '{...}' -> dict); else unchanged."""
    if not isinstance(value, str):
        return value
    kind = str(kind)
    if kind == "int":
        try:
            return int(value)
        except ValueError:
            return value
    if kind == "bool" and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind.startswith("dict"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
