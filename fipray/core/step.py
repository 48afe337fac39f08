"""One FIP step in penalty form (paper eq. 4 with Algorithms 1-3).

    S(w) = λ · d(f(x_mem; w), f(x_mem; w_anchor)) + β · L(w)

is minimised by one optimizer step at rate η. The anchor's outputs on the invariance memory are
computed once (`Anchor.from_model`), never per step. When the secondary objective needs the
network's outputs on a new batch (continual learning's cross-entropy), the new batch and the
memory go through ONE forward pass, so a FIP step costs (B + M) / B of a fine-tune step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fipray.core.modes import eval_mode

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
        with eval_mode(model):
            outs = [model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
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


def _full(t: Tensor) -> Tensor:
    """Half-precision logits (autocast) up to float32; float32/64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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
    """S = λ·d(f(x_mem), anchor) + β·L(f(x_new)); returns (S, d, L) with graphs attached.

    In eval mode the new batch and the memory share one forward. In train mode the memory goes
    through the eval-mode network, then the new batch through the train-mode one (two forwards): the
    invariance term compares the same deterministic function the anchor was taken from.
    """
    zero = torch.zeros((), device=next(model.parameters()).device)
    if anchor is not None and len(anchor) > 0 and lam != 0.0:
        if model.training:
            # Memory first, so the BatchNorm statistics it sees are those of the step's start.
            model.eval()
            try:
                mem_logits = model(anchor.inputs)
            finally:
                model.train()
            new_logits = model(x_new) if x_new is not None else None
        elif x_new is not None:
            out = model(torch.cat([x_new, anchor.inputs]))
            new_logits, mem_logits = out[: len(x_new)], out[len(x_new) :]
        else:
            new_logits, mem_logits = None, model(anchor.inputs)
        d = distance(_full(mem_logits), _full(anchor.logits))  # float32 even under autocast
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


# --- Metric-constrained step: eq. 4 solved on the sphere ‖dw‖ = ε, not penalised ------------------


@dataclass(frozen=True)
class TrustRegionSolution:
    """dw (P,) with ‖dw‖ = radius minimising q(dw) = ⟨dw, A dw⟩ + ⟨c, dw⟩ over a Krylov space.

    `multiplier` is μ in (A + μI) dw = −c/2 (restricted to the Krylov space); `model_value` is
    q(dw); `iters` the Krylov dimension used.
    """

    step: Tensor
    multiplier: float
    model_value: float
    iters: int


def _sphere_minimiser(theta: Tensor, h: Tensor, radius: float) -> tuple[Tensor, float]:
    """argmin_z Σ θ_i z_i² + h_i z_i s.t. ‖z‖ = radius, for diagonal θ (float64).

    Stationarity gives z_i = −h_i / (2(θ_i + μ)) with μ > −θ_min chosen so ‖z‖ = radius
    (‖z(μ)‖ falls monotonically in μ there, so bisection is safe). If even at μ → −θ_min the
    norm stays below the radius (h has no weight on the bottom eigenvector: the "hard case",
    always so when c = 0), the rest of the radius goes along that eigenvector.
    """
    tmin = float(theta.min())
    hn = float(h.norm())
    imin = int(torch.argmin(theta))
    gap = (theta - tmin).clamp_min(0)
    tiny = 1e-12 * max(float(theta.abs().max()), 1.0)

    def z_at(shift: float) -> Tensor:  # shift = μ + θ_min > 0
        return -h / (2 * (gap + shift))

    if float(z_at(tiny).norm()) <= radius:
        # Hard case: fill the bottom-eigenvalue directions with whatever radius is left, against
        # the sign of their linear term (any sign when it is zero).
        low = gap <= tiny
        z = torch.zeros_like(h)
        z[~low] = -h[~low] / (2 * gap[~low])
        rest = math.sqrt(max(radius**2 - float(z.norm()) ** 2, 0.0))
        z[imin] = -rest if float(h[imin]) > 0 else rest
        return z, -tmin
    lo, hi = tiny, hn / (2 * radius) + tiny  # at hi: ‖z‖ ≤ ‖h‖ / (2 hi) ≤ radius
    for _ in range(200):
        mid = math.sqrt(lo * hi)  # bisection in log space: μ spans decades
        if float(z_at(mid).norm()) > radius:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    z = z_at(hi)
    z = z * (radius / max(float(z.norm()), 1e-300))  # exact norm (bisection leaves ~1e-13)
    return z, hi - tmin


