"""Phases shared by every operation and baseline: supervised training and the FIP phase (S = λ·d + β·L)."""

from __future__ import annotations

import contextlib
import typing
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray.config import PathConfig, TrainConfig
from fipray.core.distances import get_distance
from fipray.core.modes import eval_mode
from fipray.core.step import Anchor, StepOutput, fip_objective, metric_step, penalty_step
from fipray.data.batches import BatchStream, mix_seed
from fipray.data.stream import Examples, TensorExamples, as_examples
from fipray.optim import make_optimizer
from fipray.path import Phase, PhaseState
from fipray.precision import Scaler, autocast, device_of

Extra = Callable[[nn.Module, int, PhaseState], Tensor]
# L of a FIP phase: (model, new_logits, new_inputs, new_labels, phase state) -> scalar; new_* None without new data
Secondary = Callable[[nn.Module, Tensor | None, Tensor | None, Tensor | None, PhaseState], Tensor]


@contextlib.contextmanager
def seeded_randomness(model: nn.Module, seed: int) -> Iterator[None]:
    """In train mode, torch's global RNG (dropout masks) seeded by `seed` for this step and restored after:
    a step's randomness is a pure function of (seed, step), like its batch, so runs repeat and resumes
    are exact. Eval mode draws nothing: no change."""
    if not model.training:
        yield
        return
    dev = device_of(model)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        # The generators torch.manual_seed would seed, without its lazy CUDA hook: with CUDA not initialised
        # that hook formats a stack trace on every call (~1.5 ms a step, a third of a small MLP's step).
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)
        yield


def phase_tag(name: str) -> int:
    """A phase name as a stable integer for ``mix_seed`` (the streams a phase draws
    its batches and randomness from). Not ``hash()``: Python salts str hashes per process, which would
    break resumed runs."""
    return zlib.crc32(name.encode())


def supervised_phase(
    name: str,
    x: Tensor | Examples,
    y: Tensor | None,
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
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    mix_in: Callable[[nn.Module, int, PhaseState], tuple[Tensor, Tensor] | None] | None = None,
) -> Phase:
    """Cross-entropy on (x, y) minibatches, plus an optional extra penalty (EWC, replay).

    Updates run in train mode by default (BatchNorm batch statistics, dropout): base training and
    every baseline train the way the network's recipe expects.

    Args:
        x, y: the examples as tensors (N, ...) and (N,), or `x` an `Examples` (e.g. streamed) and y None.
        loss: (logits, labels) -> the task loss; default `F.cross_entropy` (e.g. a continual head's
            cross-entropy over the live columns, `fipray.heads.Head.loss`).
        mix_in: (model, t, state) -> examples (x, y) appended to step t's batch before the loss (one mean
            over both: experience replay as Chaudhry et al. 2019 and the DER paper's code define it), or None.
    """
    task_loss = F.cross_entropy if loss is None else loss
    data = typing.cast(Examples, x) if y is None else TensorExamples(typing.cast(Tensor, x), y)
    source = data.batches(train.batch_size, mix_seed(seed, phase_tag(name)))

    def step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        with seeded_randomness(model, mix_seed(seed, 8, phase_tag(name), t)):
            return _step(model, opt, t, state)

    def _step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        xb, yb = source.batch(t)
        more = mix_in(model, t, state) if mix_in is not None else None
        if more is not None:
            xb, yb = torch.cat([xb, more[0].to(xb.dtype)]), torch.cat([yb, more[1]])
        if train.precision == "fp32" and train.accumulate == 1:
            loss = task_loss(model(xb), yb)
            ex = extra(model, t, state) if extra is not None else torch.zeros((), device=loss.device)
            total = loss + ex
            opt.zero_grad(set_to_none=True)
            total.backward()
            if grad_hook is not None:
                grad_hook(model)
            opt.step()
            return StepOutput(total.detach(), ex.detach(), loss.detach())
        return _mixed_supervised_step(model, opt, t, state, xb, yb, train, extra, grad_hook, task_loss)

    return Phase(
        name=name, steps=train.steps if steps is None else steps, step=step,
        optimizer=lambda m: make_optimizer(train.optimizer, m.parameters(), train.lr, train.weight_decay),
        after_step=after_step, finish=finish, prepare=prepare, train_mode=train_mode,
    )


