"""Replay baselines on the DER paper's protocol: one reservoir buffer over the whole stream.

With `continual.memory: reservoir` ER, DER and DER++ replay from a buffer of `continual.buffer_size`
examples that every training batch of every task is offered to (`fipray.data.reservoir`), exactly as
Buzzega et al. (NeurIPS 2020) run them: the buffer fills during task 0 already, holds the current
task's examples too, and DER stores each example's logits at the moment it enters the buffer. Task
lengths follow `continual.epochs` (passes over each task's training data) or `path.steps`.

ER concatenates the replay minibatch to the new batch under one mean cross-entropy (`er_replay:
concat`, the standard ER of Chaudhry et al. 2019 and the DER code) or adds the two means (`sum`, what
fipray's per-task ER has always done). DER's loss is CE(batch) + α·MSE(f(x_buf), z_buf) and DER++ adds
β·CE(f(x'_buf), y'_buf) on a second, independent buffer draw.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from fipray.config import Config, TrainConfig
from fipray.core.distances import get_distance
from fipray.data.batches import BatchStream, mix_seed
from fipray.data.memory import TaskTensors, head_of
from fipray.data.reservoir import ReplayBuffer, ReservoirPlan
from fipray.data.transformed import ConcatExamples, gather
from fipray.eval.continual import row_finish
from fipray.path import Phase, PhaseState
from fipray.phases import phase_tag, supervised_phase


def first_task(cfg: Config) -> int:
    """The first task a method's own phases learn: 0 when every method learns task 0 itself
    (`continual.base: each`, the DER protocol), else 1 (task 0 is the shared base network)."""
    return 0 if cfg.continual.base == "each" else 1


def task_steps(cfg: Config, n: int, batch_size: int) -> int:
    """Steps of one task's phase: `continual.epochs` passes over its `n` training examples (the last
    incomplete batch of a pass dropped), else `path.steps`."""
    epochs = cfg.continual.epochs
    return epochs * max(1, n // min(batch_size, n)) if epochs else cfg.path.steps


def train_config(cfg: Config, lr: float = 0.0) -> TrainConfig:
    """Baselines take the same batch size and optimizer as the FIP phase (and its step count, unless the
    task lengths are in epochs)."""
    p = cfg.path
    return TrainConfig(steps=max(p.steps, 1), batch_size=p.batch_size, lr=lr or p.lr, optimizer=p.optimizer,
                       weight_decay=p.weight_decay, precision=p.precision, accumulate=p.accumulate)


@lru_cache(maxsize=8)
def _plan(size: int, seed: int, batch_size: int, sizes: tuple[int, ...], steps: tuple[int, ...]) -> ReservoirPlan:
    def order(i: int, n: int) -> Any:
        return BatchStream(n, batch_size, mix_seed(seed, phase_tag(f"task{i}"))).indices

    return ReservoirPlan.build(size, [(s, order(i, n)) for i, (n, s) in enumerate(zip(sizes, steps))],
                               mix_seed(seed, 12))


def stream_plan(tasks: list[TaskTensors], cfg: Config, seed: int) -> ReservoirPlan:
    """The reservoir plan of a run: every task's training batches (the baselines' phase batches of
    `path.batch_size`) offered in order. A pure function of (seed, the config), so every method of a
    seed reads the same buffer; FIP keeps invariance on it as it stands when each task ends."""
    bs = cfg.path.batch_size
    sizes = tuple(len(t) for t in tasks)
    return _plan(cfg.continual.buffer_size, seed, bs, sizes, tuple(task_steps(cfg, n, bs) for n in sizes))


def buffer_at_task(tasks: list[TaskTensors], cfg: Config, seed: int, i: int) -> tuple[Tensor, Tensor]:
    """The buffer's inputs and labels when task i starts (what FIP's phase i keeps invariant)."""
    plan = stream_plan(tasks, cfg, seed)
    _, owner, index = plan.contents(plan.offsets[i])
    return gather([t.train_data for t in tasks], owner, index)


def reservoir_er_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """ER with a reservoir buffer (see the module docstring)."""
    tc, head, cc = train_config(cfg), head_of(tasks), cfg.continual
    plan = stream_plan(tasks, cfg, seed)
    buf = ReplayBuffer(plan, [t.train_data for t in tasks], mix_seed(seed, 13))
    mb = cfg.path.memory_batch_size or plan.size
    phases = []
    for i in range(first_task(cfg), len(tasks)):
        def draw(model: nn.Module, t: int, state: PhaseState, i: int = i) -> tuple[Tensor, Tensor] | None:
            got = buf.sample(plan.global_step(i, t), mb)
            return None if got is None else (got[0], got[1])

        def summed(model: nn.Module, t: int, state: PhaseState, i: int = i) -> Tensor:
            got = draw(model, t, state, i)
            if got is None:
                return torch.zeros((), device=tasks[0].x_mem.device)
            return head.cross_entropy(model(got[0]), got[1], i)

        concat = cc.er_replay == "concat"
        phases.append(supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, loss=head.loss(i),
                                       steps=plan.offsets[i + 1] - plan.offsets[i],
                                       mix_in=draw if concat else None, extra=None if concat else summed,
                                       finish=row_finish(tasks, i)))
    return phases


def reservoir_der_phases(tasks: list[TaskTensors], cfg: Config, seed: int, *, beta: float,
                         invariance: bool = False) -> list[Phase]:
    """DER (`beta` 0) or DER++ with a reservoir buffer whose logits are stored at insertion.

    `invariance`: FIP's objective on that buffer instead (`fip_stored`): β·CE(batch) + λ·d(f(x_buf), z_buf)
    with d the path's output distance (`path.distance`, Bhattacharyya by default), λ = `path.lam`,
    β = `path.beta`, each example's anchor z its outputs when it entered the buffer; no replayed labels."""
    tc, head, cc = train_config(cfg), head_of(tasks), cfg.continual
    dist = get_distance(cfg.path.distance)
    plan = stream_plan(tasks, cfg, seed)
    buf = ReplayBuffer(plan, [t.train_data for t in tasks], mix_seed(seed, 14), num_outputs=head.num_outputs)
    mb = cfg.path.memory_batch_size or plan.size
    live = torch.zeros(len(tasks), head.num_outputs, dtype=torch.bool)
    for j in range(len(tasks)):
        live[j, head.live(j)] = True
    phases = []
    for i in range(first_task(cfg), len(tasks)):
        def prepare(model: nn.Module, i: int = i) -> PhaseState:
            buf.fill_missing(model, plan.offsets[i])
            return {}

        def replay(model: nn.Module, t: int, state: PhaseState, i: int = i) -> Tensor:
            g = plan.global_step(i, t)
            total = torch.zeros((), device=tasks[0].x_mem.device)
            got = buf.sample(g, mb)
            if got is not None:
                assert buf.logits is not None
                x, _, slots, owner = got
                z = buf.logits[slots.to(x.device)]
                m = live[owner].to(x.device)
                if invariance:  # on the columns live when the example entered (all of them for a shared head)
                    total = total + cfg.path.lam * dist(model(x).masked_fill(~m, -1e4), z.masked_fill(~m, -1e4))
                else:
                    err = (model(x) - z).pow(2) * m
                    total = total + cc.der_alpha * err.sum() / m.sum().clamp(min=1)
                if beta:
                    x2, y2, _, _ = buf.sample(g, mb, draw=1)  # type: ignore[misc]
                    total = total + beta * head.cross_entropy(model(x2), y2, i)
            buf.store(model, g)
            return total

        task_loss = head.loss(i)
        if invariance:
            def task_loss(logits: Tensor, y: Tensor, i: int = i) -> Tensor:
                return cfg.path.beta * head.cross_entropy(logits, y, i)
        phases.append(supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, loss=task_loss,
                                       steps=plan.offsets[i + 1] - plan.offsets[i], extra=replay,
                                       prepare=prepare, finish=row_finish(tasks, i)))
    return phases


def joint_once_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """Joint training as the DER paper's JOINT: nothing until the last task, then `continual.epochs`
    passes over the union of every task's training data (earlier rows of R are the network untouched)."""
    tc, head = train_config(cfg), head_of(tasks)
    first, last = first_task(cfg), len(tasks) - 1
    union = ConcatExamples([t.train_data for t in tasks])
    phases = [supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, loss=head.loss(i), steps=0,
                               finish=row_finish(tasks, i)) for i in range(first, last)]
    phases.append(supervised_phase(f"task{last}", union, None, tc, seed, loss=head.loss(last),
                                   steps=task_steps(cfg, len(union), tc.batch_size),
                                   finish=row_finish(tasks, last)))
    return phases
