"""Continual-learning baselines: naive fine-tuning, experience replay (ER) and EWC.

Each is a list of phases for tasks 1..T−1, like FIP's, so all methods share the base network,
the batches, the step counts and the evaluation. ER replays the same memory FIP uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray._batches import BatchStream, mix_seed
from fipray._registry import Registry
from fipray.config import Config, TrainConfig
from fipray.ops.continual import TaskTensors, memory_upto, row_finish
from fipray.path import Phase
from fipray.phases import supervised_phase

# name -> (tasks, cfg, seed) -> phases for tasks 1..T−1; `continual.baselines` names them.
CONTINUAL_BASELINES: Registry = Registry("continual baseline")


def _train_cfg(cfg: Config) -> TrainConfig:
    # Baselines take the same step count, batch size and optimizer as the FIP phase.
    p = cfg.path
    return TrainConfig(steps=p.steps, batch_size=p.batch_size, lr=p.lr, optimizer=p.optimizer,
                       weight_decay=p.weight_decay, precision=p.precision, accumulate=p.accumulate)


@CONTINUAL_BASELINES.register("naive")
def naive_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    tc = _train_cfg(cfg)
    return [supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed,
                             finish=row_finish(tasks, i))
            for i in range(1, len(tasks))]


@CONTINUAL_BASELINES.register("er")
def er_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """New-task cross-entropy plus cross-entropy on a replay batch from the same memory FIP uses."""
    tc = _train_cfg(cfg)
    phases = []
    for i in range(1, len(tasks)):
        x_mem, y_mem = memory_upto(tasks, i)
        mb = cfg.path.memory_batch_size or len(x_mem)
        stream = BatchStream(len(x_mem), mb, mix_seed(seed, 3, i))

        def replay(model: nn.Module, t: int, state: dict, x_mem=x_mem, y_mem=y_mem, stream=stream) -> Tensor:
            idx = stream.indices(t)
            return F.cross_entropy(model(x_mem[idx]), y_mem[idx])

        phases.append(supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed,
                                       extra=replay, finish=row_finish(tasks, i)))
    return phases


def fisher_diagonal(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Empirical Fisher diagonal E[(∂ log p(y|x) / ∂w)²] from per-example gradients (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p: dict, xb: Tensor, yb: Tensor) -> Tensor:
        out = torch.func.functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        return F.cross_entropy(out, yb.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {k: g.pow(2).mean(0) for k, g in grads.items()}


@CONTINUAL_BASELINES.register("ewc")
def ewc_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """EWC (Kirkpatrick et al. 2017): λ/2 Σ_t Σ F_t (w − w*_t)², Fisher at the end of each task.

    The Fishers and anchors live in the phase state, so a resumed run keeps them.
    """
    tc = _train_cfg(cfg)
    n = cfg.continual.ewc_samples
    consolidated: list[tuple[list[Tensor], list[Tensor]]] = []  # per finished task: (F, w*)

    def penalty(model: nn.Module, t: int, state: dict) -> Tensor:
        total = torch.zeros((), device=next(model.parameters()).device)
        for fisher, star in zip(state["fisher"], state["star"]):
            for f, s, p in zip(fisher, star, model.parameters()):
                total = total + (f * (p - s).pow(2)).sum()
        return 0.5 * cfg.continual.ewc_lambda * total

    def consolidate(model: nn.Module, task: TaskTensors) -> tuple[list[Tensor], list[Tensor]]:
        g = torch.Generator().manual_seed(mix_seed(seed, 4, task.index))
        idx = torch.randperm(len(task), generator=g)[:n]
        was = model.training
        model.eval()
        fisher = fisher_diagonal(model, *task.train_data.take(idx))
        model.train(was)
        names = [k for k, _ in model.named_parameters()]
        return [fisher[k] for k in names], [p.detach().clone() for p in model.parameters()]

    def make_prepare(i: int):
        def prepare(model: nn.Module) -> dict:
            # Consolidate the task just finished (task 0: the base network) before task i.
            del consolidated[i - 1:]
            consolidated.append(consolidate(model, tasks[i - 1]))
            return {"fisher": [f for f, _ in consolidated], "star": [s for _, s in consolidated]}
        return prepare

    return [supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, extra=penalty,
                             prepare=make_prepare(i), finish=row_finish(tasks, i))
            for i in range(1, len(tasks))]

