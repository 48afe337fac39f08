"""Helpers shared by the evaluation modules: input checks and batched forward passes (predictions, accuracy,
input gradients), each in `fipray.core.modes.eval_mode`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fipray.core.modes import eval_mode


def model_device(model: nn.Module, fallback: torch.device | None = None) -> torch.device:
    """Device of the first parameter (or buffer) of ``model``; ``fallback`` or CPU when it has none."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return fallback if fallback is not None else torch.device("cpu")


def check_batch(x: Tensor, y: Tensor) -> None:
    """Raise ValueError unless ``x`` (N, ...) and ``y`` (N,) hold the same non-zero number of examples."""
    if y.ndim != 1:
        raise ValueError(f"labels y must have shape (N,), got {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("x is empty: nothing to evaluate")


def check_unit_range(x: Tensor) -> None:
    """Raise ValueError unless every entry of ``x`` lies in [0, 1] (normalisation lives inside the model)."""
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"inputs must lie in [0, 1] (normalisation belongs inside the model); got range [{lo:.4g}, {hi:.4g}]"
        )


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def predictions(
    model: nn.Module,
    x: Tensor,
    *,
    classes_allowed: Sequence[int] | None = None,
    batch_size: int = 512,
) -> Tensor:
    """Argmax predictions of ``model`` on ``x``, optionally restricted to some classes.

    Args:
        model: Maps ``(B, *input_shape)`` to logits or log-probabilities ``(B, C)``.
        x: Inputs ``(N, *input_shape)``.
        classes_allowed: Class indices the argmax may pick (the others are masked to -inf); None = all.
        batch_size: Examples per forward pass.

    Returns:
        Predicted classes ``(N,)`` (int64, on the model's device).
    """
    check_batch_size(batch_size)
    device = model_device(model, x.device)
    allowed = None if classes_allowed is None else torch.as_tensor(list(classes_allowed), dtype=torch.long)
    preds = []
    with eval_mode(model):
        for xb in x.split(batch_size):
            out = model(xb.to(device))
            if allowed is not None:
                num_classes = out.shape[-1]
                if allowed.numel() and int(allowed.max()) >= num_classes:
                    raise ValueError(
                        f"classes_allowed holds class {int(allowed.max())} but the model has {num_classes} outputs"
                    )
                keep = torch.zeros(num_classes, dtype=torch.bool, device=out.device)
                keep[allowed.to(out.device)] = True
                out = out.masked_fill(~keep, float("-inf"))
            preds.append(out.argmax(dim=-1))
    return torch.cat(preds)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512) -> float:
    """Fraction of ``x`` (N, *input_shape) whose argmax over all classes equals ``y`` (N,)."""
    check_batch(x, y)
    pred = predictions(model, x, batch_size=batch_size)
    # An exact count, not a float32 mean: accuracies of the same predictions must compare equal.
    return int((pred == y.to(pred.device)).sum()) / y.shape[0]


def input_gradients(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256) -> Tensor:
    """Per-example gradient of the cross-entropy loss with respect to the input.

    The loss is summed (not averaged) over the batch: examples do not interact in eval mode, so the
    gradient of the sum with respect to ``x[i]`` is exactly the gradient of example i's own loss.

    Args:
        model: Maps ``(B, *input_shape)`` to logits or log-probabilities ``(B, C)``; CE on
            log-probabilities is correct because ``log_softmax(log p) = log p``.
        x: Float inputs ``(N, *input_shape)``.
        y: Labels ``(N,)``.
        batch_size: Examples per backward pass.

    Returns:
        Gradients ``(N, *input_shape)`` on the model's device.
    """
    check_batch(x, y)
    check_batch_size(batch_size)
    device = model_device(model, x.device)
    grads = []
    with eval_mode(model), torch.enable_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            xb = xb.detach().to(device).requires_grad_(True)
            loss = F.cross_entropy(model(xb), yb.to(device), reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
            grads.append(g)
    return torch.cat(grads)


def as_members(members: Sequence[nn.Module] | nn.Module) -> list[nn.Module]:
    """The member list of an :class:`~fipray.ensemble.Ensemble`, or ``members`` itself as a list."""
    inner = getattr(members, "members", None)
    if isinstance(members, nn.Module) and isinstance(inner, nn.ModuleList):
        return list(inner)
    if isinstance(members, nn.Module):
        raise TypeError("pass a sequence of member modules or an Ensemble, not a single module")
    out = list(members)
    if not out:
        raise ValueError("no members given")
    return out
