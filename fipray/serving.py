"""The ensemble server's engine: shard maths, request validation and validated app arguments.

Nothing here imports Ray or Serve (``fipray.ray.serve`` wraps it in deployments), so all of it is
unit-testable in-process. Requests (:func:`parse_request`) are JSON inputs, JSON texts (tokenised
with the tokenizer the ensemble folder records) or a binary ``.npy`` body, validated against an
:class:`InputSpec`; shards hold engines by ensemble version (:class:`EngineCache`), so a live switch
never mixes two ensembles in one answer.

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
import io
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
from fipray.ensemble_folder import load_ensemble, read_ensemble_meta, tokenizer_dir


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
        # Only input gradients are ever asked for, and the weights never change while loaded.
        self.ensemble.freeze()

    def input_facts(self) -> dict[str, Any]:
        """What the members take: ``{"tokens", "vocab_size", "type_vocab_size"}`` (see :func:`model_input_facts`)."""
        return model_input_facts(self.ensemble.members[0])

    def log_prob_sum(self, x: Tensor) -> Tensor:
        """``L_s = log Σ_{k in shard} softmax(f_k(x))``: ``(B, *input_shape)`` -> ``(B, C)`` on the CPU."""
        with torch.no_grad():
            return self._log_prob_sum(self._cast(x)).cpu()

    def log_prob_sum_vjp(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """``L_s(x)`` and ``∇ₓ ⟨u, L_s(x)⟩`` (``(B, C)`` and ``(B, *input_shape)``, on the CPU)."""
        with torch.enable_grad():
            xg = x.detach().to(self.device, torch.float32).requires_grad_(True)
            out = self._log_prob_sum(xg)
            (grad,) = torch.autograd.grad(out, xg, grad_outputs=u.to(self.device, out.dtype))
        return out.detach().cpu(), grad.cpu()

    def _cast(self, x: Tensor) -> Tensor:
        # Token ids stay integers; everything else is float32 on the members' device.
        return x.to(self.device) if not x.is_floating_point() else x.to(self.device, torch.float32)

    def _log_prob_sum(self, x: Tensor) -> Tensor:
        return self.ensemble.log_prob_sum(x)


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


NPY_MAGIC = b"\x93NUMPY"
#: Content types of the binary body (an ``.npy`` file, as ``numpy.save`` writes it).
NPY_CONTENT_TYPES = ("application/octet-stream", "application/x-npy")


@dataclass(frozen=True)
class InputSpec:
    """What a ``POST /predict`` request may carry for one served ensemble.

    Attributes:
        shape: Per-example input shape (``(C, H, W)``, ``(L,)`` token ids, ``(2, L)`` sentence pairs).
        max_inputs: Largest batch accepted.
        max_body_bytes: Largest body accepted.
        tokens: The members take int64 token ids (text models) instead of floats in [0, 1].
        vocab_size: Token ids must lie in ``[0, vocab_size)`` (``tokens`` only).
        type_vocab_size: Row 1 of a sentence pair (token types) must lie in ``[0, type_vocab_size)``.
        tokenizer: Folder of the tokenizer that makes ``{"texts": [...]}`` into ids (None: no texts).
        truncate_texts: Cut texts longer than the model's length (as training did) instead of refusing them.
    """

    shape: tuple[int, ...]
    max_inputs: int
    max_body_bytes: int
    tokens: bool = False
    vocab_size: int = 0
    type_vocab_size: int = 0
    tokenizer: str | None = None
    truncate_texts: bool = False


def model_input_facts(model: torch.nn.Module) -> dict[str, Any]:
    """``{"tokens", "vocab_size", "type_vocab_size"}`` of one member (what its inputs must be)."""
    from fipray.models.hf import HFTextClassifier

    if isinstance(model, HFTextClassifier):
        cfg: Any = model.model.config
        return {"tokens": True, "vocab_size": int(cfg.vocab_size), "type_vocab_size": int(cfg.type_vocab_size)}
    return {"tokens": False, "vocab_size": 0, "type_vocab_size": 0}


def parse_request(body: bytes, content_type: str | None, spec: InputSpec) -> Tensor:
    """Validate a ``POST /predict`` body of any kind and return the batch the members take.

    Kinds: JSON ``{"inputs": [...]}`` (floats in [0, 1], or integer token ids for text members);
    JSON ``{"texts": [...]}`` (text members whose folder records a tokenizer; sentence-pair models
    also take ``"text_pairs"``); a binary ``.npy`` body (``Content-Type: application/octet-stream``
    or any body starting with the ``.npy`` magic) read with pickling disabled: ``uint8`` images
    (scaled by 1/255), ``float32`` in [0, 1], or integer token ids.

    Returns:
        ``(B, *spec.shape)``: float32 for images, int64 for token ids.

    Raises:
        BadRequest: 413 for an oversized body or batch, 415 for an unknown content type, else 400;
            the message names the problem (dtype, shape, header, vocabulary range, length, ...).
    """
    if len(body) > spec.max_body_bytes:
        raise BadRequest(f"request body of {len(body)} bytes exceeds the limit of {spec.max_body_bytes} bytes", 413)
    ctype = (content_type or "").split(";")[0].strip().lower()
    if body.startswith(NPY_MAGIC) or ctype in NPY_CONTENT_TYPES:
        return _npy_batch(body, spec)
    if ctype and ctype != "application/json" and not ctype.endswith("+json") and \
            ctype not in ("text/plain", "application/x-www-form-urlencoded"):  # curl -d sends the latter
        raise BadRequest(f"unsupported Content-Type {ctype!r}; send application/json or "
                         f"application/octet-stream (an .npy file)", 415)
    return _json_batch(body, spec)


def parse_predict_body(
    body: bytes, input_shape: Sequence[int], *, max_inputs: int, max_body_bytes: int
) -> Tensor:
    """A JSON body ``{"inputs": [...]}`` of floats in [0, 1] as float32 ``(B, *input_shape)`` (see :func:`parse_request`)."""
    spec = InputSpec(tuple(int(d) for d in input_shape), max_inputs, max_body_bytes)
    return parse_request(body, "application/json", spec)


def _json_batch(body: bytes, spec: InputSpec) -> Tensor:
    if not body.strip():
        raise BadRequest('empty request body; send JSON {"inputs": [...]}' + (' or {"texts": [...]}' if spec.tokens else ""))
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except BadRequest:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f'the body must be a JSON object {{"inputs": [...]}}, got a {type(doc).__name__}')
    if "texts" in doc:
        extra = sorted(set(doc) - {"texts", "text_pairs"})
        if extra:
            raise BadRequest(f"unexpected field(s) {extra} beside 'texts'; the fields are 'texts' (and 'text_pairs')")
        return _text_batch(doc["texts"], doc.get("text_pairs"), spec)
    if "inputs" not in doc:
        alt = " or 'texts'" if spec.tokens else ""
        raise BadRequest(f"missing field 'inputs'{alt} (got fields {sorted(doc)})")
    extra = sorted(set(doc) - {"inputs"})
    if extra:
        raise BadRequest(f"unexpected field(s) {extra}; the only field is 'inputs'")
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise BadRequest(f"'inputs' must be a list (a batch of examples), got a {type(inputs).__name__}")
    if not inputs:
        raise BadRequest("empty batch: 'inputs' holds no examples")
    if len(inputs) > spec.max_inputs:
        raise BadRequest(f"batch of {len(inputs)} inputs exceeds the maximum of {spec.max_inputs}", 413)
    what = "integer token ids" if spec.tokens else "numbers"
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(
            f"'inputs' is ragged or holds nested junk; each input must be a nested list of {what} of shape "
            f"{list(spec.shape)}"
        ) from None
    if arr.dtype.kind not in "iuf":
        raise BadRequest(
            f"'inputs' must hold {what} only (got {'true/false' if arr.dtype.kind == 'b' else 'strings, nulls or objects'})"
        )
    _check_shape(arr, spec, "'inputs'")
    if spec.tokens:
        if arr.dtype.kind == "f":
            raise BadRequest("'inputs' must hold integer token ids (got non-integer numbers)")
        return _token_batch(arr, spec)
    arr = arr.astype(np.float64, copy=False)
    return _unit_floats(arr)


def _check_shape(arr: np.ndarray, spec: InputSpec, what: str) -> None:
    shape = spec.shape
    if arr.ndim == len(shape) and arr.shape == shape:
        raise BadRequest(f"{what} must be a batch: wrap the single input of shape {list(shape)} in a list")
    if arr.ndim >= 1 and arr.shape[0] == 0:
        raise BadRequest(f"empty batch: {what} holds no examples")
    if arr.ndim == len(shape) + 1 and arr.shape[0] > spec.max_inputs:
        raise BadRequest(f"batch of {arr.shape[0]} inputs exceeds the maximum of {spec.max_inputs}", 413)
    if spec.tokens and arr.ndim == len(shape) + 1 and arr.shape[1:-1] == shape[:-1] and arr.shape[-1] != shape[-1]:
        n, length = arr.shape[-1], shape[-1]
        if n > length:
            raise BadRequest(f"sequence length {n} exceeds the model's maximum of {length} tokens")
        raise BadRequest(f"sequences must have exactly {length} token ids (pad with the tokenizer's pad id), got {n}")
    if arr.shape[1:] != shape:
        raise BadRequest(
            f"each input must have shape {list(shape)} (batch shape [B, {', '.join(map(str, shape))}]), "
            f"got batch shape {list(arr.shape)}"
        )


def _unit_floats(arr: np.ndarray) -> Tensor:
    if not np.isfinite(arr).all():
        raise BadRequest("inputs contain NaN or infinite values; only finite numbers in [0, 1] are accepted")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise BadRequest(f"inputs must lie in [0, 1] (normalisation is inside the model); got range [{lo:.4g}, {hi:.4g}]")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _token_batch(arr: np.ndarray, spec: InputSpec) -> Tensor:
    """int64 ids ``(B, L)`` (or ``(B, 2, L)`` pairs) after the vocabulary (and token-type) range check."""
    ids = arr[:, 0] if len(spec.shape) == 2 else arr
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= spec.vocab_size:
        raise BadRequest(f"token ids must lie in the vocabulary range [0, {spec.vocab_size}); got [{lo}, {hi}]")
    if len(spec.shape) == 2:
        types = arr[:, 1]
        lo, hi = int(types.min()), int(types.max())
        if lo < 0 or hi >= spec.type_vocab_size:
            raise BadRequest(f"token type ids (row 1 of each pair) must lie in [0, {spec.type_vocab_size}); "
                             f"got [{lo}, {hi}]")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))


def _npy_array(body: bytes) -> np.ndarray:
    """The array of an ``.npy`` body, header checked against the data length before anything is allocated."""
    from numpy.lib import format as npy

    if not body.startswith(NPY_MAGIC):
        raise BadRequest("binary body is not an .npy file (it must start with the \\x93NUMPY magic; "
                         "write it with numpy.save)")
    f = io.BytesIO(body)
    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise BadRequest(f"unsupported .npy format version {version[0]}.{version[1]} (1.0 or 2.0 are read)")
    except BadRequest:
        raise
    except (ValueError, SyntaxError, TypeError, KeyError, OverflowError) as e:
        raise BadRequest(f"malformed .npy header: {e}") from None
    if dtype.hasobject:
        raise BadRequest("the .npy array holds Python objects, which would need unpickling; the server never "
                         "unpickles: send a numeric array")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise BadRequest(f"the .npy array has a structured dtype {dtype.descr}; send a plain numeric array")
    expected = math.prod(shape) * dtype.itemsize
    have = len(body) - f.tell()
    if have != expected:
        raise BadRequest(f".npy header declares shape {list(shape)} of {dtype.str} ({expected} bytes of data) "
                         f"but the body holds {have} bytes after the header")
    arr = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=f.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def _npy_batch(body: bytes, spec: InputSpec) -> Tensor:
    if not body:
        raise BadRequest("empty request body; send an .npy file (numpy.save) of shape [B, "
                         f"{', '.join(map(str, spec.shape))}]")
    arr = _npy_array(body)
    kind, dt = arr.dtype.kind, arr.dtype
    if spec.tokens:
        if kind not in "iu":
            raise BadRequest(f".npy dtype {dt.str} ({dt.name}) is not accepted for token ids; send an integer array")
        _check_shape(arr, spec, "the .npy array")
        return _token_batch(arr, spec)
    if kind == "u" and dt.itemsize == 1:
        _check_shape(arr, spec, "the .npy array")
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if kind == "f" and dt.itemsize == 4:
        _check_shape(arr, spec, "the .npy array")
        return _unit_floats(arr.astype(np.float32))  # a native-order copy (the buffer is read-only)
    raise BadRequest(f".npy dtype {dt.str} ({dt.name}) is not accepted; send uint8 (0..255, scaled by 1/255) "
                     "or float32 in [0, 1]")


def _text_batch(texts: Any, pairs: Any, spec: InputSpec) -> Tensor:
    """Token ids ``(B, L)`` (or ``(B, 2, L)``) of ``{"texts": [...]}`` with the ensemble's own tokenizer."""
    if not spec.tokens:
        raise BadRequest(f"'texts' is for text ensembles; this ensemble takes 'inputs' of shape {list(spec.shape)}")
    if spec.tokenizer is None:
        raise BadRequest("this ensemble's folder records no tokenizer; send token ids as 'inputs'")
    strings = _strings(texts, "texts", spec.max_inputs)
    pair = len(spec.shape) == 2
    if pair != (pairs is not None):
        raise BadRequest("this model takes sentence pairs: send 'text_pairs' beside 'texts'" if pair
                         else "'text_pairs' is for sentence-pair models; this one takes single texts")
    second = _strings(pairs, "text_pairs", spec.max_inputs) if pairs is not None else None
    if second is not None and len(second) != len(strings):
        raise BadRequest(f"{len(strings)} texts but {len(second)} text_pairs")
    from fipray.data.text import load_tokenizer, tokenize

    length = spec.shape[-1]
    if not spec.truncate_texts:
        tok = load_tokenizer(spec.tokenizer)
        enc = tok(strings, second, truncation=False, return_attention_mask=False, return_token_type_ids=False,
                  verbose=False)
        for i, ids in enumerate(enc["input_ids"]):
            if len(ids) > length:
                raise BadRequest(f"text {i} is {len(ids)} tokens long, over the model's maximum of {length} "
                                 f"(special tokens included); shorten it or serve with truncate_texts=true")
    return tokenize(strings, second, spec.tokenizer, length)


