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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fipray import report
from fipray.baselines.continual import CONTINUAL_BASELINES
from fipray.config import Config, ConfigError, knob
from fipray.core.distances import get_distance
from fipray.data import DataBundle, get_data, streams
from fipray.data.memory import TaskTensors, head_of, materialise, memory_upto
from fipray.data.stream import Examples, StreamedExamples, build_transform
from fipray.data.streams import TaskStream
from fipray.eval.continual import (
    WeightSnapshots,
    accuracy_along_path,
    evaluate_row,
    final_row,
    mean_weight_change,
    metrics_so_far,
    random_rows,
    result_rows,
    row_finish,
    weight_change,
    weight_pca,
)
from fipray.heads import LAYOUTS, Head
from fipray.models import load_state_dict_file
from fipray.operation import Operation, Report, collect_seeds, register_operation
from fipray.path import Phase, PhaseState, flat_trainable, run_path
from fipray.phases import fip_phase, supervised_phase
from fipray.runtime import RunContext, clone, load_bundle, mean_std, path_summary, shard, write_outputs


@dataclass(frozen=True)
class LoraOptions:
    """The LoRA baseline (peft): one method per rank (`lora_r8`, ...); adapters merged after each task."""

    ranks: tuple[int, ...] = knob((8,), gt=0, nonempty=True)
    alpha: float = knob(0.0, ge=0)  # LoRA's alpha; 0: 2 x rank
    dropout: float = knob(0.0, ge=0, lt=1)
    # peft target_modules: module-name suffixes; (): query/value projections of a transformer, every
    # Linear layer but the output head otherwise. The head always trains (peft modules_to_save).
    targets: tuple[str, ...] = knob(())
    lr: float = knob(0.0, ge=0)  # 0: path.lr


@dataclass(frozen=True)
class ContinualConfig:
    """Continual learning on a task stream (paper Algorithm 1)."""

    stream: str = knob("split", choices=("split", "datasets", "domain"))
    head: str = knob("shared", choices=LAYOUTS)
    num_tasks: int = knob(5, gt=0)  # split and domain streams; a datasets stream has one task per entry of `tasks`
    classes_per_task: int = knob(0, ge=0)  # 0: num_classes // num_tasks
    tasks: tuple[dict, ...] = knob(())  # datasets stream: [{name, kwargs}] per task, as the `data` section
    domain: str = knob("permute", choices=("permute", "rotate"))  # domain stream: the per-task transform
    domain_seed: int = knob(0, ge=0)
    rotate_degrees: float = knob(15.0)
    memory_per_task: int = knob(20, gt=0)
    setting: str = knob("class", choices=("class", "task"))  # the setting summary.json headlines; both computed
    base: str = knob("train", choices=("train", "as_is"))  # task 0: train on it, or take the network as it is
    base_weights: str = ""  # a state dict (.safetensors/.pt) loaded into the network before task 0
    baselines: tuple[str, ...] = knob(("naive", "er", "ewc"), choices=CONTINUAL_BASELINES.names)
    ewc_lambda: float = knob(100.0, ge=0)
    ewc_samples: int = knob(200, gt=0)
    lwf_lambda: float = knob(1.0, ge=0)
    lwf_temperature: float = knob(2.0, gt=0)
    der_alpha: float = knob(0.3, ge=0)  # DER++: weight of the logit-matching term
    der_beta: float = knob(0.5, ge=0)  # DER++: weight of the replayed labels' cross-entropy
    lora: LoraOptions = field(default_factory=LoraOptions)
    pca_coordinates: int = knob(100_000, gt=0)  # weight-space PCA: a seeded subset of this many coordinates

    def check(self, cfg: Config) -> None:
        if cfg.operation != "continual":
            return
        if self.stream == "datasets":
            if not self.tasks:
                raise ConfigError("config key 'continual.tasks': a datasets stream needs one entry per task "
                                  "({name, kwargs}, like the data section)")
            for i, t in enumerate(self.tasks):
                bad = sorted(set(t) - {"name", "kwargs"})
                if "name" not in t or bad:
                    raise ConfigError(f"config key 'continual.tasks[{i}]': give name and optional kwargs"
                                      f"{', not ' + ', '.join(bad) if bad else ''}")
            if self.head == "shared":
                raise ConfigError("config key 'continual.head': 'shared' needs one label space; the tasks of a "
                                  "datasets stream have their own, use 'multi' or 'grow'")
        elif self.tasks:
            raise ConfigError(f"config key 'continual.tasks' lists datasets, but continual.stream is "
                              f"{self.stream!r} (set stream: datasets)")


