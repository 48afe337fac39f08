"""The `continual` operation: continual learning along a FIP (paper Algorithm 1) vs its baselines.

A run learns a *task stream* (`fipray.data.streams`): class-incremental splits of one dataset (the
default), a sequence of datasets with their own label spaces, or one dataset under a per-task input
transform (domain-incremental). Task 0 is the base network: trained on it (from scratch, or fine-tuned
from pretrained weights), or taken as it is (`continual.base: as_is`, e.g. with `base_weights`). Each
later task i is one FIP phase from the network after task i−1 (the anchor): its secondary objective is
the new task's cross-entropy, and invariance is measured on a replay memory of `memory_per_task`
examples of every earlier task. The output head (`continual.head`, `fipray.heads`) is one head over one
label space (`shared`, labels never remapped), one head per task (`multi`) or a head that grows as tasks
bring classes (`grow`).

Protocol (shared/PROTOCOLS.md): the full accuracy matrix R per method and seed in both the
class-incremental and the task-incremental setting; ACC, BWT, forgetting and FWT from R; the
same replay memory for FIP, ER and DER++ (`fipray.baselines.continual`), stated in every table
with the output distance; per-layer ‖ΔW‖F/‖W0‖F, every method's path length and a weight-space PCA of
all methods' paths (the paper's Fig. 3e).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import numpy as np
from torch import Tensor, nn

from fipray import report
from fipray.baselines.continual import CONTINUAL_BASELINES
from fipray.baselines.replay import buffer_at_task, first_task, task_steps
from fipray.config import Config, ConfigError
from fipray.core.distances import get_distance
from fipray.data import DataBundle
from fipray.data.memory import TaskTensors, head_of, memory_upto
from fipray.data.streams import TaskStream
from fipray.eval.continual import (
    WeightSnapshots,
    accuracy_along_path,
    evaluate_row,
    final_row,
    heldout_inputs,
    mean_weight_change,
    metrics_so_far,
    random_rows,
    result_rows,
    row_finish,
    weight_change,
    weight_pca,
)
from fipray.heads import Head
from fipray.operation import Operation, Report, check_user_data, collect_seeds, register_operation
from fipray.ops.continual_setup import (
    ContinualConfig,
    LoraOptions,
    build_tasks,
    make_head,
    method_config,
    methods_of,
    num_tasks,
    stream_from_config,
)
from fipray.path import Phase, PhaseState, flat_trainable, run_path
from fipray.phases import fip_phase, supervised_phase
from fipray.runtime import RunContext, clone, load_weights, mean_std, path_summary, shard, write_outputs

__all__ = ["Continual", "ContinualConfig", "LoraOptions", "build_tasks", "fip_continual_phases", "make_head",
           "method_config", "methods_of", "num_tasks", "stream_from_config"]


def fip_continual_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """FIP phases for tasks 1..T−1 (the path starts at the network trained on task 0). Phase i keeps
    invariance on the replay memory of tasks 0..i−1: their per-task memories, or the reservoir buffer as it
    stands when task i starts (`continual.memory: reservoir`)."""
    head = head_of(tasks)
    dist = get_distance(cfg.path.distance)
    phases = []
    for i in range(1, len(tasks)):
        if cfg.continual.memory == "reservoir":
            x_mem, _ = buffer_at_task(tasks, cfg, seed, i)
        else:
            x_mem, _ = memory_upto(tasks, i)

        def secondary(model: nn.Module, logits: Tensor | None, x: Tensor | None, y: Tensor | None,
                      state: PhaseState, i: int = i) -> Tensor:
            assert logits is not None and y is not None
            return head.cross_entropy(logits, y, i)

        phases.append(fip_phase(
            f"task{i}", cfg.path, seed, memory=x_mem, secondary=secondary,
            new_data=tasks[i].train_data, distance=head.invariance(dist, i),
            steps=task_steps(cfg, len(tasks[i]), cfg.path.batch_size), finish=row_finish(tasks, i),
        ))
    return phases


def _stream(ctx: RunContext) -> tuple[TaskStream, Head, list[dict[int, int]]]:
    return ctx.memos["stream"]


def _tasks(ctx: RunContext, seed: int) -> list[TaskTensors]:
    stream, head, columns = _stream(ctx)
    cache: dict = ctx.memo("test_inputs", dict)  # a domain task's transformed test inputs, made once for all seeds
    return ctx.memo(f"tasks/{seed}", lambda: build_tasks(ctx.cfg, ctx.bundle, ctx.device, seed, stream=stream,
                                                         head=head, columns=columns, test_cache=cache))


def method_phases(method: str, tasks: list[TaskTensors], cfg: Config, seed: int) -> tuple[list[Phase], dict]:
    """A method's phases and extra `run_path` arguments (e.g. LoRA's weights view): tasks 1..T−1, or for a
    baseline under `continual.base: each` tasks 0..T−1. `cfg`: the method's own (`method_config`)."""
    if method == "fip":
        return fip_continual_phases(tasks, cfg, seed), {}
    m = re.fullmatch(r"lora_r(\d+)", method)
    got = (CONTINUAL_BASELINES.get("lora")(tasks, cfg, seed, rank=int(m.group(1))) if m
           else CONTINUAL_BASELINES.get(method)(tasks, cfg, seed))
    return got if isinstance(got, tuple) else (got, {})


