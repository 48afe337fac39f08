"""The FIP metric g = JᵀJ on weight space, applied matrix-free.

J is the Jacobian of the network's outputs over a batch with respect to the parameters, so
⟨dw, dw⟩_g = ‖J dw‖² is how far the outputs move for a weight change dw. We never form g
(P × P): a metric-vector product is one forward-mode JVP (J v) followed by one reverse-mode
VJP (Jᵀ u), both from torch.func on a parameter dict.

Both functions normalise by the number of output rows B so values do not grow with the batch:
g = (1/B) Σ_b J_bᵀ H J_b, with H = I (Euclidean on logits) or H = ∇²_y d(y, y_anchor) at
y = y_anchor (the Gauss-Newton metric of an output distance d, e.g. Bhattacharyya).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vjp

Params = dict[str, Tensor]
OutputFn = Callable[[Params], Tensor]


def _output_hvp(distance: Callable[[Tensor, Tensor], Tensor], y0: Tensor, u: Tensor) -> Tensor:
    """H u where H is the Hessian of y -> B·d(y, y0) at y = y0 (forward-over-reverse)."""
    y0 = y0.detach()
    n = y0.reshape(-1, y0.shape[-1]).shape[0]

    def grad_d(y: Tensor) -> Tensor:
        return torch.func.grad(lambda z: distance(z, y0) * n)(y)

    _, hu = jvp(grad_d, (y0,), (u,))
    return hu


def metric_vp(
    f: OutputFn,
    params: Params,
    v: Params,
    *,
    distance: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Params:
    """g·v = Jᵀ H (J v) / B for the outputs y = f(params).

    Args:
        f: maps a parameter dict to outputs (B, C) (the batch is closed over).
        params: parameter dict (the point w where g is evaluated).
        v: tangent dict with the same keys/shapes as params.
        distance: None for H = I (g = JᵀJ); an output distance for its Gauss-Newton metric.

    Returns:
        dict like params holding g·v.
    """
    y, jv = jvp(f, (params,), (v,))
    n = y.reshape(-1, y.shape[-1]).shape[0]
    u = jv if distance is None else _output_hvp(distance, y, jv)
    _, pullback = vjp(f, params)
    (gv,) = pullback(u / n)
    return gv


def metric_norm(f: OutputFn, params: Params, dw: Params) -> Tensor:
    """⟨dw, dw⟩_g = ‖J dw‖² / B: the squared output displacement a weight step dw causes."""
    y, jv = jvp(f, (params,), (dw,))
    n = y.reshape(-1, y.shape[-1]).shape[0]
    return jv.pow(2).sum() / n


def flat_dot(a: Params, b: Params) -> Tensor:
    """Σ_k ⟨a_k, b_k⟩ over a parameter dict."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]
