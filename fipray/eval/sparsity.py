"""Which tensors count towards sparsity, and the exact fraction of zeros among them.

PROTOCOLS.md: by default the weights of Linear and Conv layers count; biases, norm layers and
embeddings do not; the classifier head is included unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

_CONV_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with a transposed weight. Matching by class name and
    # module instead of importing transformers keeps this check free: if such a module exists,
    # transformers is already imported.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def counted_parameters(model: nn.Module, include_head: bool = True, include: Sequence[str] = ()) -> list[str]:
    """Names of the weight tensors that sparsity is measured over.

    These are the ``weight`` tensors of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers'
    ``Conv1D`` modules, in module registration order. Biases, normalisation layers and embeddings are
    not counted. A tensor shared by several modules (tied weights) is listed once, under its first name.

    Args:
        model: Any module.
        include_head: False drops the classifier head, taken to be the last ``nn.Linear`` in
            registration order (true for fipray's models, timm and HF classifiers, which define the
            head last).
        include: Glob patterns (``fnmatch``, case-sensitive; ``*`` also matches dots) over the names
            above: when given, only the names matching at least one pattern are kept, e.g.
            ``["model.bert.encoder.*"]`` for a HF BERT's encoder Linears (attention q/k/v/output and
            FFN), without the pooler and classifier. Applied after ``include_head``. Empty = all.

    Returns:
        Parameter names as in ``model.named_parameters()``, e.g. ``["0.weight", "2.weight"]``.

    Raises:
        ValueError: ``include_head=False`` but the model has no ``nn.Linear``; or a pattern of
            ``include`` matches none of the Linear/Conv weights (the message names it and some of them).
    """
    names: list[str] = []
    seen: set[int] = set()
    last_linear: str | None = None
    for mod_name, module in model.named_modules():
        if not (isinstance(module, _CONV_LINEAR) or is_hf_conv1d(module)):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or id(weight) in seen:
            continue
        seen.add(id(weight))
        name = f"{mod_name}.weight" if mod_name else "weight"
        names.append(name)
        if isinstance(module, nn.Linear):
            last_linear = name
    if not include_head:
        if last_linear is None:
            raise ValueError("include_head=False but the model has no nn.Linear head to drop")
        names.remove(last_linear)
    if include:
        names = _select(names, (include,) if isinstance(include, str) else include, include_head)
    return names


def _select(names: list[str], include: Sequence[str], include_head: bool) -> list[str]:
    """The names matching at least one pattern; every pattern must match something."""
    unmatched = [pat for pat in include if not any(fnmatchcase(n, pat) for n in names)]
    if unmatched:
        few = names if len(names) <= 6 else [*names[:4], "...", *names[-2:]]
        shown = ", ".join(few) + (f" ({len(names)} in all)" if len(names) > 6 else "")
        head = "" if include_head else " (the head is already dropped)"
        raise ValueError(f"include pattern(s) {unmatched} match none of the Linear/Conv weights{head}; "
                         f"the candidates are: {shown or 'none'}")
    return [n for n in names if any(fnmatchcase(n, pat) for pat in include)]


def _get_tensor(source: nn.Module | Mapping[str, Tensor], name: str) -> Tensor:
    if isinstance(source, nn.Module):
        mod_name, _, attr = name.rpartition(".")
        try:
            # Attribute access (not named_parameters) also sees torch.nn.utils.prune's masked
            # `weight`, which is a plain attribute recomputed from weight_orig * weight_mask.
            t = getattr(source.get_submodule(mod_name), attr)
        except AttributeError:
            raise KeyError(f"model has no tensor {name!r}") from None
        if not isinstance(t, Tensor):
            raise KeyError(f"{name!r} is not a tensor in the model")
        return t
    if name in source:
        return source[name]
    # A state dict saved from a torch.nn.utils.prune model stores the pair instead of the weight.
    if f"{name}_orig" in source and f"{name}_mask" in source:
        return source[f"{name}_orig"] * source[f"{name}_mask"]
    raise KeyError(f"state dict has no tensor {name!r} (it has e.g. {sorted(source)[:8]})")


@torch.no_grad()
def sparsity_report(model: nn.Module | Mapping[str, Tensor], names: Sequence[str]) -> dict:
    """Per-tensor and total counts of exact zeros over the counted tensors.

    Args:
        model: A module or a state dict.
        names: Tensors to count, usually ``counted_parameters(model)``.

    Returns:
        ``{"tensors": {name: {"numel", "zeros", "sparsity"}}, "total": {"numel", "zeros", "sparsity"}}``
        with integer counts and float fractions.

    Raises:
        ValueError: ``names`` is empty or repeats a name.
        KeyError: a name is not a tensor of ``model``.
    """
    if not names:
        raise ValueError("no tensors to count: names is empty")
    if len(set(names)) != len(names):
        raise ValueError("names repeats a tensor, which would count it twice")
    tensors: dict[str, dict] = {}
    numel = zeros = 0
    for name in names:
        t = _get_tensor(model, name)
        n, z = t.numel(), int((t == 0).sum())
        tensors[name] = {"numel": n, "zeros": z, "sparsity": z / n if n else 0.0}
        numel += n
        zeros += z
    total = {"numel": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0}
    return {"tensors": tensors, "total": total}


def sparsity(model_or_state_dict: nn.Module | Mapping[str, Tensor], names: Sequence[str]) -> float:
    """Fraction of exact zeros over all counted tensors together (not a mean of per-tensor fractions).

    Args:
        model_or_state_dict: A module or a state dict.
        names: Tensors to count, usually ``counted_parameters(model)``.

    Returns:
        ``zeros / numel`` over the tensors in ``names``, in [0, 1].
    """
    return sparsity_report(model_or_state_dict, names)["total"]["sparsity"]