def _mixed_supervised_step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState, x: Tensor,
                           y: Tensor, train: TrainConfig, extra: Extra | None,
                           grad_hook: Callable[[nn.Module], None] | None,
                           task_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> StepOutput:
    """A supervised step under autocast and/or over `train.accumulate` micro-batches (same batch)."""
    dev = device_of(model)
    scaler = Scaler(train.precision, dev)
    scaler.load(state)
    opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=dev)
    for chunk in torch.arange(len(x), device=x.device).chunk(train.accumulate):
        with autocast(train.precision, dev):
            logits = model(x[chunk])
        part = task_loss(logits.float(), y[chunk]) * (len(chunk) / len(x))
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
                        state: PhaseState, dist: Callable[[Tensor, Tensor], Tensor], *, lam: float, beta: float, x_new: Tensor | None, y_new: Tensor | None,
                        secondary: Callable[..., Tensor] | None, grad_hook: Callable[[nn.Module], None] | None
                        ) -> StepOutput:
    """The penalty step under autocast and/or over `path.accumulate` micro-batches of the new batch and
    the memory batch (S is a mean over both, so the chunks' S weighted by their share is the batch's S)."""
    dev = device_of(model)
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


@torch.no_grad()
def streamed_logits(model: nn.Module, examples: Examples, batch_size: int = 512) -> Tensor:
    """The eval-mode network's outputs on every item of `examples`, in order: (N, C)."""
    with eval_mode(model):
        return torch.cat([model(xb) for xb, _ in examples.iterate(batch_size)])


