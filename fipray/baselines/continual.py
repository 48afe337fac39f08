"""Continual-learning baselines: naive fine-tuning, experience replay (ER), EWC, LwF, DER++, LoRA and joint
training (the upper bound).

Each is a list of phases for tasks 1..T−1, like FIP's, so all methods share the base network, the
batches, the step counts and the evaluation. ER and DER++ replay the same memory FIP uses; LwF and LoRA
use none; joint training sees every earlier task's whole training set. Every loss reads the output
columns through the stream's head (`fipray.heads`): one shared head, one head per task, or a growing head.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray.baselines.replay import (
    first_task,
    joint_once_phases,
    reservoir_der_phases,
    reservoir_er_phases,
    task_steps,
    train_config,
)
from fipray.config import Config, ConfigError
from fipray.core.modes import eval_mode
from fipray.data.batches import BatchStream, mix_seed
from fipray.data.memory import TaskTensors, head_of, memory_upto
from fipray.data.stream import Examples, StreamedExamples, TensorExamples
from fipray.data.transformed import ConcatExamples
from fipray.eval.continual import row_finish
from fipray.path import Phase, PhaseState
from fipray.phases import phase_tag, supervised_phase
from fipray.registry import Registry

# name -> (tasks, cfg, seed, **options) -> phases for tasks 1..T−1, or (phases, extra run_path kwargs);
# `continual.baselines` names them.
CONTINUAL_BASELINES: Registry = Registry("continual baseline")


def _steps(cfg: Config, tasks: list[TaskTensors], i: int) -> int:
    return task_steps(cfg, len(tasks[i]), cfg.path.batch_size)


@CONTINUAL_BASELINES.register("naive")
def naive_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """Fine-tuning on each new task alone (the lower bound)."""
    tc, head = train_config(cfg), head_of(tasks)
    return [supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, loss=head.loss(i),
                             steps=_steps(cfg, tasks, i), finish=row_finish(tasks, i))
            for i in range(first_task(cfg), len(tasks))]


@CONTINUAL_BASELINES.register("er")
def er_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """New-task cross-entropy plus cross-entropy on a replay batch from the same memory FIP uses (a
    reservoir buffer with `continual.memory: reservoir`, `fipray.baselines.replay`)."""
    if cfg.continual.memory == "reservoir":
        return reservoir_er_phases(tasks, cfg, seed)
    tc, head = train_config(cfg), head_of(tasks)
    phases = []
    for i in range(1, len(tasks)):
        x_mem, y_mem = memory_upto(tasks, i)
        mb = cfg.path.memory_batch_size or len(x_mem)
        stream = BatchStream(len(x_mem), mb, mix_seed(seed, 3, i))

        def replay(model: nn.Module, t: int, state: dict, x_mem=x_mem, y_mem=y_mem, stream=stream, i=i) -> Tensor:
            idx = stream.indices(t)
            return head.cross_entropy(model(x_mem[idx]), y_mem[idx], i)

        phases.append(supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, loss=head.loss(i),
                                       steps=_steps(cfg, tasks, i), extra=replay, finish=row_finish(tasks, i)))
    return phases


def fisher_diagonal(model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """Empirical Fisher diagonal E[(∂ log p(y|x) / ∂w)²] from per-example gradients (torch.func).

    `mask`: (N, C) or (C,) bool, the output columns the likelihood is over (a continual head's live
    columns); None: all of them.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    n = len(x)
    m = torch.ones(n, 1, dtype=torch.bool, device=x.device) if mask is None else mask.expand(n, -1)

    def loss(p: dict, xb: Tensor, yb: Tensor, mb: Tensor) -> Tensor:
        out = torch.func.functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        out = out.masked_fill(~mb.unsqueeze(0), float("-inf")) if mask is not None else out
        return F.cross_entropy(out, yb.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(params, x, y, m)
    return {k: g.pow(2).mean(0) for k, g in grads.items()}


@CONTINUAL_BASELINES.register("ewc")
def ewc_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """EWC (Kirkpatrick et al. 2017): λ/2 Σ_t Σ F_t (w − w*_t)², Fisher at the end of each task.

    The Fishers and anchors live in the phase state, so a resumed run keeps them.
    """
    tc, head = train_config(cfg), head_of(tasks)
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
        with eval_mode(model):
            x, y = task.train_data.take(idx)
            fisher = fisher_diagonal(model, x, y, head.mask(y, task.index))
        names = [k for k, _ in model.named_parameters()]
        return [fisher[k] for k in names], [p.detach().clone() for p in model.parameters()]

    def make_prepare(i: int):
        def prepare(model: nn.Module) -> dict:
            # Consolidate the task just finished (task 0: the base network) before task i.
            del consolidated[i - 1:]
            consolidated.append(consolidate(model, tasks[i - 1]))
            return {"fisher": [f for f, _ in consolidated], "star": [s for _, s in consolidated]}
        return prepare

    return [supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, extra=penalty, loss=head.loss(i),
                             steps=_steps(cfg, tasks, i), prepare=make_prepare(i), finish=row_finish(tasks, i))
            for i in range(1, len(tasks))]


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    with eval_mode(model):
        return torch.cat([model(x[k:k + batch_size]) for k in range(0, len(x), batch_size)])


