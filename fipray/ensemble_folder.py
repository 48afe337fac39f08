"""The ensemble folder format: save, validate and load an :class:`~fipray.ensemble.Ensemble`.

Saved ensembles are a folder with ``members.safetensors`` (keys ``m{k}.{name}``) and
``ensemble.json`` (model spec, member count, metadata, checksum of the weights). Nothing is pickled.
Ensembles of text models also hold the tokenizer their inputs were made with, in ``tokenizer/``
(``save_pretrained`` files, named by the key ``"tokenizer"`` of ``ensemble.json``), so a server can
take raw strings; folders without it (every other ensemble, and older ones) load as before.

A folder may also be named by a URI (``s3://``, ``gs://``, ``file://``; e.g. the ``<storage>/merged/ensemble``
of ``fipray paths`` on a cluster): :func:`local_ensemble` copies its objects into this node's cache
(:func:`fipray.uri.cached_folder`) and :func:`fetch_ensemble` verifies the copy whole, errors naming the URI.

The module itself (stacked members, the log-mean-softmax head, the fused paths) is :mod:`fipray.ensemble`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fipray.atomic import atomic_write, atomic_write_json, json_default, sha256_file
from fipray.ensemble import Ensemble
from fipray.uri import UriError, cached_folder, display, is_uri

MEMBERS_FILE = "members.safetensors"
META_FILE = "ensemble.json"
TOKENIZER_DIR = "tokenizer"
_FORMAT = "fipray.ensemble"
_VERSION = 1
_SPEC_KEYS = ("name", "kwargs", "num_classes", "input_shape")


def _check_spec(model_spec: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in _SPEC_KEYS if k not in model_spec]
    extra = sorted(set(model_spec) - set(_SPEC_KEYS))
    if missing or extra:
        raise ValueError(
            f"model_spec must have exactly the keys {list(_SPEC_KEYS)}; missing {missing}, unexpected {extra}"
        )
    if not isinstance(model_spec["kwargs"], Mapping):
        raise ValueError(f"model_spec['kwargs'] must be a dict, got {type(model_spec['kwargs']).__name__}")
    return {
        "name": str(model_spec["name"]),
        # The weights live in members.safetensors, so a `checkpoint` kwarg is not part of the
        # architecture; keeping it would make loading depend on a file on the machine that saved.
        "kwargs": {k: v for k, v in model_spec["kwargs"].items() if k != "checkpoint"},
        "num_classes": int(model_spec["num_classes"]),
        "input_shape": [int(d) for d in model_spec["input_shape"]],
    }


def save_ensemble(
    ensemble_or_members: Ensemble | Sequence[nn.Module],
    directory: str | Path,
    *,
    model_spec: Mapping[str, Any],
    metadata: Mapping[str, Any],
    tokenizer: str | Path | None = None,
) -> Path:
    """Write an ensemble to ``directory`` as ``members.safetensors`` + ``ensemble.json``.

    Each file is written to a temporary file in the same folder and renamed over the target, so a
    crash never leaves a half-written file. The weights are written first and the JSON (which holds
    their SHA-256) last, so a folder whose JSON exists is complete, and a mismatched pair is detected
    on load.

    Args:
        ensemble_or_members: An :class:`Ensemble` or its K member modules.
        directory: Output folder (created if needed; existing files are replaced).
        model_spec: ``{"name", "kwargs", "num_classes", "input_shape"}``, the arguments of
            ``fipray.models.create_model`` that rebuild one member.
        metadata: JSON-serialisable facts about how the members were made (operation, path ids,
            steps, config hash, ...).
        tokenizer: For members taking token ids: the tokenizer (a folder or a shortcut name such as
            ``"minilm-l6"``, see :func:`fipray.data.tokenizer.load_tokenizer`) that made their inputs;
            saved into ``tokenizer/``. None: the members' ``pretrained_dir`` when they are text
            models built from a folder holding a tokenizer, else nothing.

    Returns:
        The directory.

    Raises:
        ValueError: malformed ``model_spec`` or members of different architectures.
        TypeError: ``metadata`` is not JSON-serialisable.
        FileNotFoundError: ``tokenizer`` names no folder holding a tokenizer.
    """
    from safetensors.torch import save_file

    members = (
        list(ensemble_or_members.members)
        if isinstance(ensemble_or_members, Ensemble)
        else list(Ensemble(ensemble_or_members).members)  # validates identical architectures
    )
    spec = _check_spec(model_spec)
    try:
        json.dumps(dict(metadata), default=json_default)
    except TypeError as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None

    tensors = {
        f"m{k}.{name}": t.detach().to("cpu").clone().contiguous()  # clone: safetensors rejects shared storage
        for k, m in enumerate(members)
        for name, t in m.state_dict().items()
    }
    directory = Path(directory)
    atomic_write(directory / MEMBERS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    tok = tokenizer if tokenizer is not None else _members_tokenizer(members, spec)
    if tok is not None:
        _save_tokenizer(tok, directory / TOKENIZER_DIR)
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "num_members": len(members),
        "model_spec": spec,
        "metadata": dict(metadata),
        "members_file": MEMBERS_FILE,
        "members_sha256": sha256_file(directory / MEMBERS_FILE),
    }
    if tok is not None:  # only then: every other folder's ensemble.json stays byte-identical
        meta["tokenizer"] = TOKENIZER_DIR
    atomic_write_json(directory / META_FILE, meta)
    return directory


def _members_tokenizer(members: Sequence[nn.Module], spec: Mapping[str, Any]) -> str | None:
    """The ``pretrained_dir`` of text members (``HFTextClassifier``) when it holds a tokenizer, else None."""
    from fipray.models.hf import HFTextClassifier

    source = spec["kwargs"].get("pretrained_dir")
    if source is None or not isinstance(members[0], HFTextClassifier):
        return None
    from fipray.data.tokenizer import load_tokenizer

    try:
        load_tokenizer(source)
    except FileNotFoundError:
        return None
    return str(source)


def _save_tokenizer(tokenizer: str | Path, target: Path) -> None:
    """``save_pretrained`` of the tokenizer into ``target`` (written aside, then renamed into place)."""
    import shutil
    import tempfile

    from fipray.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tok.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def tokenizer_dir(directory: str | Path, meta: Mapping[str, Any] | None = None) -> Path | None:
    """The tokenizer folder an ensemble folder records (text members), or None.

    Raises:
        FileNotFoundError: ``ensemble.json`` names a tokenizer folder that is missing.
        ValueError: the recorded name leaves the ensemble folder.
    """
    meta = read_ensemble_meta(directory) if meta is None else meta
    name = meta.get("tokenizer")
    if name is None:
        return None
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{Path(directory) / META_FILE} is malformed: 'tokenizer' must name a subfolder, got {name!r}")
    path = Path(directory) / name
    if not path.is_dir():
        raise FileNotFoundError(f"ensemble tokenizer folder not found: {path}")
    return path


def read_ensemble_meta(directory: str | Path) -> dict[str, Any]:
    """The validated ``ensemble.json`` of a saved ensemble, without reading the weights.

    Returns:
        ``{"num_members", "model_spec", "metadata", "members_sha256", ...}`` with ``model_spec``
        normalised (``name``, ``kwargs``, ``num_classes``, ``input_shape``).

    Raises:
        FileNotFoundError: the folder or ``ensemble.json`` is missing.
        ValueError: ``ensemble.json`` is not a well-formed fipray ensemble file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"ensemble directory not found: {directory}")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"ensemble metadata file not found: {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{meta_path} is not a fipray ensemble file (format != {_FORMAT!r})")
    try:
        meta["model_spec"] = _check_spec(meta["model_spec"])
        meta["num_members"] = int(meta["num_members"])
        meta["members_sha256"] = str(meta["members_sha256"])
        if not isinstance(meta.get("metadata", {}), dict):
            raise TypeError("'metadata' is not a mapping")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path} is malformed: {e}") from None
    if meta["num_members"] < 1:
        raise ValueError(f"{meta_path} is malformed: num_members = {meta['num_members']} < 1")
    return meta


