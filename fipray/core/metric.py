"""The FIP metric g = JᵀJ on weight space, applied matrix-free.

J is the Jacobian of the network's outputs over a batch with respect to the parameters, so
⟨dw, dw⟩_g = ‖J dw‖² is how far the outputs move for a weight change dw. We never form g
(P × P): a metric-vector product is one forward-mode JVP (J v) followed by one reverse-mode
VJP (Jᵀ u), both from torch.func on a parameter dict.

Both functions normalise by the number of output rows B so values do not grow with the batch:
g = (1/B) Σ_b J_bᵀ H J_b, with H = I (Euclidean on logits) or H = ∇²_y d(y, y_anchor) at
y = y_anchor (the Gauss-Newton metric of an output distance d, e.g. Bhattacharyya).

Every JVP runs with scaled-dot-product attention on PyTorch's math kernel (`forward_jvp`): the fused
kernels (flash, memory-efficient, cuDNN) implement no forward-mode AD, so J·v through a transformer
(HF BERT/ViT, timm ViT/DeiT) would fail with them. Reverse-mode passes keep the fast kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

Params = dict[str, Tensor]
OutputFn = Callable[[Params], Tensor]


def forward_jvp(f: Callable[..., Tensor], primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Tensor, Tensor]:
    """(f(primals), J·tangents) by forward-mode AD, attention on the math kernel (see the module doc)."""
    with sdpa_kernel([SDPBackend.MATH]):
        out = torch.func.jvp(f, primals, tangents)
    return out[0], out[1]


def _output_hvp(distance: Callable[[Tensor, Tensor], Tensor], y0: Tensor, u: Tensor) -> Tensor:
    """H u where H is the Hessian of y -> B·d(y, y0) at y = y0 (forward-over-reverse)."""
    y0 = y0.detach()
    n = y0.reshape(-1, y0.shape[-1]).shape[0]

    def grad_d(y: Tensor) -> Tensor:
        out: Tensor = torch.func.grad(lambda z: distance(z, y0) * n)(y)
        return out

    hu: Tensor = forward_jvp(grad_d, (y0,), (u,))[1]
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
    y, jv = forward_jvp(f, (params,), (v,))
    n = y.reshape(-1, y.shape[-1]).shape[0]
    u = jv if distance is None else _output_hvp(distance, y, jv)
    pullback = vjp(f, params)[1]
    gv: Params = pullback(u / n)[0]
    return gv


def metric_norm(f: OutputFn, params: Params, dw: Params) -> Tensor:
    """⟨dw, dw⟩_g = ‖J dw‖² / B: the squared output displacement a weight step dw causes."""
    y, jv = forward_jvp(f, (params,), (dw,))
    n = y.reshape(-1, y.shape[-1]).shape[0]
    out: Tensor = jv.pow(2).sum() / n
    return out


def flat_dot(a: Params, b: Params) -> Tensor:
    """Σ_k ⟨a_k, b_k⟩ over a parameter dict."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


MetricOperator = Callable[[Params], Params]


def output_hessian(distance: Callable[[Tensor, Tensor], Tensor], y0: Tensor) -> Callable[[Tensor], Tensor]:
    """u -> H u, H the Hessian of y -> B·d(y, y0) at y = y0 (block diagonal: one C × C block per row).

    The registered distances have closed forms at y = y0 (p = softmax(y0)), far cheaper than
    autodiff for the many products of a Krylov solver:
    Bhattacharyya (diag(p) − ppᵀ) / 4, KL (diag(p) − ppᵀ) (the Fisher information), l2 2I.
    Any other distance falls back to forward-over-reverse autodiff (`_output_hvp`).
    """
    from fipray.core import distances as D

    y0 = y0.detach()
    if distance is D.l2:
        return lambda u: 2.0 * u
    if distance is D.bhattacharyya or distance is D.kl:
        scale = 0.25 if distance is D.bhattacharyya else 1.0
        y2 = y0.reshape(-1, y0.shape[-1])
        # Half-precision logits (autocast) get a float32 softmax; float32/64 keep their precision.
        p = torch.softmax(y2.float() if y2.dtype in (torch.float16, torch.bfloat16) else y2, dim=-1).to(y0.dtype)

        def fisher(u: Tensor) -> Tensor:
            uf = u.reshape(p.shape)
            return (scale * (p * uf - p * (p * uf).sum(-1, keepdim=True))).reshape(u.shape)

        return fisher
    return lambda u: _output_hvp(distance, y0, u)


def metric_operator(
    f: OutputFn,
    params: Params,
    *,
    distance: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> MetricOperator:
    """v -> g·v at a fixed point w, for many products at the same w (Lanczos, CG).

    Same product as `metric_vp`, but the reverse-mode pullback (and the forward pass under it)
    is built once and reused by every call: each product then costs one JVP and one VJP.

    Args:
        f: maps a parameter dict to outputs (B, C) (the batch is closed over).
        params: the point w (held fixed for the operator's lifetime).
        distance: None for H = I (g = JᵀJ); an output distance for its Gauss-Newton metric.
    """
    params = {k: v.detach() for k, v in params.items()}
    y, pullback = vjp(f, params)[:2]
    y = y.detach()
    n = y.reshape(-1, y.shape[-1]).shape[0]
    hvp = None if distance is None else output_hessian(distance, y)

    def gv(v: Params) -> Params:
        jv = forward_jvp(f, (params,), (v,))[1]
        u = jv if hvp is None else hvp(jv)
        (out,) = pullback(u.detach() / n)
        return {k: t.detach() for k, t in out.items()}

    return gv


class FlatView:
    """Flatten a parameter dict to one vector (P,) and back, in a fixed key order.

    Krylov solvers work on flat vectors; the metric works on dicts. The flat vector uses the
    parameters' dtype and device.
    """

    def __init__(self, like: Params):
        self.keys = list(like)
        self.shapes = [like[k].shape for k in self.keys]
        self.sizes = [like[k].numel() for k in self.keys]
        self.numel = sum(self.sizes)
        first = like[self.keys[0]]
        self.dtype, self.device = first.dtype, first.device

    def flatten(self, d: Params) -> Tensor:
        return torch.cat([d[k].reshape(-1) for k in self.keys])

    def unflatten(self, w: Tensor) -> Params:
        return {k: t.reshape(s) for k, t, s in zip(self.keys, torch.split(w, self.sizes), self.shapes)}

    def operator(self, op: MetricOperator) -> Callable[[Tensor], Tensor]:
        """The flat version (P,) -> (P,) of a dict operator."""
        return lambda w: self.flatten(op(self.unflatten(w)))
