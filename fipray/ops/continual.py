"""The `continual` operation: continual learning along a FIP (paper Algorithm 1) vs its baselines.

Task 0 trains the base network. Each later task i is one FIP phase from the network after task
i−1 (the anchor): its secondary objective is the new task's cross-entropy, and invariance is
measured on a replay memory of `memory_per_task` examples of every earlier task. One output
head covers all classes (class-incremental); labels are never remapped.

Protocol (shared/PROTOCOLS.md): the full accuracy matrix R per method and seed in both the
class-incremental and the task-incremental setting; ACC, BWT, forgetting and FWT from R; the
same replay memory size for FIP and ER (`fipray.baselines.continual`), stated in every table
with the output distance.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fipray import report
from fipray._batches import mix_seed
from fipray.config import Config, ConfigError, knob
from fipray.data.stream import Examples, TensorExamples
from fipray.eval.continual import cl_metrics, task_accuracy
from fipray.operation import Operation, Report, collect_seeds, register_operation
from fipray.path import Phase, PhaseState, run_path
from fipray.phases import cross_entropy_secondary, fip_phase
from fipray.runtime import RunContext, clone, mean_std, path_summary, tensors, train_base, write_outputs


def _baselines() -> list[str]:
    from fipray.baselines.continual import CONTINUAL_BASELINES

    return CONTINUAL_BASELINES.names()


@dataclass(frozen=True)
class ContinualConfig:
    """Split-task continual learning (paper Algorithm 1)."""

    num_tasks: int = knob(5, gt=0)
    classes_per_task: int = knob(0, ge=0)  # 0: num_classes // num_tasks
    memory_per_task: int = knob(20, gt=0)
    setting: str = knob("class", choices=("class", "task"))  # the setting summary.json headlines; both computed
    baselines: tuple[str, ...] = knob(("naive", "er", "ewc"), choices=_baselines)
    ewc_lambda: float = knob(100.0, ge=0)
    ewc_samples: int = knob(200, gt=0)


@dataclass(frozen=True)
class TaskTensors:
    """One task of a split dataset, materialised on the run's device.

    x_* are (N, *input_shape), y_* are (N,) global class labels; mem_* is the replay memory (taken
    from the training examples at `mem_idx`). With streamed data (`data.stream`) the training split is
    `train` (Examples loaded as needed) and x_train, y_train are None; the test split and the memory
    stay in memory.
    """

    index: int
    classes: tuple[int, ...]
    x_train: Tensor | None
    y_train: Tensor | None
    x_test: Tensor
    y_test: Tensor
    x_mem: Tensor
    y_mem: Tensor
    train: Examples | None = None
    mem_idx: Tensor | None = None

    @property
    def train_data(self) -> Examples:
        """The training split as batches: the streamed Examples, or the in-memory tensors."""
        if self.train is not None:
            return self.train
        assert self.x_train is not None and self.y_train is not None
        return TensorExamples(self.x_train, self.y_train)

    def __len__(self) -> int:
        return len(self.train_data)


def seen_classes(tasks: list[TaskTensors], upto: int) -> list[int]:
    return [c for t in tasks[: upto + 1] for c in t.classes]


def evaluate_row(model: nn.Module, tasks: list[TaskTensors], trained_upto: int) -> dict[str, list[float]]:
    """Row `trained_upto` of the accuracy matrix R in both settings.

    Class-incremental: argmax over all classes seen so far (tasks ≤ max(trained_upto, j) for
    task j, so forward-transfer entries j > trained_upto are defined). Task-incremental:
    argmax over task j's own classes.
    """
    cls, tsk = [], []
    for j, t in enumerate(tasks):
        cls.append(task_accuracy(model, t.x_test, t.y_test, seen_classes(tasks, max(trained_upto, j))))
        tsk.append(task_accuracy(model, t.x_test, t.y_test, list(t.classes)))
    return {"class": cls, "task": tsk}


def row_finish(tasks: list[TaskTensors], i: int) -> Callable[[nn.Module, PhaseState], dict]:
    """A phase's `finish`: row i of the accuracy matrix R, in both settings."""
    return lambda model, state: evaluate_row(model, tasks, i)


def memory_upto(tasks: list[TaskTensors], i: int) -> tuple[Tensor, Tensor]:
    """Replay memory of tasks 0..i−1: (M, ...) inputs and (M,) labels."""
    return torch.cat([t.x_mem for t in tasks[:i]]), torch.cat([t.y_mem for t in tasks[:i]])


