"""Sparsity masks as tensor maths: which weights survive at sparsity p, and applying keep-masks.

The vocabulary the sparsify operation (`fipray.ops.sparsify`), its baselines (`fipray.baselines.sparsify`)
and the compose operation share: the counted tensors of a network by name, the exact number of weights
kept at sparsity p, global magnitude keep-masks (by sparsity or by count), and the distance ‖w − project_p(w)‖² to the p-sparse
set. Which tensors count is decided above (`fipray.eval.sparsity.counted_parameters`); here they are
only names and tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def counted_tensors(model: nn.Module, names: list[str]) -> list[Tensor]:
    """The parameters of `model` named `names`, in that order (the live tensors, not copies)."""
    params = dict(model.named_parameters())
    return [params[n] for n in names]


def keep_count(total: int, p: float) -> int:
    """How many weights survive at sparsity p: N − round(p·N), so the sparsity is within 1/(2N) of p."""
    return total - int(round(p * total))


@torch.no_grad()
def magnitude_masks(tensors: list[Tensor], p: float) -> list[Tensor]:
    """Boolean keep-masks with exactly keep_count(N, p) True entries: the largest |w| globally."""
    return largest_masks(tensors, keep_count(sum(t.numel() for t in tensors), p))


@torch.no_grad()
def largest_masks(tensors: list[Tensor], k: int) -> list[Tensor]:
    """Boolean keep-masks with exactly k True entries (0 <= k <= N): the k largest |w| over all tensors."""
    flat = torch.cat([t.detach().abs().reshape(-1) for t in tensors])
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot keep {k} of {flat.numel()} weights")
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    out, i = [], 0
    for t in tensors:
        out.append(keep[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


@torch.no_grad()
def apply_masks(tensors: list[Tensor], masks: list[Tensor]) -> None:
    """Zero, in place, every entry of each tensor whose mask entry is False."""
    for t, m in zip(tensors, masks):
        t.mul_(m)


def projection_loss(tensors: list[Tensor], p: float) -> Tensor:
    """‖w − project_p(w)‖² = Σ w² over the weights the projection would zero (mask detached)."""
    masks = magnitude_masks(tensors, p)
    # sum() of tensors starts from the int 0; the result is a Tensor whenever `tensors` is not empty.
    total: Tensor = sum(((~m) * t).pow(2).sum() for t, m in zip(tensors, masks))  # type: ignore[assignment]
    return total
