"""Undirected FIPs and robust ensembles (paper Algorithm 3).

With L = 0 the path objective S = λ·d(f(x; w), f(x; w0)) has zero gradient at w0, so plain
gradient descent would not move. We drive the walk with a small random kick each step
(Gaussian, scaled by each tensor's RMS) and let the invariance gradient pull the outputs back:
components of the kick along directions that change the function are undone, components in the
(near-)null space of the metric g accumulate, so the weights travel while the outputs stay put.
Optionally β weights a diversity objective: the cosine similarity between the input-gradient
of the network's loss and that of w0 (the "coherence" the paper links to robustness).

Networks are sampled every k steps; `select_members` keeps the N samples whose outputs move
least under an FGSM perturbation of the inputs (the δ rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray._batches import mix_seed
from fipray.config import Config
from fipray.core.distances import get_distance
from fipray.ops._common import fip_phase
from fipray.path import Phase, PhaseState


def input_gradient(logits_fn, x: Tensor, y: Tensor, create_graph: bool = False) -> Tensor:
    """∇_x CE(f(x), y), (B, *input_shape)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(logits_fn(x), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return g


def _kick(noise: float, seed: int):
    def before_step(model: nn.Module, t: int) -> None:
        if noise <= 0:
            return
        dev = next(model.parameters()).device
        g = torch.Generator(device=dev).manual_seed(mix_seed(seed, 6, t))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    rms = p.pow(2).mean().sqrt().clamp_min(1e-8)
                    p.add_(torch.randn(p.shape, generator=g, device=dev, dtype=p.dtype) * (noise * rms))

    return before_step


def undirected_phase(x_mem: Tensor, y_mem: Tensor, cfg: Config, seed: int, name: str = "undirected") -> Phase:
    """The L = 0 walk from the network at the phase start, sampling every `ensemble.sample_every` steps."""
    ec = cfg.ensemble
    secondary = prepare_extra = None
    if ec.diversity:
        def prepare_extra(model: nn.Module) -> PhaseState:
            # w0 lives in the phase state, so a resumed walk measures coherence to the same w0.
            return {"w0": {k: v.detach().clone() for k, v in model.state_dict().items()}}

        def secondary(model: nn.Module, logits, x: Tensor, y: Tensor, state: PhaseState) -> Tensor:
            g0 = input_gradient(lambda z: torch.func.functional_call(model, state["w0"], (z,)), x, y)
            g = input_gradient(model, x, y, create_graph=True)
            return F.cosine_similarity(g.flatten(1), g0.detach().flatten(1), dim=1, eps=1e-12).mean()

    return fip_phase(name, cfg.path, seed, memory=x_mem, secondary=secondary,
                     new_data=(x_mem, y_mem) if ec.diversity else None,
                     before_step=_kick(ec.noise, seed), sample_every=ec.sample_every,
                     prepare_extra=prepare_extra)


def fgsm_output_shift(model: nn.Module, x: Tensor, y: Tensor, eps: float, distance: str) -> float:
    """H = d(f(x; w), f(x'; w)) with x' = clip(x + ε·sign ∇_x CE) (Algorithm 3, line 10)."""
    was = model.training
    model.eval()
    g = input_gradient(model, x, y)
    x_adv = (x + eps * g.sign()).clamp(0, 1)
    with torch.no_grad():
        h = float(get_distance(distance)(model(x_adv), model(x)))
    model.train(was)
    return h


def select_members(candidates: list[nn.Module], x: Tensor, y: Tensor, *, members: int, eps: float,
                   delta: float, distance: str) -> tuple[list[int], list[float]]:
    """Indices of the kept candidates (δ rule) and every candidate's H.

    δ > 0 keeps candidates with H ≤ δ (lowest H first, at most `members`); δ = 0 keeps the
    `members` candidates with the lowest H. Raises if fewer than `members` qualify.
    """
    h = [fgsm_output_shift(m, x, y, eps, distance) for m in candidates]
    order = sorted(range(len(h)), key=lambda i: h[i])
    if delta > 0:
        order = [i for i in order if h[i] <= delta]
    if len(order) < members:
        raise ValueError(
            f"only {len(order)} of {len(candidates)} sampled networks qualify (δ = {delta}); "
            f"need ensemble.members = {members}: raise ensemble.delta, path.steps or lower sample_every"
        )
    return sorted(order[:members]), h