def fip_continual_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """FIP phases for tasks 1..T−1 (the path starts at the network trained on task 0)."""
    phases = []
    for i in range(1, len(tasks)):
        x_mem, _ = memory_upto(tasks, i)
        phases.append(fip_phase(
            f"task{i}", cfg.path, seed, memory=x_mem, secondary=cross_entropy_secondary,
            new_data=tasks[i].train_data,
            finish=row_finish(tasks, i),
        ))
    return phases


def accuracy_along_path(tasks: list[TaskTensors]):
    """Record-row metrics: class-incremental accuracy on every task's test set (over all classes)."""
    every = [c for t in tasks for c in t.classes]

    def evaluate(model: nn.Module) -> dict:
        return {f"acc_task{j}": task_accuracy(model, t.x_test, t.y_test, every) for j, t in enumerate(tasks)}

    return evaluate


def stratified_indices(y: Tensor, n: int, seed: int) -> Tensor:
    """n indices spread evenly over the classes present in y (deterministic given seed)."""
    classes = torch.unique(y.cpu())
    g = torch.Generator().manual_seed(seed)
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    out = []
    for c, k in zip(classes.tolist(), per):
        idx = torch.nonzero(y.cpu() == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(out).to(y.device)


def build_tasks(cfg: Config, bundle: Any, device: torch.device, seed: int) -> list[TaskTensors]:
    """The class-incremental split of `bundle` into `continual.num_tasks` tasks, with replay memories."""
    from fipray.data import split_tasks

    cc = cfg.continual
    try:
        split = split_tasks(bundle, cc.num_tasks, classes_per_task=cc.classes_per_task or None)
    except ValueError as e:
        raise ConfigError(f"config section 'continual': {e}") from None
    tasks = []
    for t in split:
        train: Examples
        if cfg.data.stream:
            from fipray.data import dataset_labels
            from fipray.data.stream import StreamedExamples, build_transform

            train = StreamedExamples(t.train, device, workers=cfg.data.workers,
                                     train_transform=build_transform(cfg.data.train_transforms),
                                     eval_transform=build_transform(cfg.data.eval_transforms))
            ytr = dataset_labels(t.train).to(device)
        else:
            train = TensorExamples(*tensors(t.train, device))
            ytr = train.y
        xte, yte = tensors(t.test, device)
        if cc.memory_per_task > len(ytr):
            raise ConfigError(f"config key 'continual.memory_per_task': {cc.memory_per_task} "
                              f"exceeds the {len(ytr)} training examples of task {t.index}")
        mem = stratified_indices(ytr, cc.memory_per_task, mix_seed(seed, 5, t.index))
        x_mem, y_mem = train.take(mem)  # the replay memory: training examples by index
        classes = tuple(int(c) for c in t.classes)
        if isinstance(train, TensorExamples):
            tasks.append(TaskTensors(t.index, classes, train.x, train.y, xte, yte, x_mem, y_mem, None, mem))
        else:
            tasks.append(TaskTensors(t.index, classes, None, None, xte, yte, x_mem, y_mem, train, mem))
    return tasks


def _tasks(ctx: RunContext, seed: int) -> list[TaskTensors]:
    key = ("tasks", seed)
    if key not in ctx._cache:
        ctx._cache[key] = build_tasks(ctx.cfg, ctx.bundle, ctx.device, seed)
    return ctx._cache[key]


def _method_phases(method: str) -> Any:
    if method == "fip":
        return fip_continual_phases
    from fipray.baselines.continual import CONTINUAL_BASELINES

    return CONTINUAL_BASELINES.get(method)


def _random_rows(base: nn.Module, tasks: list[TaskTensors]) -> dict[str, list[float]]:
    """Accuracies of the untrained network (the FWT reference), per setting."""
    return {"class": [task_accuracy(base, t.x_test, t.y_test, seen_classes(tasks, j)) for j, t in enumerate(tasks)],
            "task": [task_accuracy(base, t.x_test, t.y_test, list(t.classes)) for t in tasks]}


def _method_rows(method: str, seed: int, R_rows: dict, rand: dict, cfg: Config, seconds: float) -> tuple[list, list]:
    """Result rows (CL metrics) and accuracy-matrix rows of one method and seed, both settings."""
    results, matrices = [], []
    T = cfg.continual.num_tasks
    for setting in ("class", "task"):
        R = np.array([R_rows[i][setting] for i in range(T)])
        m = cl_metrics(R, np.array(rand[setting]))
        results.append({"method": method, "seed": seed, "setting": setting, **m,
                        "memory_per_task": cfg.continual.memory_per_task,
                        "distance": cfg.path.distance, "seconds": seconds})
        matrices += [{"method": method, "seed": seed, "setting": setting, "i": i, "j": j, "acc": float(R[i, j])}
                     for i in range(T) for j in range(T)]
        matrices += [{"method": method, "seed": seed, "setting": setting, "i": -1, "j": j,
                      "acc": float(rand[setting][j])} for j in range(T)]
    return results, matrices


@register_operation
class Continual(Operation):
    """FIP continual learning vs naive fine-tuning, experience replay and EWC, over seeds."""

    name = "continual"
    help = "run the continual experiment (FIP vs its baselines over seeds)"
    section = ContinualConfig
    metrics = ("acc_mean", "task_acc_mean", "bwt_mean")
    smoke = ("seeds=[0]", "train.steps=40", "path.steps=20", "path.record_every=10", "path.checkpoint_every=20")
    supports_paths = True

    # The experiment -------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg
        methods = ["fip", *cfg.continual.baselines]
        total = len(cfg.seeds) * (cfg.train.steps + len(methods) * (cfg.continual.num_tasks - 1) * cfg.path.steps)
        rows = collect_seeds(ctx, total, self.name, ("results", "accuracy_matrix", "path", "geometry"),
                             lambda seed: self.run_seed(ctx, seed, methods))
        summary = self.aggregate(cfg, methods, rows)
        self.report(ctx, summary, methods, rows)
        return summary

    def run_seed(self, ctx: RunContext, seed: int, methods: list[str]) -> dict[str, list]:
        """Base network on task 0, then every method's phases for tasks 1..T−1 from it."""
        cfg = ctx.cfg
        tasks = build_tasks(cfg, ctx.bundle, ctx.device, seed)
        base = ctx.model(seed)
        rand = _random_rows(base, tasks)
        t0 = time.perf_counter()
        train_base(base, tasks[0].train_data, None, cfg, seed, progress=ctx.bar)
        base_seconds = time.perf_counter() - t0
        row0 = evaluate_row(base, tasks, 0)
        heldout = torch.cat([t.x_test for t in tasks])[: cfg.path.heldout]
        out: dict[str, list] = {"results": [], "accuracy_matrix": [], "path": [], "geometry": []}
        for method in methods:
            model = clone(base)
            phases = _method_phases(method)(tasks, cfg, seed)
            fip = method == "fip"
            t0 = time.perf_counter()
            res = run_path(model, phases, out_dir=ctx.checkpoint_dir(method, f"seed{seed}") if fip else None,
                           **ctx.path_kwargs(heldout, accuracy_along_path(tasks) if fip else None))
            seconds = base_seconds + time.perf_counter() - t0
            out["path"] += [{"method": method, "seed": seed, **r} for r in res.records]
            if fip:
                out["geometry"].append(path_summary(res.records))
            R_rows = {0: row0, **{i: res.phase_results[f"task{i}"] for i in range(1, len(tasks))}}
            results, matrices = _method_rows(method, seed, R_rows, rand, cfg, seconds)
            out["results"] += results
            out["accuracy_matrix"] += matrices
        return out

    @staticmethod
    def aggregate(cfg: Config, methods: list[str], rows: dict[str, list]) -> dict:
        results = rows["results"]

        def agg(method: str, setting: str) -> dict:
            sel = [r for r in results if r["method"] == method and r["setting"] == setting]
            acc, bwt = mean_std([r["acc"] for r in sel]), mean_std([r["bwt"] for r in sel])
            return {"acc_mean": acc[0], "acc_std": acc[1], "bwt_mean": bwt[0], "bwt_std": bwt[1],
                    "forgetting_mean": mean_std([r["forgetting"] for r in sel])[0],
                    "fwt_mean": mean_std([r["fwt"] for r in sel])[0],
                    "seconds": float(np.mean([r["seconds"] for r in sel]))}

        setting = cfg.continual.setting
        other = "task" if setting == "class" else "class"
        geometry = rows["geometry"]
        return {
            "operation": "continual", "setting": setting, "memory_per_task": cfg.continual.memory_per_task,
            "distance": cfg.path.distance, "seeds": list(cfg.seeds), "num_tasks": cfg.continual.num_tasks,
            "methods": {m: {**agg(m, setting), f"{other}_incremental": agg(m, other)} for m in methods},
            "fip_path": {k: float(np.mean([g[k] for g in geometry])) for k in geometry[0]},
        }

    @staticmethod
    def report(ctx: RunContext, summary: dict, methods: list[str], rows: dict[str, list]) -> None:
        cfg, out = ctx.cfg, ctx.out
        assert out is not None
        report.plot_path_accuracy([r for r in rows["path"] if r["method"] == "fip" and r["seed"] == cfg.seeds[0]],
                                  out / "path_accuracy.png")
        report.plot_matrices(rows["accuracy_matrix"], methods, cfg.continual.setting, out / "accuracy_matrix.png")
        write_outputs(out, cfg, summary, {k: rows[k] for k in ("path", "accuracy_matrix", "results")},
                      report.continual_report(summary, cfg))

    def brief(self, summary: dict) -> dict:
        return {m: round(v["acc_mean"], 4) for m, v in summary["methods"].items()}

    # FIP paths ------------------------------------------------------------------------------------
    def base_data(self, ctx: RunContext, seed: int) -> tuple[Any, Tensor | None]:
        t0 = _tasks(ctx, seed)[0]
        return t0.train_data, None

    def path(self, ctx: RunContext, model: nn.Module, seed: int, *, rank: int = 0,
             world: int = 1) -> tuple[list[Phase], dict]:
        import dataclasses

        tasks = all_tasks = _tasks(ctx, seed)
        if world > 1:  # each rank its own shard of the new tasks' data
            if any(t.x_train is None or t.y_train is None for t in tasks):
                raise ConfigError("ray.workers_per_path > 1 (DDP) shards in-memory task data; "
                                  "data.stream: true is not supported there yet")
            tasks = [dataclasses.replace(t, x_train=typing.cast(Tensor, t.x_train)[rank::world],
                                         y_train=typing.cast(Tensor, t.y_train)[rank::world]) for t in tasks]
        heldout = torch.cat([t.x_test for t in all_tasks])[: ctx.cfg.path.heldout]
        return fip_continual_phases(tasks, ctx.cfg, seed), {"heldout": heldout,
                                                            "evaluate": accuracy_along_path(all_tasks)}

    def path_steps(self, cfg: Config) -> int:
        return (cfg.continual.num_tasks - 1) * cfg.path.steps

    # Sweep trials -----------------------------------------------------------------------------------
    def trial_iterations(self, cfg: Config) -> int:
        return len(cfg.seeds) * (cfg.continual.num_tasks - 1)

    def trial(self, ctx: RunContext, report: Report, **options: Any) -> None:
        """An iteration per task phase per seed; `acc_mean` is the running mean over seeds of the
        class-incremental accuracy on the tasks seen so far, so the last report is the ACC mean."""
        cfg = ctx.cfg
        done: dict[str, list[float]] = {"class": [], "task": [], "bwt": []}
        for seed in cfg.seeds:
            tasks = build_tasks(cfg, ctx.bundle, ctx.device, seed)
            base = ctx.model(seed)
            rand = [task_accuracy(base, t.x_test, t.y_test, seen_classes(tasks, j)) for j, t in enumerate(tasks)]
            train_base(base, tasks[0].train_data, None, cfg, seed)
            rows = {0: evaluate_row(base, tasks, 0)}

            def on_event(event: str, payload: dict, rows: dict = rows, rand: list = rand, seed: int = seed,
                         last: int = len(tasks) - 1) -> None:
                if event != "phase_end":
                    return
                i = int(payload["phase"][len("task"):])
                rows[i] = payload
                R = np.array([rows[r]["class"][: i + 1] for r in range(i + 1)])
                cur = {"class": float(np.mean(R[i])), "task": float(np.mean(rows[i]["task"][: i + 1])),
                       "bwt": cl_metrics(R, np.array(rand[: i + 1]))["bwt"]}
                m = {k: float(np.mean(done[k] + [v])) for k, v in cur.items()}
                report({"acc_mean": m["class"], "task_acc_mean": m["task"], "bwt_mean": m["bwt"],
                        "seed": seed, "task": i})
                if i == last:
                    for k, v in cur.items():
                        done[k].append(v)

            kw = ctx.path_kwargs()
            run_path(clone(base), fip_continual_phases(tasks, cfg, seed), record_every=10**9,
                     checkpoint_every=10**9, distance=kw["distance"], callback=on_event)