def load_ensemble(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    create_fn: Callable[..., nn.Module] | None = None,
    members: Sequence[int] | None = None,
    fused: bool = True,
) -> Ensemble:
    """Rebuild an ensemble written by :func:`save_ensemble`.

    Args:
        directory: Folder holding ``ensemble.json`` and ``members.safetensors``.
        device: Where to put the weights.
        create_fn: Builds one member as ``create_fn(name, num_classes=..., input_shape=..., **kwargs)``;
            defaults to ``fipray.models.create_model``. Pass your own for architectures outside the
            registry.
        members: Indices of the members to load (a shard of a large ensemble), in that order; only
            their tensors are read from the file. None loads all of them.
        fused: Passed to :class:`Ensemble`.

    Returns:
        An :class:`Ensemble` (members in eval mode) on ``device``.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing (the message names it).
        ValueError: a file is corrupt or the two files do not match (the message names the file), or
            ``members`` names a member the file does not hold.
    """
    directory = Path(directory)
    meta = read_ensemble_meta(directory)
    num_members = meta["num_members"]
    wanted = list(range(num_members)) if members is None else [int(k) for k in members]
    bad = [k for k in wanted if not 0 <= k < num_members]
    if bad or not wanted or len(set(wanted)) != len(wanted):
        raise ValueError(f"members must be distinct indices in [0, {num_members}), got {list(wanted)}")
    weights_path = _checked_weights(directory, meta)
    return Ensemble([_build_member(meta, k, state, weights_path, create_fn).to(device)
                     for k, state in _member_states(weights_path, wanted, num_members)], fused=fused)