def num_tasks(cfg: Config) -> int:
    cc = cfg.continual
    return len(cc.tasks) if cc.stream == "datasets" else cc.num_tasks


def fip_continual_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """FIP phases for tasks 1..T−1 (the path starts at the network trained on task 0)."""
    head = head_of(tasks)
    dist = get_distance(cfg.path.distance)
    phases = []
    for i in range(1, len(tasks)):
        x_mem, _ = memory_upto(tasks, i)

        def secondary(model: nn.Module, logits: Tensor | None, x: Tensor | None, y: Tensor | None,
                      state: PhaseState, i: int = i) -> Tensor:
            assert logits is not None and y is not None
            return head.cross_entropy(logits, y, i)

        phases.append(fip_phase(
            f"task{i}", cfg.path, seed, memory=x_mem, secondary=secondary,
            new_data=tasks[i].train_data, distance=head.invariance(dist, i),
            finish=row_finish(tasks, i),
        ))
    return phases


def stream_from_config(cfg: Config, bundle: Any = None) -> TaskStream:
    """The task stream `cfg.continual` describes (`bundle`: the data of a split or domain stream; None
    loads `cfg.data`)."""
    cc = cfg.continual
    if cc.stream == "datasets":
        bundles = []
        for i, t in enumerate(cc.tasks):
            try:
                bundles.append(get_data(t["name"], **dict(t.get("kwargs") or {})))
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"config key 'continual.tasks[{i}]': {e.args[0] if e.args else e}") from None
        try:
            return streams.datasets_stream(bundles)
        except ValueError as e:
            raise ConfigError(f"config key 'continual.tasks': {e}") from None
    bundle = bundle if bundle is not None else load_bundle(cfg)
    if cc.stream == "domain":
        tfs = (streams.permutations(cc.num_tasks, bundle.input_shape, cc.domain_seed) if cc.domain == "permute"
               else streams.rotations(cc.num_tasks, cc.rotate_degrees))
        names = [f"{cc.domain} {i}" if i else "original" for i in range(cc.num_tasks)]
        return streams.domain_stream(bundle, tfs, names)
    try:
        return streams.class_split(bundle, cc.num_tasks, classes_per_task=cc.classes_per_task or None)
    except ValueError as e:
        raise ConfigError(f"config section 'continual': {e}") from None


def make_head(layout: str, stream: TaskStream) -> tuple[Head, list[dict[int, int]]]:
    try:
        return Head.build(layout, [t.classes for t in stream.tasks], stream.shared_labels, stream.num_labels)
    except ValueError as e:
        raise ConfigError(f"config key 'continual.head': {e}") from None


def build_tasks(cfg: Config, bundle: Any, device: torch.device, seed: int, *, stream: TaskStream | None = None,
                head: Head | None = None, columns: list[dict[int, int]] | None = None) -> list[TaskTensors]:
    """The tasks of a stream (default: the one `cfg.continual` describes over `bundle`) with their replay
    memories, labels mapped to the head's output columns (`fipray.data.memory.materialise`)."""
    cc, d = cfg.continual, cfg.data
    if stream is None:
        stream = stream_from_config(cfg, bundle)
    if head is None or columns is None:
        head, columns = make_head(cc.head, stream)
    for i, t in enumerate(stream.tasks):
        n = len(t.train)  # type: ignore[arg-type]
        if cc.memory_per_task > n:
            raise ConfigError(f"config key 'continual.memory_per_task': {cc.memory_per_task} "
                              f"exceeds the {n} training examples of task {i}")

    def streamed(dataset: Dataset) -> Examples:
        return StreamedExamples(dataset, device, workers=d.workers, train_transform=build_transform(d.train_transforms),
                                eval_transform=build_transform(d.eval_transforms))

    return materialise(stream, head, columns, device, seed, cc.memory_per_task,
                       streamed=streamed if d.stream else None)


def _stream(ctx: RunContext) -> tuple[TaskStream, Head, list[dict[int, int]]]:
    return ctx.memos["stream"]


def _tasks(ctx: RunContext, seed: int) -> list[TaskTensors]:
    stream, head, columns = _stream(ctx)
    return ctx.memo(f"tasks/{seed}", lambda: build_tasks(ctx.cfg, ctx.bundle, ctx.device, seed, stream=stream,
                                                         head=head, columns=columns))


