"""Model registry, ``create_model`` and the in-model input normalisation.

Every factory registered here has the signature ``factory(num_classes, input_shape, **kwargs)`` and
returns a module mapping a batch ``(B, *input_shape)`` to logits ``(B, num_classes)``. The keyword
arguments a factory accepts are read from its signature, so an unknown keyword is rejected before
anything is built and the error names it. Factories that forward arbitrary keywords (timm) declare
``**kwargs`` and leave the check to the library they wrap.

Normalisation (``mean``/``std``) lives inside the returned module rather than in the data pipeline:
functionally invariant path code compares model outputs on raw ``[0, 1]`` inputs, so the model must
be self-contained, and the data stays the same across models with different preprocessing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fipray.errors import DamagedFile
from fipray.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

#: Prefix handlers: ``name`` starting with the key is routed to the handler with the rest of the name.
#: Kept apart from ``MODELS`` because a prefix stands for an open-ended family (all of timm).
_PREFIXES: dict[str, Callable[..., nn.Module]] = {}

#: Names of factories whose inputs are integer token ids; normalisation makes no sense for them.
_TOKEN_INPUT_MODELS: set[str] = set()


def register_model(name: str | None = None, *, token_inputs: bool = False):
    """Decorator registering a model factory under ``name``.

    Args:
        name: Registry key; defaults to the function name.
        token_inputs: True when the model consumes int64 token ids, which rejects ``mean``/``std``.

    Returns:
        The decorator; it returns the factory unchanged.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        MODELS.register(key)(fn)
        if token_inputs:
            _TOKEN_INPUT_MODELS.add(key)
        return fn

    return deco


def register_model_prefix(prefix: str):
    """Decorator registering a handler for every model name starting with ``prefix`` (e.g. ``"timm:"``).

    The handler is called as ``handler(rest_of_name, num_classes, input_shape, **kwargs)``.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if prefix in _PREFIXES:
            raise ValueError(f"model prefix {prefix!r} is already registered")
        _PREFIXES[prefix] = fn
        return fn

    return deco


def list_models(pattern: str = "*") -> list[str]:
    """Names accepted by :func:`create_model` matching a glob ``pattern``.

    Prefix families are listed as ``"<prefix>*"`` (e.g. ``"timm:*"``) when the pattern matches that.
    """
    import fnmatch

    names = MODELS.names(pattern)
    names += [p + "*" for p in sorted(_PREFIXES) if fnmatch.fnmatch(p + "*", pattern)]
    return names


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` applied in front of a model.

    The statistics are non-persistent buffers: they are part of the architecture (rebuilt by
    ``create_model`` from its kwargs), not weights, so they stay out of state dicts and out of
    ``parameters()`` (which functionally invariant path code flattens).

    Args:
        mean: One value, or one per channel (``input_shape[0]`` values).
        std: Same layout as ``mean``; all entries must be positive.
        input_shape: Per-example shape ``(C, ...)``; the statistics broadcast over the trailing dims.
    """

    def __init__(
        self, mean: Sequence[float] | float, std: Sequence[float] | float, input_shape: Sequence[int]
    ):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        channels = int(input_shape[0])
        for label, t in (("mean", mean_t), ("std", std_t)):
            if t.numel() not in (1, channels):
                raise ValueError(
                    f"{label} has {t.numel()} values; expected 1 or {channels} (input_shape[0] of {tuple(input_shape)})"
                )
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        view = (-1,) + (1,) * (len(input_shape) - 1)
        self.register_buffer("mean", mean_t.reshape(view), persistent=False)
        self.register_buffer("std", std_t.reshape(view), persistent=False)
        self.mean: torch.Tensor
        self.std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape ``(B, C, ...)``; returns the same shape."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict[str, Any], skip: int) -> None:
    """Raise TypeError naming keywords ``factory`` does not take (unless it takes ``**kwargs``)."""
    params = list(inspect.signature(factory).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    allowed = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"model {name!r} got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(allowed | {'mean', 'std', 'checkpoint'}))}"
        )