def _kd(temperature: float):
    def distill(logits: Tensor, old: Tensor) -> Tensor:
        T = temperature
        return F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(old / T, -1), log_target=True,
                        reduction="batchmean") * T * T
    return distill


@CONTINUAL_BASELINES.register("lwf")
def lwf_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """Learning without Forgetting (Li & Hoiem 2016): new-task cross-entropy plus λ·T²·KL between the
    network's and the previous network's softened outputs on the new task's inputs, over the previous
    network's output columns (each earlier head in turn with one head per task). No replay memory."""
    tc, head, cc = train_config(cfg), head_of(tasks), cfg.continual
    kd = _kd(cc.lwf_temperature)
    phases = []
    for i in range(1, len(tasks)):
        source = tasks[i].train_data.batches(tc.batch_size, mix_seed(seed, phase_tag(f"task{i}")))  # the phase's batches
        old: dict[str, nn.Module] = {}
        match = head.invariance(kd, i) or kd

        def prepare(model: nn.Module, old: dict = old) -> dict:
            old["net"] = copy.deepcopy(model).eval()
            return {}

        def distil(model: nn.Module, t: int, state: dict, source=source, old=old, match=match) -> Tensor:
            xb, _ = source.batch(t)
            with torch.no_grad():
                target = old["net"](xb)
            return cc.lwf_lambda * match(model(xb), target)

        phases.append(supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, loss=head.loss(i),
                                       steps=_steps(cfg, tasks, i), extra=distil, prepare=prepare,
                                       finish=row_finish(tasks, i)))
    return phases


@CONTINUAL_BASELINES.register("der")
def der_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """DER (Buzzega et al. 2020): DER++ without the replayed labels' term (β = 0)."""
    return derpp_phases(tasks, cfg, seed, beta=0.0)


@CONTINUAL_BASELINES.register("fip_stored")
def fip_stored_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """FIP's objective with invariance anchored where DER anchors: β·CE(new batch) + λ·d(f(x_buf), z_buf) on a
    reservoir buffer, each example's anchor z the outputs it had when it entered the buffer (not the network
    at the task's start), d = `path.distance`, λ/β/η = `path.lam`/`path.beta`/`path.lr`. Needs `continual.memory:
    reservoir` (`fipray.baselines.replay`)."""
    if cfg.continual.memory != "reservoir":
        raise ConfigError("continual baseline 'fip_stored' anchors on a reservoir buffer: set continual.memory: "
                          "reservoir")
    return reservoir_der_phases(tasks, cfg, seed, beta=0.0, invariance=True)