def methods_of(cfg: Config) -> list[str]:
    """FIP, then the baselines; `lora` is one method per rank (`lora_r8`, ...)."""
    out = ["fip"]
    for b in cfg.continual.baselines:
        out += [f"lora_r{r}" for r in cfg.continual.lora.ranks] if b == "lora" else [b]
    return out


def method_phases(method: str, tasks: list[TaskTensors], cfg: Config, seed: int) -> tuple[list[Phase], dict]:
    """A method's phases for tasks 1..T−1 and extra `run_path` arguments (e.g. LoRA's weights view)."""
    if method == "fip":
        return fip_continual_phases(tasks, cfg, seed), {}
    m = re.fullmatch(r"lora_r(\d+)", method)
    got = (CONTINUAL_BASELINES.get("lora")(tasks, cfg, seed, rank=int(m.group(1))) if m
           else CONTINUAL_BASELINES.get(method)(tasks, cfg, seed))
    return got if isinstance(got, tuple) else (got, {})


def _load_weights(model: nn.Module, file: str) -> None:
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'continual.base_weights': {file!r} is not a file")
    try:
        model.load_state_dict(load_state_dict_file(path))
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"config key 'continual.base_weights': {file!r} does not fit the model: "
                          f"{str(e).splitlines()[0]}") from None