def _load_reason(e: BaseException) -> str:
    """What went wrong reading a torch file, in a few words (never torch's weights_only=False advice)."""
    import pickle

    text = str(e)
    if isinstance(e, (pickle.UnpicklingError, KeyError)) or "weights_only" in text or "pickle" in text.lower():
        return "not a torch file of tensors"
    if "zip" in text.lower() or "central directory" in text or isinstance(e, EOFError):
        return "truncated or not a torch file"
    return text.splitlines()[0][:200] if text else type(e).__name__


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict: safetensors (``.safetensors``) or a torch pickle loaded with ``weights_only``.

    Args:
        path: File to read; nothing is ever downloaded.

    Returns:
        Mapping of parameter/buffer names to tensors (on CPU).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DamagedFile: (a ValueError) the file is empty, truncated, or not a state dict (naming the file and why).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise DamagedFile(f"{path} is empty (0 bytes): not a state dict")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise DamagedFile(f"{path} is not a readable safetensors file (truncated or not safetensors: {e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise DamagedFile(f"{path} is not a readable torch state dict ({_load_reason(e)})") from None
    # Training scripts often wrap the weights; accept the two common wrappers.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _load_checkpoint(model: nn.Module, inner: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model`` or, when its keys are those of the un-normalised ``inner``, into that.

    Accepting both layouts means a checkpoint saved from ``create_model(...)`` output round-trips
    whether or not ``mean``/``std`` were given, and a plain timm/HF state dict loads too.
    """
    state = load_state_dict_file(path)
    keys = set(state)
    for target in (model, inner):
        if keys == set(target.state_dict()):
            target.load_state_dict(state)
            return
    expected = set(inner.state_dict())
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    raise ValueError(
        f"checkpoint {path} does not match the model: {len(missing)} missing keys "
        f"(e.g. {missing[:5]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:5]})"
    )


def create_model(name: str, *, num_classes: int, input_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Build a registered model mapping ``(B, *input_shape)`` inputs in ``[0, 1]`` to logits ``(B, num_classes)``.

    The architecture is a pure function of ``(name, num_classes, input_shape, kwargs)`` so callers can
    store those four and rebuild the model (then load weights) anywhere.

    Args:
        name: A key from :func:`list_models`, or ``"timm:<timm model name>"``.
        num_classes: Number of output logits.
        input_shape: Per-example input shape, e.g. ``(1, 8, 8)`` or ``(L,)`` for token ids.
        **kwargs: Factory options, plus the generic ``mean``/``std`` (per-channel normalisation put in
            front of the model) and ``checkpoint`` (local state-dict file loaded after building).

    Returns:
        An ``nn.Module`` (in training mode, as built) whose forward returns a plain logits Tensor.

    Raises:
        KeyError: Unknown ``name``; the message lists the available names.
        TypeError: Keywords the model does not accept; the message names them.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape:
        raise ValueError("input_shape must have at least one dimension")
    mean = kwargs.pop("mean", None)
    std = kwargs.pop("std", None)
    checkpoint = kwargs.pop("checkpoint", None)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")

    prefix = next((p for p in _PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        handler = _PREFIXES[prefix]
        _check_kwargs(name, handler, kwargs, skip=3)
        model = handler(name[len(prefix) :], num_classes, input_shape, **kwargs)
    else:
        factory = MODELS.get(name)
        _check_kwargs(name, factory, kwargs, skip=2)
        if mean is not None and name in _TOKEN_INPUT_MODELS:
            raise ValueError(f"model {name!r} takes token ids; mean/std normalisation does not apply")
        model = factory(num_classes, input_shape, **kwargs)

    inner = model
    if mean is not None:
        model = nn.Sequential(Normalize(mean, std, input_shape), inner)
    if checkpoint is not None:
        _load_checkpoint(model, inner, checkpoint)
    return model


def model_from_spec(spec: dict[str, Any], seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """A fresh network of a stored spec (``{"name", "kwargs", "num_classes", "input_shape"}``), its
    initialisation a function of ``seed`` alone (torch's global RNG is left untouched).

    Raises:
        KeyError, TypeError: as :func:`create_model` (unknown name, unaccepted keywords).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(spec["name"], num_classes=spec["num_classes"], input_shape=tuple(spec["input_shape"]),
                             **spec["kwargs"])
    return model.to(device)
