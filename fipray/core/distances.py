"""Output-space distances d(f(x; w), f(x; w_anchor)) between a network's logits and the anchor's.

All take logits of shape (B, C) (the anchor's are constant) and return a scalar averaged over
the batch. Each is exactly 0 on identical outputs and positive otherwise, so its minimum over w
is the set of functionally invariant networks on those inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fipray.registry import Registry

Distance = Callable[[Tensor, Tensor], Tensor]
DISTANCES: Registry[Distance] = Registry("distance")


def _flat(logits: Tensor) -> Tensor:
    # Sequence outputs (B, T, C) count each position as one distribution.
    return logits.reshape(-1, logits.shape[-1])


@DISTANCES.register("bhattacharyya")
def bhattacharyya(logits: Tensor, anchor_logits: Tensor) -> Tensor:
    """Bhattacharyya distance between softmax outputs, -log Σ_c sqrt(p_c q_c), batch mean.

    The paper's code adds a small epsilon inside the square root; computing it in log space as
    -logsumexp((log p + log q) / 2) is exact, needs no epsilon and stays finite for p, q → 0.

    Args:
        logits: (B, C) current network's logits.
        anchor_logits: (B, C) the anchor network's logits on the same inputs.
    """
    logp = F.log_softmax(_flat(logits), dim=-1)
    logq = F.log_softmax(_flat(anchor_logits), dim=-1)
    # No clamp at 0: at y = y_anchor a clamp would cut the gradient and the output Hessian that
    # the Gauss-Newton metric uses (rounding leaves d within ~1e-7 of 0 there).
    return -torch.logsumexp(0.5 * (logp + logq), dim=-1).mean()


@DISTANCES.register("kl")
def kl(logits: Tensor, anchor_logits: Tensor) -> Tensor:
    """KL(q_anchor ‖ p): the anchor's distribution is the reference, batch mean."""
    logp = F.log_softmax(_flat(logits), dim=-1)
    logq = F.log_softmax(_flat(anchor_logits), dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1).mean()


@DISTANCES.register("l2")
def l2(logits: Tensor, anchor_logits: Tensor) -> Tensor:
    """Squared Euclidean distance between logit vectors, batch mean (the metric g = JᵀJ's own)."""
    return (_flat(logits) - _flat(anchor_logits)).pow(2).sum(-1).mean()


def get_distance(name: str) -> Distance:
    return DISTANCES.get(name)