@register_operation
class Continual(Operation):
    """FIP continual learning vs its baselines (naive, ER, EWC, LwF, DER++, LoRA, joint), over seeds."""

    name = "continual"
    help = "run the continual experiment (FIP vs its baselines over seeds)"
    section = ContinualConfig
    metrics = ("acc_mean", "task_acc_mean", "bwt_mean")
    smoke = ("seeds=[0]", "train.steps=40", "path.steps=20", "path.record_every=10", "path.checkpoint_every=20")
    supports_paths = True

    def context(self, cfg: Config, *, bundle: Any = None, tasks: Any = None, **kwargs: Any) -> RunContext:
        """The stream (the caller's `tasks`, else the config's), its head, and a model spec as wide as
        the head."""
        if tasks is not None and not isinstance(tasks, TaskStream):
            raise ConfigError(f"tasks= must be a fipray.data.streams.TaskStream (class_split, datasets_stream, "
                              f"domain_stream), got {type(tasks).__name__}")
        stream = tasks if tasks is not None else stream_from_config(cfg, bundle)
        head, columns = make_head(cfg.continual.head, stream)
        first = stream.tasks[0]
        if bundle is None or tasks is not None:
            bundle = DataBundle(first.train, first.test, stream.num_labels, stream.input_shape, stream.name)
        ctx = RunContext.create(cfg, bundle=bundle, **kwargs)
        ctx.spec["num_classes"] = head.num_outputs
        ctx.memos["stream"] = (stream, head, columns)
        return ctx

    def prepare_base(self, ctx: RunContext, model: nn.Module, tasks: list[TaskTensors], seed: int) -> None:
        """Task 0: the base network trained on it (from `base_weights` when given), or taken as it is."""
        cc = ctx.cfg.continual
        if cc.base_weights:
            _load_weights(model, cc.base_weights)
        if cc.base == "train":
            head = head_of(tasks)
            run_path(model, [supervised_phase("base", tasks[0].train_data, None, ctx.cfg.train, seed,
                                              loss=head.loss(0))],
                     record_every=max(ctx.cfg.train.steps, 1), checkpoint_every=10**9, progress=ctx.bar)

    # The experiment -------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg
        methods = methods_of(cfg)
        T = len(_stream(ctx)[0])
        total = len(cfg.seeds) * (cfg.train.steps + len(methods) * (T - 1) * cfg.path.steps)
        rows = collect_seeds(ctx, total, self.name,
                             ("results", "accuracy_matrix", "path", "geometry", "weight_change", "pca"),
                             lambda seed: self.run_seed(ctx, seed, methods))
        summary = self.aggregate(ctx, methods, rows)
        self.report(ctx, summary, methods, rows)
        return summary

    def run_seed(self, ctx: RunContext, seed: int, methods: list[str]) -> dict[str, list]:
        """Base network on task 0, then every method's phases for tasks 1..T−1 from it."""
        cfg = ctx.cfg
        tasks = _tasks(ctx, seed)
        base = ctx.model(seed)
        rand = random_rows(base, tasks)
        t0 = time.perf_counter()
        self.prepare_base(ctx, base, tasks, seed)
        base_seconds = time.perf_counter() - t0
        row0 = evaluate_row(base, tasks, 0)
        w0 = {k: v.detach().clone() for k, v in base.named_parameters()}
        n_params = sum(v.numel() for v in w0.values())
        heldout = torch.cat([t.x_test for t in tasks])[: cfg.path.heldout]
        out: dict[str, list] = {k: [] for k in ("results", "accuracy_matrix", "path", "geometry", "weight_change",
                                                "pca")}
        snaps: dict[str, list[np.ndarray]] = {}
        start = None
        for method in methods:
            model = clone(base)
            phases, extra = method_phases(method, tasks, cfg, seed)
            fip = method == "fip"
            snap = WeightSnapshots(n_params, cfg.continual.pca_coordinates, extra.get("weights") or flat_trainable)
            if start is None:
                start = snap.take(model)
            along = accuracy_along_path(tasks) if fip else None

            def evaluate(m: nn.Module, along: Any = along, snap: WeightSnapshots = snap) -> dict:
                return {**snap(m), **(along(m) if along is not None else {})}

            t0 = time.perf_counter()
            res = run_path(model, phases, out_dir=ctx.checkpoint_dir(method, f"seed{seed}") if fip else None,
                           **{**ctx.path_kwargs(heldout, evaluate), **extra})
            seconds = base_seconds + time.perf_counter() - t0
            out["path"] += [{"method": method, "seed": seed, **r} for r in res.records]
            out["geometry"].append({"method": method, "seed": seed, **path_summary(res.records)})
            out["weight_change"] += [{"method": method, "seed": seed, "layer": k, "ratio": v}
                                     for k, v in weight_change(w0, model).items()]
            snaps[method] = snap.rows
            R_rows = {0: row0, **{i: res.phase_results[f"task{i}"] for i in range(1, len(tasks))}}
            results, matrices = result_rows(R_rows, rand, {"method": method, "seed": seed},
                                            {"memory_per_task": cfg.continual.memory_per_task,
                                             "distance": cfg.path.distance, "seconds": seconds})
            out["results"] += results
            out["accuracy_matrix"] += matrices
        if seed == cfg.seeds[0] and start is not None:
            out["pca"] = [{"method": m, "k": k, "pc1": float(x), "pc2": float(y)}
                          for m, xy in weight_pca(snaps, start).items() for k, (x, y) in enumerate(xy)]
        return out

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
        heldout = torch.cat([t.x_test for t in all_tasks])[: ctx.cfg.path.heldout]
        return fip_continual_phases(tasks, ctx.cfg, seed), {"heldout": heldout,
                                                            "evaluate": accuracy_along_path(all_tasks)}

    def path_steps(self, cfg: Config) -> int:
        return (num_tasks(cfg) - 1) * cfg.path.steps

    # Sweep trials -----------------------------------------------------------------------------------
    def trial_iterations(self, cfg: Config) -> int:
        return len(cfg.seeds) * (num_tasks(cfg) - 1)

    def trial(self, ctx: RunContext, report: Report, **options: Any) -> None:
        """An iteration per task phase per seed; `acc_mean` is the running mean over seeds of the
        class-incremental accuracy on the tasks seen so far, so the last report is the ACC mean."""
        cfg = ctx.cfg
        done: dict[str, list[float]] = {"class": [], "task": [], "bwt": []}
        for seed in cfg.seeds:
            tasks = _tasks(ctx, seed)
            base = ctx.model(seed)
            rand = random_rows(base, tasks)["class"]
            self.prepare_base(ctx, base, tasks, seed)
            rows = {0: evaluate_row(base, tasks, 0)}

            def on_event(event: str, payload: dict, rows: dict = rows, rand: list = rand, seed: int = seed,
                         last: int = len(tasks) - 1) -> None:
                if event != "phase_end":
                    return
                i = int(payload["phase"][len("task"):])
                rows[i] = payload
                cur = metrics_so_far(rows, rand, i)
                m = {k: float(np.mean(done[k] + [v])) for k, v in cur.items()}
                report({"acc_mean": m["class"], "task_acc_mean": m["task"], "bwt_mean": m["bwt"],
                        "seed": seed, "task": i})
                if i == last:
                    for k, v in cur.items():
                        done[k].append(v)

            kw = ctx.path_kwargs()
            run_path(clone(base), fip_continual_phases(tasks, cfg, seed), record_every=10**9,
                     checkpoint_every=10**9, distance=kw["distance"], callback=on_event)
