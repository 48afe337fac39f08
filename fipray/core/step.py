"""One FIP step in penalty form (paper eq. 4 with Algorithms 1-3).

    S(w) = λ · d(f(x_mem; w), f(x_mem; w_anchor)) + β · L(w)

is minimised by one optimizer step at rate η. The anchor's outputs on the invariance memory are
computed once (`Anchor.from_model`), never per step. When the secondary objective needs the
network's outputs on a new batch (continual learning's cross-entropy), the new batch and the
memory go through ONE forward pass, so a FIP step costs (B + M) / B of a fine-tune step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Secondary = Callable[[Tensor | None], Tensor]


@dataclass(frozen=True)
class Anchor:
    """The frozen reference: memory inputs (M, ...) and the anchor network's logits (M, C) on them."""

    inputs: Tensor
    logits: Tensor

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, inputs: Tensor, batch_size: int = 1024) -> Anchor:
        """Evaluate `model` once on `inputs` (eval mode) and freeze the result."""
        was_training = model.training
        model.eval()
        outs = [model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        model.train(was_training)
        return cls(inputs=inputs, logits=torch.cat(outs).detach())

    def __len__(self) -> int:
        return len(self.inputs)

    def select(self, idx: Tensor) -> Anchor:
        return Anchor(self.inputs[idx], self.logits[idx])


@dataclass(frozen=True)
class StepOutput:
    """Detached scalars of one step (no host sync until someone calls .item())."""

    objective: Tensor
    distance: Tensor
    secondary: Tensor


def fip_objective(
    model: nn.Module,
    anchor: Anchor | None,
    *,
    distance: Callable[[Tensor, Tensor], Tensor],
    lam: float,
    beta: float,
    secondary: Secondary | None = None,
    x_new: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """S = λ·d(f(x_mem), anchor) + β·L(f(x_new)); returns (S, d, L) with graphs attached."""
    zero = torch.zeros((), device=next(model.parameters()).device)
    if anchor is not None and len(anchor) > 0 and lam != 0.0:
        if x_new is not None:
            out = model(torch.cat([x_new, anchor.inputs]))
            new_logits, mem_logits = out[: len(x_new)], out[len(x_new) :]
        else:
            new_logits, mem_logits = None, model(anchor.inputs)
        d = distance(mem_logits, anchor.logits)
    else:
        new_logits = model(x_new) if x_new is not None else None
        d = zero
    sec = secondary(new_logits) if secondary is not None else zero
    return lam * d + beta * sec, d, sec


def penalty_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    anchor: Anchor | None,
    *,
    distance: Callable[[Tensor, Tensor], Tensor],
    lam: float,
    beta: float,
    secondary: Secondary | None = None,
    x_new: Tensor | None = None,
    grad_hook: Callable[[], None] | None = None,
) -> StepOutput:
    """One optimizer step on S. `grad_hook` may edit .grad before the update (e.g. masks)."""
    s, d, sec = fip_objective(
        model, anchor, distance=distance, lam=lam, beta=beta, secondary=secondary, x_new=x_new
    )
    optimizer.zero_grad(set_to_none=True)
    if s.requires_grad:  # λ = 0 with no secondary: nothing to follow (a pure random walk, if kicked)
        s.backward()
        if grad_hook is not None:
            grad_hook()
        optimizer.step()
    return StepOutput(s.detach(), d.detach(), sec.detach())
