"""Ensemble diversity as defined by the FIP paper, plus pairwise disagreement.

- Representation diversity score: for each layer, the std over members of the L2 norm of that
  layer's activation, averaged over inputs.
- Coherence with a surrogate: per input, the maximum over members of the cosine similarity between
  the member's and the surrogate's input-gradient of the loss, averaged over inputs (low coherence
  means adversarial examples crafted on the surrogate transfer poorly).
- Pairwise disagreement: the fraction of inputs on which two members' argmax differ, averaged over pairs.

``members`` may be a sequence of modules or an :class:`~fipray.ensemble.Ensemble`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fipray.core.modes import eval_mode
from fipray.eval.predict import (
    as_members,
    check_batch,
    check_batch_size,
    input_gradients,
    model_device,
    predictions,
)

_DEFAULT_LAYER_TYPES = (nn.ReLU, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.ReLU``, ``nn.Linear`` and ``nn.Conv{1,2,3}d`` modules of ``model``, in registration order."""
    return [name for name, m in model.named_modules() if name and isinstance(m, _DEFAULT_LAYER_TYPES)]


@torch.no_grad()
def _activation_norms(model: nn.Module, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """L2 norm per example of each hooked layer's output; shape (B,) per key.

    A module called several times in one forward pass (a ReLU reused inside a block) yields one key
    per call: ``name``, ``name[1]``, ``name[2]``, ...
    """
    norms: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returns {type(output).__name__}, not a Tensor")
            key, n = name, 1
            while key in norms:
                key, n = f"{name}[{n}]", n + 1
            norms[key] = output.flatten(1).float().norm(dim=1)

        return hook

    try:
        for name in layers:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        model(x)
    finally:
        for h in handles:
            h.remove()
    return norms


def representation_diversity(
    members: Sequence[nn.Module] | nn.Module,
    x: Tensor,
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 256,
) -> dict[str, float]:
    """Paper's representation diversity score, per layer and averaged over layers.

    For each layer and input, the L2 norm of the layer's output (flattened) is taken in every member;
    the score is the standard deviation of those K norms (population std, ddof = 0), averaged over
    the inputs. Activations are captured with forward hooks, so only module outputs can be measured
    (a functional ``F.relu`` is invisible; the Linear/Conv before it is still measured).

    Args:
        members: K >= 2 modules of identical architecture, or an Ensemble.
        x: Inputs ``(N, *input_shape)``.
        layers: Module names to measure (as in ``named_modules()``); default :func:`default_layers`
            of the first member.
        batch_size: Examples per forward pass.

    Returns:
        ``{layer: score, ..., "mean": mean over layers}``.

    Raises:
        ValueError: fewer than 2 members, empty ``x``, no layers, or members whose layers differ.
    """
    ms = as_members(members)
    if len(ms) < 2:
        raise ValueError(f"representation diversity needs at least 2 members, got {len(ms)}")
    if x.shape[0] == 0:
        raise ValueError("x is empty: nothing to evaluate")
    check_batch_size(batch_size)
    layers = default_layers(ms[0]) if layers is None else list(layers)
    if not layers:
        raise ValueError("no layers to measure (the model has no ReLU/Linear/Conv module; pass `layers`)")
    for name in layers:
        try:
            ms[0].get_submodule(name)
        except AttributeError:
            raise ValueError(f"unknown layer {name!r}; e.g. {default_layers(ms[0])[:10]}") from None

    sums: dict[str, float] = {}
    with eval_mode(*ms):
        for xb in x.split(batch_size):
            per_member = [_activation_norms(m, xb.to(model_device(m, xb.device)), layers) for m in ms]
            keys = list(per_member[0])
            if any(list(p) != keys for p in per_member[1:]):
                raise ValueError("members expose different layers; they must share one architecture")
            for key in keys:
                norms = torch.stack([p[key].to(per_member[0][key].device) for p in per_member])  # (K, B)
                sums[key] = sums.get(key, 0.0) + float(norms.std(dim=0, correction=0).sum())
    scores = {key: total / x.shape[0] for key, total in sums.items()}
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def coherence(
    members: Sequence[nn.Module] | nn.Module,
    surrogate: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 256,
) -> float:
    """Paper's coherence: mean over inputs of max over members of cos(∇ₓ L_member, ∇ₓ L_surrogate).

    L is the cross-entropy loss of each model at ``(x, y)``. An all-zero gradient has cosine 0.

    Args:
        members: K >= 1 modules, or an Ensemble; each maps ``(B, *input_shape)`` to logits ``(B, C)``.
        surrogate: The trained network adversarial examples would be crafted on.
        x: Float inputs ``(N, *input_shape)``.
        y: Labels ``(N,)``.
        batch_size: Examples per backward pass.

    Returns:
        Coherence in [-1, 1]; 1 when a member's gradients align with the surrogate's on every input.
    """
    ms = as_members(members)
    check_batch(x, y)
    g_s = input_gradients(surrogate, x, y, batch_size=batch_size).flatten(1)  # (N, D)
    best = None
    for m in ms:
        g_m = input_gradients(m, x, y, batch_size=batch_size).flatten(1).to(g_s.device)
        cos = F.cosine_similarity(g_m, g_s, dim=1)  # (N,)
        best = cos if best is None else torch.maximum(best, cos)
    assert best is not None
    return float(best.mean())


def pairwise_disagreement(
    members: Sequence[nn.Module] | nn.Module, x: Tensor, *, batch_size: int = 512
) -> float:
    """Mean over member pairs of the fraction of inputs whose argmax predictions differ.

    Args:
        members: K >= 2 modules, or an Ensemble.
        x: Inputs ``(N, *input_shape)``.
        batch_size: Examples per forward pass.

    Returns:
        Disagreement in [0, 1]; 0 when all members predict alike.
    """
    ms = as_members(members)
    if len(ms) < 2:
        raise ValueError(f"pairwise disagreement needs at least 2 members, got {len(ms)}")
    if x.shape[0] == 0:
        raise ValueError("x is empty: nothing to evaluate")
    preds = torch.stack([predictions(m, x, batch_size=batch_size).cpu() for m in ms])  # (K, N)
    pairs = list(combinations(range(len(ms)), 2))
    return sum(float((preds[i] != preds[j]).float().mean()) for i, j in pairs) / len(pairs)


def coherence_by_surrogate(
    members: Sequence[nn.Module] | nn.Module,
    surrogates: Mapping[str, nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 256,
) -> dict[str, float]:
    """:func:`coherence` of ``members`` against each named surrogate (e.g. w0 and an independent ensemble).

    A surrogate may itself be an Ensemble: its input-gradient is that of the log-mean-softmax head, the
    gradient a transfer attack crafted on it follows.

    Returns:
        ``{name: coherence in [-1, 1]}`` in the order of ``surrogates``.
    """
    return {name: coherence(members, s, x, y, batch_size=batch_size) for name, s in surrogates.items()}


def member_coherence(
    members: Sequence[nn.Module] | nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256
) -> float:
    """Mean over member pairs and inputs of cos(∇ₓ L_i, ∇ₓ L_j): how aligned the members' attack directions are.

    Args:
        members: K >= 2 modules, or an Ensemble.
        x: Float inputs ``(N, *input_shape)``.
        y: Labels ``(N,)``.

    Returns:
        Mean cosine in [-1, 1]; 1 when every member's input-gradient points the same way on every input.
    """
    ms = as_members(members)
    if len(ms) < 2:
        raise ValueError(f"member coherence needs at least 2 members, got {len(ms)}")
    grads = [input_gradients(m, x, y, batch_size=batch_size).flatten(1) for m in ms]
    pairs = list(combinations(range(len(ms)), 2))
    return sum(float(F.cosine_similarity(grads[i], grads[j].to(grads[i].device), dim=1).mean())
               for i, j in pairs) / len(pairs)