def _strings(values: Any, field: str, max_inputs: int) -> list[str]:
    if not isinstance(values, list):
        raise BadRequest(f"'{field}' must be a list of strings, got a {type(values).__name__}")
    if not values:
        raise BadRequest(f"empty batch: '{field}' holds no texts")
    if len(values) > max_inputs:
        raise BadRequest(f"batch of {len(values)} texts exceeds the maximum of {max_inputs}", 413)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise BadRequest(f"'{field}' must hold strings only; item {i} is a {type(v).__name__}")
        if not v.strip():
            raise BadRequest(f"'{field}' item {i} is empty")
    return values


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
        meta = read_ensemble_meta(out.ensemble)  # fails now, naming the folder or file
        split_members(meta["num_members"], out.shards)
        tokenizer_dir(out.ensemble, meta)  # a recorded but missing tokenizer fails now too
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


class EngineCache:
    """The shard engines one process holds, by ensemble version (folder, checksum, member ids).

    Requests name the version they were admitted under, so a shard never mixes two ensembles in one
    answer: during a switch the old and the new engine live side by side (at most ``keep``), and a
    replica that Serve restarted loads whatever version it is asked for.
    """

    def __init__(self, keep: int = 2, *, device: str = "cpu", threads: int = 1):
        self.keep, self.device, self.threads = keep, device, threads
        self._engines: dict[tuple, ShardEngine] = {}

    def get(self, directory: str, sha256: str, member_ids: Sequence[int]) -> ShardEngine:
        """The engine of that version, loading it (and dropping the oldest beyond ``keep``) if needed.

        Raises:
            ValueError: the folder's checksum is no longer ``sha256`` (it was rewritten in place).
        """
        key = (str(directory), str(sha256), tuple(int(k) for k in member_ids))
        engine = self._engines.pop(key, None)
        if engine is None:
            engine = ShardEngine(directory, key[2], device=self.device, threads=self.threads)
            if engine.meta["members_sha256"] != sha256:
                raise ValueError(f"ensemble {directory} changed on disk: checksum {engine.meta['members_sha256']}, "
                                 f"expected {sha256}")
        self._engines[key] = engine  # most recently used last
        while len(self._engines) > self.keep:
            self._engines.pop(next(iter(self._engines)))
        return engine

    def versions(self) -> list[tuple]:
        return list(self._engines)


def metadata_doc(meta: Mapping[str, Any], shards: int, directory: str | None = None,
                 inputs: InputSpec | None = None) -> dict[str, Any]:
    """The ``GET /metadata`` answer: which folder and checksum answer, inputs, classes, members, origin."""
    spec, info = meta["model_spec"], meta.get("metadata", {})
    doc = {
        "ensemble": directory,
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
    if inputs is not None:
        kinds = ["json inputs", "npy"] + (["json texts"] if inputs.tokenizer else [])
        doc["inputs"] = {"kind": "token ids" if inputs.tokens else "floats in [0, 1] (npy: uint8 or float32)",
                         "payloads": kinds, "max_inputs": inputs.max_inputs, "max_body_bytes": inputs.max_body_bytes}
        if inputs.tokens:
            doc["inputs"].update(vocab_size=inputs.vocab_size, max_length=inputs.shape[-1])
    return doc
