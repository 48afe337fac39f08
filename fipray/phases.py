"""Phases shared by every operation and baseline: supervised training and the FIP phase (S = λ·d + β·L)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray._batches import BatchStream, mix_seed
from fipray.config import PathConfig, TrainConfig
from fipray.core.distances import get_distance
from fipray.core.step import Anchor, StepOutput, fip_objective, metric_step, penalty_step
from fipray.optim import make_optimizer
from fipray.path import Phase, PhaseState
from fipray.precision import Scaler, autocast, device_of

Extra = Callable[[nn.Module, int, PhaseState], Tensor]


def _tag(name: str) -> int:
    # Not hash(): Python salts str hashes per process, which would break resumed runs.
    return zlib.crc32(name.encode())


def supervised_phase(
    name: str,
    x: Tensor,
    y: Tensor,
    train: TrainConfig,
    seed: int,
    *,
    steps: int | None = None,
    extra: Extra | None = None,
    grad_hook: Callable[[nn.Module], None] | None = None,
    after_step: Callable[[nn.Module, PhaseState], None] | None = None,
    finish: Callable[[nn.Module, PhaseState], dict] | None = None,
    prepare: Callable[[nn.Module], PhaseState] | None = None,
    train_mode: bool = True,
) -> Phase:
    """Cross-entropy on (x, y) minibatches, plus an optional extra penalty (EWC, replay).

    Updates run in train mode by default (BatchNorm batch statistics, dropout): base training and
    every baseline train the way the network's recipe expects.
    """
    stream = BatchStream(len(x), train.batch_size, mix_seed(seed, _tag(name)))

    def step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        idx = stream.indices(t)
        if train.precision == "fp32" and train.accumulate == 1:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            ex = extra(model, t, state) if extra is not None else torch.zeros((), device=loss.device)
            total = loss + ex
            opt.zero_grad(set_to_none=True)
            total.backward()
            if grad_hook is not None:
                grad_hook(model)
            opt.step()
            return StepOutput(total.detach(), ex.detach(), loss.detach())
        return _mixed_supervised_step(model, opt, t, state, x, y, idx, train, extra, grad_hook)

    return Phase(
        name=name, steps=train.steps if steps is None else steps, step=step,
        optimizer=lambda m: make_optimizer(train.optimizer, m.parameters(), train.lr, train.weight_decay),
        after_step=after_step, finish=finish, prepare=prepare, train_mode=train_mode,
    )


def _mixed_supervised_step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState, x: Tensor,
                           y: Tensor, idx: Tensor, train: TrainConfig, extra: Extra | None,
                           grad_hook: Callable[[nn.Module], None] | None) -> StepOutput:
    """A supervised step under autocast and/or over `train.accumulate` micro-batches (same batch)."""
    dev = device_of(model)
    scaler = Scaler(train.precision, dev)
    scaler.load(state)
    opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=dev)
    for chunk in idx.chunk(train.accumulate):
        with autocast(train.precision, dev):
            logits = model(x[chunk])
        part = F.cross_entropy(logits.float(), y[chunk]) * (len(chunk) / len(idx))
        scaler.backward(part)
        loss_sum += part.detach()
    ex = extra(model, t, state) if extra is not None else torch.zeros((), device=dev)
    if ex.requires_grad:
        scaler.backward(ex)
    scaler.unscale(opt)
    if grad_hook is not None:
        grad_hook(model)
    scaler.step(opt, state)
    return StepOutput((loss_sum + ex).detach(), ex.detach(), loss_sum)


def _mixed_penalty_step(model: nn.Module, opt: torch.optim.Optimizer, anchor: Anchor, path: PathConfig,
                        state: PhaseState, *, lam: float, beta: float, x_new: Tensor | None, y_new: Tensor | None,
                        secondary: Callable[..., Tensor] | None, grad_hook: Callable[[nn.Module], None] | None
                        ) -> StepOutput:
    """The penalty step under autocast and/or over `path.accumulate` micro-batches of the new batch and
    the memory batch (S is a mean over both, so the chunks' S weighted by their share is the batch's S)."""
    dev = device_of(model)
    dist = get_distance(path.distance)
    scaler = Scaler(path.precision, dev)
    scaler.load(state)
    k = path.accumulate
    n_mem, n_new = len(anchor), (len(x_new) if x_new is not None else 0)
    mem_chunks = torch.tensor_split(torch.arange(n_mem, device=anchor.inputs.device), k)
    new_chunks = torch.tensor_split(torch.arange(n_new, device=dev), k)
    opt.zero_grad(set_to_none=True)
    totals = [torch.zeros((), device=dev) for _ in range(3)]
    for mc, nc in zip(mem_chunks, new_chunks):
        xn = x_new[nc] if x_new is not None else None
        yn = y_new[nc] if y_new is not None else None
        sec = (lambda logits, xn=xn, yn=yn: secondary(model, logits, xn, yn, state)) if secondary is not None else None
        with autocast(path.precision, dev):
            _, d, l2 = fip_objective(model, anchor.select(mc), distance=dist, lam=lam, beta=beta, secondary=sec,
                                     x_new=xn if n_new else None)
        # S = λ·mean_mem d + β·mean_new L: each chunk's terms weighted by its share of its own batch.
        wm, wn = len(mc) / max(n_mem, 1), (len(nc) / n_new if n_new else 1.0 / k)
        s_c = lam * d * wm + beta * l2 * wn
        if s_c.requires_grad:
            scaler.backward(s_c)
        for acc, v in zip(totals, (s_c, d * wm, l2 * wn)):
            acc += v.detach().float()
    scaler.unscale(opt)
    if grad_hook is not None:
        grad_hook(model)
    scaler.step(opt, state)
    return StepOutput(*totals)


def fip_phase(
    name: str,
    path: PathConfig,
    seed: int,
    *,
    memory: Callable[[nn.Module], Anchor] | Tensor,
    secondary: Callable[[nn.Module, Tensor | None, Tensor | None, Tensor | None, PhaseState], Tensor]
    | None = None,
    new_data: tuple[Tensor, Tensor] | None = None,
    steps: int | None = None,
    lam: float | None = None,
    beta: float | None = None,
    grad_hook: Callable[[nn.Module], None] | None = None,
    after_step: Callable[[nn.Module, PhaseState], None] | None = None,
    before_step: Callable[[nn.Module, int], None] | None = None,
    finish: Callable[[nn.Module, PhaseState], dict] | None = None,
    sample_every: int = 0,
    prepare_extra: Callable[[nn.Module], PhaseState] | None = None,
) -> Phase:
    """A FIP phase: S = λ·d(f(x_mem; w), f(x_mem; w_anchor)) + β·L.

    Args:
        memory: invariance inputs (M, ...) whose anchor outputs are taken from the network at
            the phase start, or a callable building the Anchor from that network.
        secondary: (model, new_logits, new_inputs, new_labels, state) -> L; new_* are None
            without `new_data`.
        prepare_extra: model -> extra phase state, computed (and checkpointed) before the anchor;
            e.g. the sparsity masks of a masked phase.
        new_data: (x, y) of the secondary task, sampled in minibatches of path.batch_size.
        before_step: (model, step) -> None, e.g. a random kick of the undirected walk.
    """
    dist = get_distance(path.distance)
    lam = path.lam if lam is None else lam
    beta = path.beta if beta is None else beta
    new_stream = BatchStream(len(new_data[0]), path.batch_size, mix_seed(seed, 1, _tag(name))) \
        if new_data is not None else None

    def prepare(model: nn.Module) -> PhaseState:
        state = prepare_extra(model) if prepare_extra is not None else {}
        anchor = memory(model) if callable(memory) else Anchor.from_model(model, memory)
        return {**state, "anchor_inputs": anchor.inputs, "anchor_logits": anchor.logits}

    mem_stream: dict[int, BatchStream] = {}

    def step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        anchor = Anchor(state["anchor_inputs"], state["anchor_logits"])
        if path.memory_batch_size and len(anchor) > path.memory_batch_size:
            ms = mem_stream.get(len(anchor))
            if ms is None:  # built once: it caches the current epoch's permutation
                ms = mem_stream[len(anchor)] = BatchStream(len(anchor), path.memory_batch_size,
                                                           mix_seed(seed, 2, _tag(name)))
            anchor = anchor.select(ms.indices(t))
        x_new = y_new = None
        if new_stream is not None and new_data is not None:
            idx = new_stream.indices(t)
            x_new, y_new = new_data[0][idx], new_data[1][idx]
        if before_step is not None:
            before_step(model, t)
        sec = (lambda logits: secondary(model, logits, x_new, y_new, state)) if secondary is not None else None
        hook = (lambda: grad_hook(model)) if grad_hook is not None else None
        if path.step == "metric":
            # The optimizer is unused: the step is the solution of eq. 4 on ‖dw‖ = trust_radius.
            # The generator only seeds the solver's start when ∇S = 0; (seed, step) keeps resumes exact.
            gen = torch.Generator().manual_seed(mix_seed(seed, 3, _tag(name), t))
            so, _ = metric_step(model, anchor, distance=dist, lam=lam, beta=beta, radius=path.trust_radius,
                                iters=path.cg_iters, secondary=sec, x_new=x_new, grad_hook=hook, generator=gen)
            return so
        if path.precision != "fp32" or path.accumulate > 1:
            return _mixed_penalty_step(model, opt, anchor, path, state, lam=lam, beta=beta, x_new=x_new, y_new=y_new,
                                       secondary=secondary, grad_hook=grad_hook)
        return penalty_step(model, opt, anchor, distance=dist, lam=lam, beta=beta, secondary=sec,
                            x_new=x_new, grad_hook=hook)

    return Phase(
        name=name, steps=path.steps if steps is None else steps, step=step, prepare=prepare,
        optimizer=lambda m: make_optimizer(path.optimizer, m.parameters(), path.lr, path.weight_decay),
        after_step=after_step, finish=finish, sample_every=sample_every, train_mode=path.train_mode,
    )


def cross_entropy_secondary(model: nn.Module, logits: Tensor | None, x: Tensor | None,
                            y: Tensor | None, state: PhaseState) -> Tensor:
    """L = cross-entropy of the new task (continual learning's secondary objective)."""
    assert logits is not None and y is not None
    return F.cross_entropy(logits, y)
