"""Sparsification along a FIP (paper Algorithm 2), ending at an exactly p-sparse network.

Phase 1 follows S = λ·d(f(x; w), f(x; w0)) + β·‖w − project_p(w)‖², where project_p zeroes the
p fraction of smallest-magnitude counted weights (global over the counted tensors). Phase 2
applies the projection as a mask (the network is now exactly p-sparse) and runs a short masked
invariance phase back towards w0's outputs, re-applying the mask after every update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fipray.config import Config
from fipray.core.step import Anchor
from fipray.eval.sparsity import counted_parameters, sparsity
from fipray.ops._common import fip_phase
from fipray.path import Phase, PhaseState


def counted(model: nn.Module, exclude_head: bool = False) -> list[str]:
    """Names of the tensors that count towards sparsity (Linear/Conv weights, head unless excluded)."""
    names = counted_parameters(model, include_head=not exclude_head)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv weights to sparsify")
    return names


def counted_tensors(model: nn.Module, names: list[str]) -> list[Tensor]:
    params = dict(model.named_parameters())
    return [params[n] for n in names]


def keep_count(total: int, p: float) -> int:
    """How many weights survive at sparsity p: N − round(p·N), so the sparsity is within 1/(2N) of p."""
    return total - int(round(p * total))


@torch.no_grad()
def magnitude_masks(tensors: list[Tensor], p: float) -> list[Tensor]:
    """Boolean keep-masks with exactly keep_count(N, p) True entries: the largest |w| globally."""
    flat = torch.cat([t.detach().abs().reshape(-1) for t in tensors])
    k = keep_count(flat.numel(), p)
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
    for t, m in zip(tensors, masks):
        t.mul_(m)


def projection_loss(tensors: list[Tensor], p: float) -> Tensor:
    """‖w − project_p(w)‖² = Σ w² over the weights the projection would zero (mask detached)."""
    masks = magnitude_masks(tensors, p)
    return sum(((~m) * t).pow(2).sum() for t, m in zip(tensors, masks))  # type: ignore[return-value]


def fip_sparsify_phases(x_mem: Tensor, dense_anchor: Anchor, p: float, cfg: Config, seed: int,
                        names: list[str], evaluate=None) -> list[Phase]:
    """The two phases for one target p, starting at the dense network w0.

    Args:
        x_mem: (M, ...) inputs on which outputs stay invariant (the training inputs).
        dense_anchor: w0's outputs on x_mem (both phases stay near the dense function).
        names: counted tensor names.
        evaluate: model -> dict merged into the final phase's results.
    """
    tag = f"{p:g}"

    def secondary(model: nn.Module, logits, x, y, state) -> Tensor:
        return projection_loss(counted_tensors(model, names), p)

    def project(model: nn.Module) -> PhaseState:
        masks = magnitude_masks(counted_tensors(model, names), p)
        apply_masks(counted_tensors(model, names), masks)
        return {"masks": masks}

    def remask(model: nn.Module, state: PhaseState) -> None:
        apply_masks(counted_tensors(model, names), state["masks"])

    def finish(model: nn.Module, state: PhaseState) -> dict:
        out = {"target": p, "sparsity": sparsity(model, names)}
        if evaluate is not None:
            out.update(evaluate(model))
        return out

    return [
        fip_phase(f"sparsify_{tag}", cfg.path, seed, memory=lambda m: dense_anchor, secondary=secondary),
        fip_phase(f"mask_{tag}", cfg.path, seed, memory=lambda m: dense_anchor, beta=0.0, lam=1.0,
                  steps=cfg.sparsify.invariance_steps, prepare_extra=project, after_step=remask,
                  finish=finish),
    ]