def trust_region_step(matvec: Callable[[Tensor], Tensor], c: Tensor, radius: float, iters: int, *,
                      generator: torch.Generator | None = None) -> TrustRegionSolution:
    """Solve min ⟨dw, A dw⟩ + ⟨c, dw⟩ subject to ‖dw‖ = radius, matrix-free (A symmetric PSD).

    The Lagrangian condition is (A + μI) dw = −c/2 with μ set so that ‖dw‖ = radius. We build
    the Krylov space K_m(A, c) by Lanczos (the space CG would explore) and solve the condition
    exactly inside it: T = QᵀAQ = SΘSᵀ is m × m, so every trial μ costs O(m) and μ is found by
    bisection (the GLTR idea of Gould et al. 1999). m products with A in all.

    Args:
        matvec: (P,) -> (P,), v -> A v.
        c: (P,) the linear term (β∇L + λ∇d for a FIP step).
        radius: ε > 0, the step length.
        iters: Krylov dimension m (Lanczos steps / g·v products).
        generator: draws the start vector when c = 0 (then dw is the bottom Ritz vector: a
            direction of least output change).
    """
    from fipray.core.spectrum import lanczos

    if not radius > 0:
        raise ValueError(f"trust radius must be > 0, got {radius}")
    cn = float(c.norm())
    v0 = c if cn > 0 else torch.randn(c.shape, generator=generator, dtype=c.dtype).to(c.device)
    tri = lanczos(matvec, v0, max(1, iters))
    assert tri.basis is not None
    q = tri.basis  # (m, P)
    h_q = (q @ c).double()  # c in the Krylov basis (‖c‖ e1 when it started the run)
    theta, s = torch.linalg.eigh(tri.matrix())
    h = s.T @ h_q
    z, mu = _sphere_minimiser(theta, h, float(radius))
    y = s @ z
    dw = q.T @ y.to(q.dtype)
    value = float((theta * z**2).sum() + (h * z).sum())
    return TrustRegionSolution(step=dw, multiplier=mu, model_value=value, iters=len(tri.alpha))


def metric_step(
    model: nn.Module,
    anchor: Anchor | None,
    *,
    distance: Callable[[Tensor, Tensor], Tensor],
    lam: float,
    beta: float,
    radius: float,
    iters: int = 10,
    secondary: Secondary | None = None,
    x_new: Tensor | None = None,
    grad_hook: Callable[[], None] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[StepOutput, TrustRegionSolution]:
    """One metric-constrained FIP step (paper eq. 4, solved rather than penalised).

        dw = argmin_{‖dw‖ = ε}  λ⟨dw, dw⟩_g + ⟨dw, β∇L + λ∇d⟩,   w ← w + dw

    g is the Gauss-Newton metric of the output distance d on the memory inputs at the current
    w (`metric_operator`). The λ∇d term is zero at the phase's anchor and pulls back the drift
    that earlier steps accumulated (eq. 4 is local; without it the errors of successive steps
    add up). The gradient comes from the same fused forward as `penalty_step`, and `grad_hook`
    may edit `.grad` (e.g. masks) before it becomes c. Updates the model in place; no optimizer.

    Returns:
        The pre-step (S, d, L) as in `penalty_step`, and the solver's solution.
    """
    from fipray.core.metric import FlatView, metric_operator

    s, d, sec = fip_objective(model, anchor, distance=distance, lam=lam, beta=beta, secondary=secondary,
                              x_new=x_new)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    for _, p in named:
        p.grad = None
    if s.requires_grad:
        s.backward()
        if grad_hook is not None:
            grad_hook()
    params = {k: p.detach() for k, p in named}
    view = FlatView(params)
    c = view.flatten({k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach() for k, p in named})
    for _, p in named:
        p.grad = None
    if anchor is not None and len(anchor) > 0 and lam != 0.0:
        buffers = dict(model.named_buffers())
        frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}

        def f(p: dict[str, Tensor]) -> Tensor:
            out: Tensor = torch.func.functional_call(model, ({**frozen, **p}, buffers), (anchor.inputs,))
            return out

        gv = view.operator(metric_operator(f, params, distance=distance))

        def matvec(v: Tensor) -> Tensor:
            return lam * gv(v)
    else:
        def matvec(v: Tensor) -> Tensor:
            return torch.zeros_like(v)
    sol = trust_region_step(matvec, c, radius, iters, generator=generator)
    with torch.no_grad():
        for (_, p), dp in zip(named, view.unflatten(sol.step).values()):
            p.add_(dp)
    return StepOutput(s.detach(), d.detach(), sec.detach()), sol