@CONTINUAL_BASELINES.register("derpp")
def derpp_phases(tasks: list[TaskTensors], cfg: Config, seed: int, *, beta: float | None = None) -> list[Phase]:
    """DER++ (Buzzega et al. 2020): new-task cross-entropy + α·MSE between the network's logits and the
    logits stored with each memory example + β·cross-entropy on a second replay batch. The memory is the
    one FIP and ER use; with per-task memories each example's logits are the network's at the end of its
    task (the output columns live then), with a reservoir buffer those it had when it entered the buffer
    (`fipray.baselines.replay`)."""
    cc = cfg.continual
    beta = cc.der_beta if beta is None else beta
    if cc.memory == "reservoir":
        return reservoir_der_phases(tasks, cfg, seed, beta=beta)
    tc, head = train_config(cfg), head_of(tasks)
    stored: list[Tensor] = []  # per finished task: its memory's logits at the end of that task

    phases = []
    for i in range(1, len(tasks)):
        x_mem, y_mem = memory_upto(tasks, i)
        mb = cfg.path.memory_batch_size or len(x_mem)
        s1, s2 = BatchStream(len(x_mem), mb, mix_seed(seed, 6, i)), BatchStream(len(x_mem), mb, mix_seed(seed, 7, i))
        # Which columns each memory example's logits are compared on: those live at the end of its task.
        live = torch.zeros(len(x_mem), head.num_outputs, dtype=torch.bool, device=x_mem.device)
        k = 0
        for j in range(i):
            n = len(tasks[j].x_mem)
            live[k:k + n, head.live(j)] = True
            k += n

        def prepare(model: nn.Module, i: int = i) -> dict:
            del stored[i - 1:]
            stored.append(_logits(model, tasks[i - 1].x_mem))
            return {"logits": torch.cat(stored)}

        def replay(model: nn.Module, t: int, state: dict, x_mem=x_mem, y_mem=y_mem, s1=s1, s2=s2, live=live,
                   i=i) -> Tensor:
            a, b = s1.indices(t).to(x_mem.device), s2.indices(t).to(x_mem.device)
            z, m = state["logits"][a], live[a]
            mse = ((model(x_mem[a]) - z).pow(2) * m).sum() / m.sum().clamp(min=1)
            if not beta:
                return cc.der_alpha * mse
            return cc.der_alpha * mse + beta * head.cross_entropy(model(x_mem[b]), y_mem[b], i)

        phases.append(supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, loss=head.loss(i),
                                       steps=_steps(cfg, tasks, i), extra=replay, prepare=prepare,
                                       finish=row_finish(tasks, i)))
    return phases


def _joint_data(tasks: list[TaskTensors], upto: int) -> Examples:
    """Every training example of tasks 0..upto."""
    sel = tasks[: upto + 1]
    if all(t.x_train is not None for t in sel):
        return TensorExamples(torch.cat([t.x_train for t in sel if t.x_train is not None]),
                              torch.cat([t.y_train for t in sel if t.y_train is not None]))
    if not any(isinstance(t.train, StreamedExamples) for t in sel):  # e.g. domain tasks transformed per batch
        return ConcatExamples([t.train_data for t in sel])
    from torch.utils.data import ConcatDataset

    last = tasks[upto].train
    if not isinstance(last, StreamedExamples) or any(t.dataset is None for t in sel):
        raise ConfigError("joint training needs every task's data in memory or as a streamed dataset")
    return StreamedExamples(ConcatDataset([t.dataset for t in sel if t.dataset is not None]), last.device, workers=last.workers,
                            train_transform=last.train_transform, eval_transform=last.eval_transform)


