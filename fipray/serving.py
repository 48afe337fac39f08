"""The ensemble server's engine: shard maths, request validation and validated app arguments.

Nothing here imports Ray or Serve (``fipray.ray.serve`` wraps it in deployments), so all of it is
unit-testable in-process.

Sharding is exact. A shard holding members ``k ∈ M_s`` returns, in log space for stability, its
softmax sum ``L_s = log Σ_{k∈M_s} softmax(f_k(x))`` ``(B, C)``. The ensemble's head is then
``log p = logsumexp_s L_s − log K``, the same number the in-process :class:`~fipray.ensemble.Ensemble`
computes (logsumexp is associative). For a loss ℓ(log p) with upstream ``g = ∂ℓ/∂ log p`` ``(B, C)``,

    ∇ₓ ℓ = Σ_s ∇ₓ ⟨u_s, L_s(x)⟩,   u_s = g ⊙ exp(L_s − logsumexp_{s'} L_{s'})

(each class's gradient shared out by the shard's share of that class's probability mass), so each
shard returns its own vector-Jacobian product and the ingress adds them: the exact input gradient of
log(mean softmax) without any shard seeing another's members.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fipray.config import ConfigError, build_section, knob
from fipray.ensemble import load_ensemble, read_ensemble_meta


def split_members(num_members: int, shards: int) -> list[list[int]]:
    """Contiguous, near-equal blocks of member indices, one per shard.

    Raises:
        ValueError: ``shards`` < 1 or more shards than members.
    """
    if not 1 <= shards <= num_members:
        raise ValueError(f"shards must be in [1, {num_members}] for {num_members} members, got {shards}")
    return [blk.tolist() for blk in np.array_split(np.arange(num_members), shards)]


class ShardEngine:
    """Some members of a saved ensemble, evaluated together (fused when the architecture allows).

    Args:
        directory: Ensemble folder (``ensemble.json`` + ``members.safetensors``; safetensors only).
        member_ids: Which members this shard holds; None = all.
        device: Where the members live (``"cuda"`` on a GPU shard).
        threads: torch intra-op threads in this process (1 for small models on shared CPUs); 0 keeps
            torch's default.
    """

    def __init__(
        self,
        directory: str | Path,
        member_ids: Sequence[int] | None = None,
        *,
        device: str = "cpu",
        threads: int = 1,
    ):
        if threads > 0:
            torch.set_num_threads(threads)
        self.meta = read_ensemble_meta(directory)
        n = self.meta["num_members"]
        self.member_ids = list(range(n)) if member_ids is None else [int(k) for k in member_ids]
        self.device = torch.device(device)
        self.ensemble = load_ensemble(directory, members=self.member_ids, device=self.device)
        # Only input gradients are ever asked for: frozen weights keep the fused stack cached.
        self.ensemble.requires_grad_(False)

    def log_prob_sum(self, x: Tensor) -> Tensor:
        """``L_s = log Σ_{k in shard} softmax(f_k(x))``: ``(B, *input_shape)`` -> ``(B, C)`` on the CPU."""
        with torch.no_grad():
            return self._log_prob_sum(x.to(self.device, torch.float32)).cpu()

    def log_prob_sum_vjp(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """``L_s(x)`` and ``∇ₓ ⟨u, L_s(x)⟩`` (``(B, C)`` and ``(B, *input_shape)``, on the CPU)."""
        with torch.enable_grad():
            xg = x.detach().to(self.device, torch.float32).requires_grad_(True)
            out = self._log_prob_sum(xg)
            (grad,) = torch.autograd.grad(out, xg, grad_outputs=u.to(self.device, out.dtype))
        return out.detach().cpu(), grad.cpu()

    def _log_prob_sum(self, x: Tensor) -> Tensor:
        return torch.logsumexp(torch.log_softmax(self.ensemble.member_logits(x), dim=-1), dim=0)


def combine_log_parts(parts: Tensor, num_members: int) -> Tensor:
    """log(mean softmax) ``(B, C)`` from the shards' log softmax sums ``parts`` ``(S, B, C)``."""
    return torch.logsumexp(parts, dim=0) - math.log(num_members)


def shard_upstreams(parts: Tensor, g: Tensor) -> Tensor:
    """Per-shard upstream vectors ``u_s = g ⊙ exp(L_s − logsumexp_s L_s)`` ``(S, B, C)`` (module docstring)."""
    return g.unsqueeze(0) * torch.softmax(parts, dim=0)