def verify_ensemble(directory: str | Path, *, create_fn: Callable[..., nn.Module] | None = None) -> dict[str, Any]:
    """Check that a saved ensemble loads whole, without keeping it: what a server does before serving it.

    Reads ``ensemble.json``, checks the recorded tokenizer (text ensembles: it must load), the weights'
    SHA-256, and builds every member in turn from its tensors (strict ``load_state_dict``), holding one
    member at a time. Every failure is one line naming the file and the cause, so a command can print it.

    Returns:
        The validated ``ensemble.json`` (:func:`read_ensemble_meta`).

    Raises:
        FileNotFoundError: the folder, a file or the recorded tokenizer folder is missing.
        ValueError: a corrupt or truncated file (SHA-256 mismatch), a member that does not fit the model
            spec, a malformed ``ensemble.json`` or a tokenizer that does not load.
    """
    directory = Path(directory)
    meta = read_ensemble_meta(directory)
    tok = tokenizer_dir(directory, meta)
    if tok is not None:
        from fipray.data.tokenizer import load_tokenizer

        try:
            load_tokenizer(tok)
        except FileNotFoundError:
            raise
        except Exception as e:  # transformers raises many kinds (OSError, ValueError, JSON errors) on a bad folder
            raise ValueError(f"the ensemble tokenizer in {tok} does not load: {_one_line(e)}") from None
    weights_path = _checked_weights(directory, meta)
    for k, state in _member_states(weights_path, range(meta["num_members"]), meta["num_members"]):
        _build_member(meta, k, state, weights_path, create_fn)
    return meta


def local_ensemble(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The local folder of the ensemble ``spec`` names: a path as given; a URI (``s3://``, ``gs://``, ``file://``)
    the copy of every object under it in this node's cache (:func:`fipray.uri.cached_folder`: filled once, then
    reused while the objects' sizes and modification times stay the same). Nothing is verified here.

    Raises:
        UriError: an unknown scheme, no bucket, nothing under the prefix, a store that cannot be read.
    """
    return cached_folder(spec, cache_dir) if is_uri(spec) else Path(spec)


def fetch_ensemble(spec: str | Path, *, cache_dir: str | Path | None = None,
                   create_fn: Callable[..., nn.Module] | None = None) -> tuple[Path, dict[str, Any]]:
    """:func:`local_ensemble`, then :func:`verify_ensemble` of that folder: what a server does before serving.

    Returns:
        ``(local folder, validated ensemble.json)``.

    Raises:
        FileNotFoundError, ValueError: as :func:`verify_ensemble` (a local folder).
        UriError: for a URI, every failure (bad URI, missing folder or file, checksum mismatch) in one line
            naming the URI (:func:`fipray.uri.display`: no credentials, no query options), not the cache.
    """
    folder = local_ensemble(spec, cache_dir)
    with uri_errors(spec, folder):
        return folder, verify_ensemble(folder, create_fn=create_fn)


@contextlib.contextmanager
def uri_errors(spec: str | Path, folder: Path) -> Iterator[None]:
    """For a URI ``spec`` whose local copy is ``folder``: a FileNotFoundError or ValueError raised inside
    becomes a one-line :class:`UriError` naming the URI's files instead of the cache's. A path: unchanged."""
    if not is_uri(spec):
        yield
        return
    try:
        yield
    except UriError:
        raise
    except (FileNotFoundError, ValueError) as e:
        name = display(str(spec)).rstrip("/")
        msg = _one_line(e).replace(str(folder), name)
        raise UriError(msg if name in msg else f"ensemble {name!r}: {msg}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _checked_weights(directory: Path, meta: Mapping[str, Any]) -> Path:
    """``members.safetensors`` of the folder after its SHA-256 matched the one ``ensemble.json`` records."""
    weights_path = directory / MEMBERS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"ensemble weights file not found: {weights_path}")
    if sha256_file(weights_path) != meta["members_sha256"]:
        raise ValueError(
            f"{weights_path} is corrupt or does not belong to {directory / META_FILE} (SHA-256 mismatch)"
        )
    return weights_path


def _member_states(weights_path: Path, wanted: Iterable[int], num_members: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """``(k, tensors of member k)`` for each wanted member in order, one member read at a time.

    Raises:
        ValueError: the file is unreadable or holds a tensor of no member.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            keys: dict[int, list[str]] = {}
            for key in f.keys():
                head = key.partition(".")[0]
                k = int(head[1:]) if head[:1] == "m" and head[1:].isdigit() else -1
                if not 0 <= k < num_members:
                    raise ValueError(f"{weights_path} holds unexpected tensor {key!r} for {num_members} members")
                keys.setdefault(k, []).append(key)
            for k in wanted:
                yield k, {key.partition(".")[2]: f.get_tensor(key) for key in keys.get(k, [])}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {weights_path}: {_one_line(e)}") from None


def _build_member(meta: Mapping[str, Any], k: int, state: dict[str, Tensor], weights_path: Path,
                  create_fn: Callable[..., nn.Module] | None) -> nn.Module:
    """Member ``k`` built from the model spec with ``state`` loaded strictly (on the CPU)."""
    if create_fn is None:
        from fipray.models import create_model

        create_fn = create_model
    spec = meta["model_spec"]
    model = create_fn(spec["name"], num_classes=spec["num_classes"], input_shape=tuple(spec["input_shape"]),
                      **spec["kwargs"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"member {k} in {weights_path} does not fit model {spec['name']!r}: {_one_line(e)}") from None
    return model