def fip_phase(
    name: str,
    path: PathConfig,
    seed: int,
    *,
    memory: Callable[[nn.Module], Anchor] | Tensor | Examples,
    secondary: Secondary | None = None,
    new_data: tuple[Tensor, Tensor] | Examples | None = None,
    steps: int | None = None,
    lam: float | None = None,
    beta: float | None = None,
    grad_hook: Callable[[nn.Module], None] | None = None,
    after_step: Callable[[nn.Module, PhaseState], None] | None = None,
    before_step: Callable[[nn.Module, int], None] | None = None,
    finish: Callable[[nn.Module, PhaseState], dict] | None = None,
    sample_every: int = 0,
    prepare_extra: Callable[[nn.Module], PhaseState] | None = None,
    memory_logits: Tensor | None = None,
    distance: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Phase:
    """A FIP phase: S = λ·d(f(x_mem; w), f(x_mem; w_anchor)) + β·L.

    Args:
        memory: invariance inputs (M, ...) whose anchor outputs are taken from the network at
            the phase start, or a callable building the Anchor from that network, or `Examples`
            (streamed: the anchor's outputs on every item are kept, the inputs read per memory batch).
        memory_logits: with `Examples` memory, anchor outputs fixed in advance (N, C) (e.g. w0's)
            instead of those of the network at the phase start.
        secondary: (model, new_logits, new_inputs, new_labels, state) -> L; new_* are None
            without `new_data`.
        prepare_extra: model -> extra phase state, computed (and checkpointed) before the anchor;
            e.g. the sparsity masks of a masked phase.
        new_data: (x, y) of the secondary task, or its `Examples` (e.g. streamed), sampled in
            minibatches of path.batch_size.
        before_step: (model, step) -> None, e.g. a random kick of the undirected walk.
        distance: the output distance d (logits, anchor logits) -> scalar; default `path.distance`
            (e.g. a continual head's per-task-head distance, `fipray.heads.Head.invariance`).
    """
    dist = get_distance(path.distance) if distance is None else distance
    source = as_examples(new_data).batches(path.batch_size, mix_seed(seed, 1, phase_tag(name))) \
        if new_data is not None else None
    mem = InvarianceMemory(memory, path.memory_batch_size, mix_seed(seed, 2, phase_tag(name)), memory_logits)
    step = FipStep(path, seed, name, dist, lam=path.lam if lam is None else lam,
                   beta=path.beta if beta is None else beta, memory=mem, source=source, secondary=secondary,
                   grad_hook=grad_hook, before_step=before_step)

    def prepare(model: nn.Module) -> PhaseState:
        state = prepare_extra(model) if prepare_extra is not None else {}
        return {**state, **mem.prepare(model)}

    return Phase(
        name=name, steps=path.steps if steps is None else steps, step=step, prepare=prepare,
        optimizer=lambda m: make_optimizer(path.optimizer, m.parameters(), path.lr, path.weight_decay),
        after_step=after_step, finish=finish, sample_every=sample_every, train_mode=path.train_mode,
    )


class InvarianceMemory:
    """The invariance term's data: the anchor outputs taken once at the phase start (checkpointed in the
    phase state) and the memory minibatch of step t, a pure function of (seed, t).

    Args:
        memory: inputs (M, ...) whose anchor outputs are the network's at the phase start, a callable building
            the Anchor from that network, or `Examples` (streamed: the anchor's outputs on every item are kept,
            the inputs read per memory batch).
        batch_size: memory examples per step (0: all of them).
        seed: the seed of the memory minibatch stream.
        logits: with `Examples` memory, anchor outputs fixed in advance (N, C) (e.g. w0's).
    """

    def __init__(self, memory: Callable[[nn.Module], Anchor] | Tensor | Examples, batch_size: int, seed: int,
                 logits: Tensor | None = None):
        self.memory = memory.x if isinstance(memory, TensorExamples) else memory
        self.streamed = self.memory if isinstance(self.memory, Examples) else None
        self.batch_size, self.seed, self.logits = batch_size, seed, logits
        self.streams: dict[int, BatchStream] = {}  # built once per size: a stream caches its epoch's permutation

    def prepare(self, model: nn.Module) -> PhaseState:
        """The phase-state entries of the anchor taken from `model` (= the network at the phase start)."""
        if self.streamed is not None:  # anchor outputs of every memory item; the inputs are read per step
            logits = self.logits if self.logits is not None else streamed_logits(model, self.streamed)
            return {"anchor_logits": logits}
        if callable(self.memory):
            anchor = self.memory(model)
        else:
            assert isinstance(self.memory, Tensor)
            anchor = Anchor.from_model(model, self.memory)
        return {"anchor_inputs": anchor.inputs, "anchor_logits": anchor.logits}

    def batch(self, t: int, state: PhaseState) -> Anchor:
        """The memory minibatch of step `t` (all of the memory when it is no larger than the batch size)."""
        logits = state["anchor_logits"]
        n = len(logits)
        idx = None
        if self.batch_size and n > self.batch_size:
            if n not in self.streams:
                self.streams[n] = BatchStream(n, self.batch_size, self.seed)
            idx = self.streams[n].indices(t)
        if self.streamed is not None:
            idx = torch.arange(n) if idx is None else idx
            return Anchor(self.streamed.take(idx)[0], logits[idx.to(logits.device)])
        anchor = Anchor(state["anchor_inputs"], logits)
        return anchor if idx is None else anchor.select(idx)


class FipStep:
    """One FIP step t: S = λ·d(f(x_mem; w), f(x_mem; w_anchor)) + β·L on the memory batch and new batch of t,
    by the penalty step (any optimizer; mixed precision / accumulation) or the metric-constrained step.
    Its randomness (dropout in train mode, the metric solver's start) is a pure function of (seed, t)."""

    def __init__(self, path: PathConfig, seed: int, name: str, dist: Callable[[Tensor, Tensor], Tensor], *,
                 lam: float, beta: float, memory: InvarianceMemory, source: Any,
                 secondary: Secondary | None, grad_hook: Callable[[nn.Module], None] | None,
                 before_step: Callable[[nn.Module, int], None] | None):
        self.path, self.seed, self.tag, self.dist = path, seed, phase_tag(name), dist
        self.lam, self.beta, self.memory, self.source = lam, beta, memory, source
        self.secondary, self.grad_hook, self.before_step = secondary, grad_hook, before_step

    def __call__(self, model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        with seeded_randomness(model, mix_seed(self.seed, 8, self.tag, t)):
            return self.take(model, opt, t, state)

    def take(self, model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        path, secondary, grad_hook = self.path, self.secondary, self.grad_hook
        anchor = self.memory.batch(t, state)
        x_new = y_new = None
        if self.source is not None:
            x_new, y_new = self.source.batch(t)
        if self.before_step is not None:
            self.before_step(model, t)
        sec = (lambda logits: secondary(model, logits, x_new, y_new, state)) if secondary is not None else None
        hook = (lambda: grad_hook(model)) if grad_hook is not None else None
        if path.step == "metric":
            # The optimizer is unused: the step is the solution of eq. 4 on ‖dw‖ = trust_radius.
            # The generator only seeds the solver's start when ∇S = 0; (seed, step) keeps resumes exact.
            gen = torch.Generator().manual_seed(mix_seed(self.seed, 3, self.tag, t))
            so, _ = metric_step(model, anchor, distance=self.dist, lam=self.lam, beta=self.beta,
                                radius=path.trust_radius, iters=path.cg_iters, secondary=sec, x_new=x_new,
                                grad_hook=hook, generator=gen)
            return so
        if path.precision != "fp32" or path.accumulate > 1:
            return _mixed_penalty_step(model, opt, anchor, path, state, self.dist, lam=self.lam, beta=self.beta,
                                       x_new=x_new, y_new=y_new, secondary=secondary, grad_hook=grad_hook)
        return penalty_step(model, opt, anchor, distance=self.dist, lam=self.lam, beta=self.beta, secondary=sec,
                            x_new=x_new, grad_hook=hook)


def cross_entropy_secondary(model: nn.Module, logits: Tensor | None, x: Tensor | None,
                            y: Tensor | None, state: PhaseState) -> Tensor:
    """L = cross-entropy of the new task (continual learning's secondary objective)."""
    assert logits is not None and y is not None
    return F.cross_entropy(logits, y)