def memory_label(cfg: Config) -> str:
    """The replay memory every method of a run shares, as the tables state it."""
    cc = cfg.continual
    return f"reservoir {cc.buffer_size}" if cc.memory == "reservoir" else f"{cc.memory_per_task} per task"


@register_operation
class Continual(Operation):
    """FIP continual learning vs its baselines (naive, ER, EWC, LwF, DER++, LoRA, joint), over seeds."""

    name = "continual"
    help = "run the continual experiment (FIP vs its baselines over seeds)"
    section = ContinualConfig
    metrics = ("acc_mean", "task_acc_mean", "bwt_mean")
    smoke = ("seeds=[0]", "train.steps=40", "path.steps=20", "path.record_every=10", "path.checkpoint_every=20",
             "continual.epochs=0")
    supports_paths = True

    def context(self, cfg: Config, *, bundle: Any = None, tasks: Any = None, **kwargs: Any) -> RunContext:
        """The stream (the caller's `tasks`, else the config's), its head, and a model spec as wide as
        the head."""
        if tasks is not None and not isinstance(tasks, TaskStream):
            raise ConfigError(f"tasks= must be a fipray.data.streams.TaskStream (class_split, datasets_stream, "
                              f"domain_stream), got {type(tasks).__name__}")
        user = bundle is not None or tasks is not None
        stream = tasks if tasks is not None else stream_from_config(cfg, bundle)
        head, columns = make_head(cfg.continual.head, stream)
        first = stream.tasks[0]
        if bundle is None or tasks is not None:
            bundle = DataBundle(first.train, first.test, stream.num_labels, stream.input_shape, stream.name)
        ctx = RunContext.create(cfg, bundle=bundle, **kwargs)
        ctx.spec["num_classes"] = head.num_outputs
        ctx.memos["stream"] = (stream, head, columns)
        if user:  # the caller's own data: checked against the model first
            check_user_data(ctx)
        return ctx

    def prepare_base(self, ctx: RunContext, model: nn.Module, tasks: list[TaskTensors], seed: int) -> None:
        """Task 0: the base network trained on it (from `base_weights` when given), or taken as it is."""
        cc = ctx.cfg.continual
        if cc.base_weights:
            load_weights(model, cc.base_weights, "continual.base_weights")
        if cc.base in ("train", "each"):
            head, tc = head_of(tasks), ctx.cfg.train
            steps = task_steps(ctx.cfg, len(tasks[0]), tc.batch_size) if cc.epochs else tc.steps
            run_path(model, [supervised_phase("base", tasks[0].train_data, None, tc, seed, steps=steps,
                                              loss=head.loss(0))],
                     record_every=max(steps, 1), progress=ctx.bar, **ctx.base_kwargs(seed))

    # The experiment -------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg
        methods = methods_of(cfg)
        sizes = [len(t) for t in _tasks(ctx, cfg.seeds[0])]
        per_task = sum(task_steps(cfg, n, cfg.path.batch_size) for n in sizes[1:])
        base = task_steps(cfg, sizes[0], cfg.train.batch_size) if cfg.continual.epochs else cfg.train.steps
        total = len(cfg.seeds) * (base + len(methods) * per_task)
        rows = collect_seeds(ctx, total, self.name,
                             ("results", "accuracy_matrix", "path", "geometry", "weight_change", "pca"),
                             lambda seed: self.run_seed(ctx, seed, methods))
        summary = self.aggregate(ctx, methods, rows)
        self.report(ctx, summary, methods, rows)
        return summary

    def run_seed(self, ctx: RunContext, seed: int, methods: list[str]) -> dict[str, list]:
        """Base network on task 0, then every method's phases for tasks 1..T−1 from it (with `base: each`,
        every baseline's phases for tasks 0..T−1 from the untrained network instead)."""
        cfg = ctx.cfg
        tasks = _tasks(ctx, seed)
        base = ctx.model(seed)
        init = clone(base)
        rand = random_rows(base, tasks)
        t0 = time.perf_counter()
        self.prepare_base(ctx, base, tasks, seed)
        start = {"base": (base, time.perf_counter() - t0, evaluate_row(base, tasks, 0)), "init": (init, 0.0, None)}
        out: dict[str, list] = {k: [] for k in ("results", "accuracy_matrix", "path", "geometry", "weight_change",
                                                "pca")}
        snaps: dict[str, list[np.ndarray]] = {}
        origin = None
        for method in methods:
            own = first_task(cfg) == 0 and method != "fip"
            net, seconds, row0 = start["init" if own else "base"]
            snap, first, res, secs = self.run_method(ctx, method, clone(net), tasks, seed)
            origin = first if origin is None else origin
            model = res.model
            out["path"] += [{"method": method, "seed": seed, **r} for r in res.records]
            out["geometry"].append({"method": method, "seed": seed, **path_summary(res.records)})
            w_start = {k: v.detach() for k, v in net.named_parameters()}
            out["weight_change"] += [{"method": method, "seed": seed, "layer": k, "ratio": v}
                                     for k, v in weight_change(w_start, model).items()]
            snaps[method] = snap.rows
            R_rows = {i: res.phase_results[f"task{i}"] for i in range(0 if own else 1, len(tasks))}
            R_rows.setdefault(0, row0)
            results, matrices = result_rows(R_rows, rand, {"method": method, "seed": seed},
                                            {"memory": memory_label(cfg), "distance": cfg.path.distance,
                                             "seconds": seconds + secs})
            out["results"] += results
            out["accuracy_matrix"] += matrices
        if seed == cfg.seeds[0] and origin is not None:
            out["pca"] = [{"method": m, "k": k, "pc1": float(x), "pc2": float(y)}
                          for m, xy in weight_pca(snaps, origin).items() for k, (x, y) in enumerate(xy)]
        return out

    def run_method(self, ctx: RunContext, method: str, model: nn.Module, tasks: list[TaskTensors],
                   seed: int) -> tuple[WeightSnapshots, np.ndarray, Any, float]:
        """One method's path from `model` under its own config: (weight snapshots, the starting weights'
        snapshot, the path result, seconds)."""
        cfg = ctx.cfg
        phases, extra = method_phases(method, tasks, method_config(cfg, method), seed)
        n_params = sum(p.numel() for p in model.parameters())
        snap = WeightSnapshots(n_params, cfg.continual.pca_coordinates, extra.get("weights") or flat_trainable)
        first = snap.take(model)
        along = accuracy_along_path(tasks) if method == "fip" else None

        def evaluate(m: nn.Module) -> dict:
            return {**snap(m), **(along(m) if along is not None else {})}

        heldout = heldout_inputs(tasks, cfg.path.heldout)
        t0 = time.perf_counter()
        res = run_path(model, phases, out_dir=ctx.checkpoint_dir(method, f"seed{seed}") if method == "fip" else None,
                       **{**ctx.path_kwargs(heldout, evaluate), **extra})
        return snap, first, res, time.perf_counter() - t0

    @staticmethod
    def aggregate(ctx: RunContext, methods: list[str], rows: dict[str, list]) -> dict:
        cfg = ctx.cfg
        results = rows["results"]
        stream, head, _ = _stream(ctx)

        def agg(method: str, setting: str) -> dict:
            sel = [r for r in results if r["method"] == method and r["setting"] == setting]
            acc, bwt = mean_std([r["acc"] for r in sel]), mean_std([r["bwt"] for r in sel])
            return {"acc_mean": acc[0], "acc_std": acc[1], "bwt_mean": bwt[0], "bwt_std": bwt[1],
                    "forgetting_mean": mean_std([r["forgetting"] for r in sel])[0],
                    "fwt_mean": mean_std([r["fwt"] for r in sel])[0],
                    "seconds": float(np.mean([r["seconds"] for r in sel]))}

        def geometry(method: str) -> dict:
            sel = [g for g in rows["geometry"] if g["method"] == method]
            return {k: float(np.mean([g[k] for g in sel])) for k in sel[0] if k not in ("method", "seed")}

        setting = cfg.continual.setting
        other = "task" if setting == "class" else "class"
        return {
            "operation": "continual", "setting": setting, "stream": stream.setting, "head": head.layout,
            "tasks": [t.name for t in stream.tasks], "memory_per_task": cfg.continual.memory_per_task,
            "distance": cfg.path.distance, "seeds": list(cfg.seeds), "num_tasks": len(stream),
            "base": cfg.continual.base,
            "methods": {m: {**agg(m, setting), f"{other}_incremental": agg(m, other),
                            "final_task_accuracy": final_row(rows["accuracy_matrix"], m, len(stream)),
                            "path": geometry(m), "weight_change": mean_weight_change(rows["weight_change"], m)}
                        for m in methods},
            "fip_path": geometry("fip"),
        }

    @staticmethod
    def report(ctx: RunContext, summary: dict, methods: list[str], rows: dict[str, list]) -> None:
        cfg, out = ctx.cfg, ctx.out
        assert out is not None
        report.plot_path_accuracy([r for r in rows["path"] if r["method"] == "fip" and r["seed"] == cfg.seeds[0]],
                                  out / "path_accuracy.png")
        report.plot_matrices(rows["accuracy_matrix"], methods, cfg.continual.setting, out / "accuracy_matrix.png")
        if rows["pca"]:
            report.plot_weight_pca(rows["pca"], methods, out / "weight_pca.png",
                                   f"Weight-space PCA of every method's path (seed {cfg.seeds[0]})")
        if summary["num_tasks"] == 2:  # the paper's Fig. 2: both tasks' test accuracy as FIP's path moves
            first = cfg.seeds[0]
            ends = {(r["method"], r["j"]): r["acc"] for r in rows["accuracy_matrix"]
                    if r["seed"] == first and r["setting"] == "class" and r["i"] == 1}
            report.plot_task_pair([r for r in rows["path"] if r["method"] == "fip" and r["seed"] == first],
                                  out / "task_pair.png", tuple(t.split(":")[0] for t in summary["tasks"]),
                                  title=f"FIP path vs the baselines' end points (seed {first}, test sets)",
                                  others={m: (ends[(m, 0)], ends[(m, 1)]) for m in methods if m != "fip"})
        write_outputs(out, cfg, summary, {k: rows[k] for k in ("path", "accuracy_matrix", "results",
                                                               "weight_change", "pca")},
                      report.continual_report(summary, cfg))

    def brief(self, summary: dict) -> dict:
        return {m: round(v["acc_mean"], 4) for m, v in summary["methods"].items()}

    # FIP paths ------------------------------------------------------------------------------------
    def base_data(self, ctx: RunContext, seed: int) -> tuple[Any, Tensor | None]:
        t0 = _tasks(ctx, seed)[0]
        return t0.train_data, None

    def train_base(self, ctx: RunContext, model: nn.Module, seed: int) -> None:
        self.prepare_base(ctx, model, _tasks(ctx, seed), seed)

    def path(self, ctx: RunContext, model: nn.Module, seed: int, *, rank: int = 0,
             world: int = 1) -> tuple[list[Phase], dict]:
        tasks = all_tasks = _tasks(ctx, seed)
        if world > 1:  # each rank its own shard of the new tasks' data (streamed data: the one ConfigError)
            tasks = []
            for t in all_tasks:
                x, y = shard(t.x_train, t.y_train, rank=rank, world=world, streamed=ctx.cfg.data.stream)
                tasks.append(dataclasses.replace(t, x_train=x, y_train=y))
        heldout = heldout_inputs(all_tasks, ctx.cfg.path.heldout)
        return fip_continual_phases(tasks, method_config(ctx.cfg, "fip"), seed), {"heldout": heldout,
                                                            "evaluate": accuracy_along_path(all_tasks)}

    def path_steps(self, cfg: Config) -> int:
        return (num_tasks(cfg) - 1) * cfg.path.steps

    # Sweep trials -----------------------------------------------------------------------------------
    def trial_iterations(self, cfg: Config) -> int:
        return len(cfg.seeds) * (num_tasks(cfg) - 1)

    def validation_context(self, ctx: RunContext, validation: float, seed: int) -> RunContext:
        """Every task's training split cut in two (`fipray.data.holdout.holdout_stream`): the held-out part is
        the task's test split (the rows of R a trial scores), the rest its training data and replay memory."""
        from fipray.data.holdout import holdout_stream

        stream, head, columns = _stream(ctx)
        held = holdout_stream(stream, validation, seed)
        first = held.tasks[0]
        bundle = DataBundle(first.train, first.test, ctx.bundle.num_classes, ctx.bundle.input_shape, ctx.bundle.name)
        return dataclasses.replace(ctx, bundle=bundle, memos={"stream": (held, head, columns)})

    def trial_methods(self, cfg: Config) -> tuple[str, ...]:
        return ("fip", *(n for n in CONTINUAL_BASELINES.names() if n != "lora"), "lora_r<rank>")

    def trial(self, ctx: RunContext, report: Report, *, method: str = "fip", **options: Any) -> None:
        """An iteration per task phase per seed; `acc_mean` is the running mean over seeds of the
        class-incremental accuracy on the tasks seen so far, so the last report is the ACC mean. `method`:
        FIP or any baseline `continual.baselines` may name (`lora_r<rank>` for LoRA), each under its own
        config (`continual.overrides`), from the same base network (or from scratch under `base: each`)."""
        cfg = ctx.cfg
        done: dict[str, list[float]] = {"class": [], "task": [], "bwt": []}
        for seed in cfg.seeds:
            tasks = _tasks(ctx, seed)
            base = ctx.model(seed)
            rand = random_rows(base, tasks)["class"]
            own = first_task(cfg) == 0 and method != "fip"
            if not own:
                self.prepare_base(ctx, base, tasks, seed)
            rows = {0: evaluate_row(base, tasks, 0)}

            def on_event(event: str, payload: dict, rows: dict = rows, rand: list = rand, seed: int = seed,
                         last: int = len(tasks) - 1) -> None:
                if event != "phase_end" or not payload["phase"].startswith("task"):
                    return
                i = int(payload["phase"][len("task"):])
                rows[i] = payload
                if i == 0:
                    return
                cur = metrics_so_far(rows, rand, i)
                m = {k: float(np.mean(done[k] + [v])) for k, v in cur.items()}
                report({"acc_mean": m["class"], "task_acc_mean": m["task"], "bwt_mean": m["bwt"],
                        "seed": seed, "task": i})
                if i == last:
                    for k, v in cur.items():
                        done[k].append(v)

            phases, extra = method_phases(method, tasks, method_config(cfg, method), seed)
            kw = ctx.path_kwargs()
            run_path(clone(base), phases, record_every=10**9, checkpoint_every=10**9,
                     **{"distance": kw["distance"], **extra, "callback": on_event})
