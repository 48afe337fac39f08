"""What a ``POST /predict`` request may carry, its validation, and the ``GET /metadata`` answer.

Requests (:func:`parse_request`) are JSON inputs, JSON texts (tokenised with the tokenizer the
ensemble folder records) or a binary ``.npy`` body, validated against an :class:`InputSpec`; every
refusal is a :class:`BadRequest` naming the problem and its HTTP status. Nothing here imports Ray
or the engine (:mod:`fipray.serving`); the ingress of ``fipray.ray.serve`` calls it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fipray.uri import display, is_uri


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
    from fipray.data.tokenizer import load_tokenizer, tokenize

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


def metadata_doc(meta: Mapping[str, Any], shards: int, directory: str | None = None,
                 inputs: InputSpec | None = None) -> dict[str, Any]:
    """The ``GET /metadata`` answer: which folder (a URI without credentials or options) and checksum answer,
    inputs, classes, members, origin."""
    spec, info = meta["model_spec"], meta.get("metadata", {})
    doc = {
        "ensemble": display(directory) if directory is not None and is_uri(directory) else directory,
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