@CONTINUAL_BASELINES.register("joint")
def joint_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """Joint training (the upper bound): at task i, the same number of steps on the union of the whole
    training sets of tasks 0..i (no memory limit), each example's loss over its own head's columns. With task
    lengths in epochs (`continual.epochs`), the DER paper's JOINT instead (`joint_once_phases`)."""
    if cfg.continual.epochs:
        return joint_once_phases(tasks, cfg, seed)
    tc, head = train_config(cfg), head_of(tasks)
    return [supervised_phase(f"task{i}", _joint_data(tasks, i), None, tc, seed, loss=head.loss(i),
                             steps=cfg.path.steps, finish=row_finish(tasks, i))
            for i in range(first_task(cfg), len(tasks))]


# LoRA ----------------------------------------------------------------------------------------------------
def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def lora_targets(model: nn.Module, targets: tuple[str, ...]) -> tuple[list[str], str]:
    """(names of the modules LoRA adapts, the output head's name). Default targets: the query/value
    projections of a transformer (`query`/`value` in HF BERT/ViT, the fused `qkv` of timm ViTs), else
    every Linear layer but the head (the last Linear)."""
    linears = _linear_names(model)
    if not linears:
        raise ConfigError("continual baseline 'lora': the model has no Linear layer to adapt")
    head = linears[-1]
    if targets:
        chosen = [n for n in linears if n != head and any(n == t or n.endswith("." + t) for t in targets)]
        if not chosen:
            raise ConfigError(f"config key 'continual.lora.targets': {list(targets)} match no Linear layer "
                              f"(some of the model's: {linears[:6]})")
        return chosen, head
    qv = [n for n in linears if re.search(r"(^|\.)(query|value|qkv)$", n)]
    return (qv or [n for n in linears if n != head]), head


@CONTINUAL_BASELINES.register("lora")
def lora_phases(tasks: list[TaskTensors], cfg: Config, seed: int, *, rank: int = 8) -> tuple[list[Phase], dict]:
    """LoRA fine-tuning (Hu et al. 2021) through `peft`: per new task, rank-`rank` adapters on the target
    modules (and the output head trained in full, peft's modules_to_save), then merged into the weights
    before the next task. No replay memory. The path geometry is measured on the effective (merged)
    weights."""
    from peft import LoraConfig, get_peft_model

    lc, head = cfg.continual.lora, head_of(tasks)
    tc = train_config(cfg, lc.lr)
    live: dict[str, Any] = {}

    def make_prepare(i: int):
        def prepare(model: nn.Module) -> PhaseState:
            names, out = lora_targets(model, lc.targets)
            conf = LoraConfig(r=rank, lora_alpha=lc.alpha or 2 * rank, lora_dropout=lc.dropout,
                              target_modules="^(?:" + "|".join(re.escape(n) for n in names) + ")$",
                              modules_to_save=[out])
            # peft draws the adapters' A matrices from torch's global RNG: seeded here, so they are a function of
            # (seed, rank, task) and not of whatever the process ran before (two runs gave different numbers).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(seed, phase_tag("lora_init"), rank, i))
                live["peft"] = get_peft_model(model, conf)  # adapters injected into `model` in place
            return {}
        return prepare

    def merge(model: nn.Module) -> None:
        live.pop("peft").merge_and_unload()  # `model` again has its own modules, the adapters merged in
        for p in model.parameters():
            p.requires_grad_(True)

    def make_finish(i: int):
        finish = row_finish(tasks, i)

        def done(model: nn.Module, state: PhaseState) -> dict:
            merge(model)
            return finish(model, state)
        return done

    def weights(model: nn.Module) -> Tensor:
        pm = live.get("peft")
        net = model if pm is None else copy.deepcopy(pm).merge_and_unload()
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])  # frozen or not

    phases = [supervised_phase(f"task{i}", tasks[i].train_data, None, tc, seed, loss=head.loss(i),
                               steps=_steps(cfg, tasks, i), prepare=make_prepare(i), finish=make_finish(i))
              for i in range(1, len(tasks))]
    return phases, {"weights": weights}