class BadRequest(ValueError):
    """A request the server refuses; ``status`` is the HTTP code, the message names the problem."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _reject_constant(name: str) -> float:
    raise BadRequest(f"inputs contain {name}; only finite numbers in [0, 1] are accepted")


def parse_predict_body(
    body: bytes, input_shape: Sequence[int], *, max_inputs: int, max_body_bytes: int
) -> Tensor:
    """Validate a ``POST /predict`` body ``{"inputs": [...]}`` and return the batch as float32.

    Args:
        body: Raw request body.
        input_shape: Per-example shape the model expects.
        max_inputs: Largest batch accepted.
        max_body_bytes: Largest body accepted.

    Returns:
        Inputs ``(B, *input_shape)``, float32, every entry finite and in [0, 1].

    Raises:
        BadRequest: the body is too large (413), not JSON, lacks ``inputs``, holds non-numbers,
            a ragged or wrongly shaped batch, NaN/inf, values outside [0, 1], an empty batch, or more
            than ``max_inputs`` examples (413); the message says which.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(body) > max_body_bytes:
        raise BadRequest(f"request body of {len(body)} bytes exceeds the limit of {max_body_bytes} bytes", 413)
    if not body.strip():
        raise BadRequest('empty request body; send JSON {"inputs": [...]}')
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except BadRequest:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f'the body must be a JSON object {{"inputs": [...]}}, got a {type(doc).__name__}')
    if "inputs" not in doc:
        raise BadRequest(f"missing field 'inputs' (got fields {sorted(doc)})")
    extra = sorted(set(doc) - {"inputs"})
    if extra:
        raise BadRequest(f"unexpected field(s) {extra}; the only field is 'inputs'")
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise BadRequest(f"'inputs' must be a list (a batch of examples), got a {type(inputs).__name__}")
    if not inputs:
        raise BadRequest("empty batch: 'inputs' holds no examples")
    if len(inputs) > max_inputs:
        raise BadRequest(f"batch of {len(inputs)} inputs exceeds the maximum of {max_inputs}", 413)
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(
            f"'inputs' is ragged or holds nested junk; each input must be a nested list of numbers of shape {list(shape)}"
        ) from None
    if arr.dtype.kind not in "iuf":
        raise BadRequest(
            f"'inputs' must hold numbers only (got {'true/false' if arr.dtype.kind == 'b' else 'strings, nulls or objects'})"
        )
    if arr.ndim == len(shape) and arr.shape == shape:
        raise BadRequest(f"'inputs' must be a batch: wrap the single input of shape {list(shape)} in a list")
    if arr.shape[1:] != shape:
        raise BadRequest(
            f"each input must have shape {list(shape)} (batch shape [B, {', '.join(map(str, shape))}]), "
            f"got batch shape {list(arr.shape)}"
        )
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise BadRequest("inputs contain NaN or infinite values; only finite numbers in [0, 1] are accepted")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise BadRequest(f"inputs must lie in [0, 1] (normalisation is inside the model); got range [{lo:.4g}, {hi:.4g}]")
    return torch.from_numpy(arr.astype(np.float32))


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
        ints = {f.name for f in dataclasses.fields(cls) if f.type in (int, "int")}
        data = {k: _int_text(v) if k in ints else v for k, v in args.items()}
        out: ServeArgs = build_section(cls, data, "serve.")
        meta = read_ensemble_meta(out.ensemble)  # fails now, naming the folder or file
        split_members(meta["num_members"], out.shards)
        return dataclasses.replace(out, ensemble=str(Path(out.ensemble).resolve()))


def _int_text(value: Any) -> Any:
    """'2' -> 2 (command-line values); anything else is left for the type check to judge."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def metadata_doc(meta: Mapping[str, Any], shards: int) -> dict[str, Any]:
    """The ``GET /metadata`` answer: input shape, classes, members and where they came from."""
    spec, info = meta["model_spec"], meta.get("metadata", {})
    return {
        "input_shape": list(spec["input_shape"]),
        "num_classes": spec["num_classes"],
        "members": meta["num_members"],
        "shards": shards,
        "model": {"name": spec["name"], "kwargs": spec["kwargs"]},
        "source": {
            "operation": info.get("operation"),
            "path_ids": info.get("path_ids"),
            "steps": info.get("steps"),
            "config_hash": info.get("config_hash"),
            "seed": info.get("seed"),
        },
        "members_sha256": meta["members_sha256"],
    }
