"""FIP continual learning vs naive fine-tuning, experience replay and EWC, over seeds.

Protocol (shared/PROTOCOLS.md): the full accuracy matrix R per method and seed in both the
class-incremental and the task-incremental setting; ACC, BWT, forgetting and FWT from R; the
same replay memory size for FIP and ER, stated in every table with the output distance.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fipray import report
from fipray._batches import mix_seed
from fipray.baselines.continual import CONTINUAL_BASELINES
from fipray.config import Config, ConfigError
from fipray.core.distances import get_distance
from fipray.eval.continual import cl_metrics, task_accuracy
from fipray.experiments._common import (
    build_model,
    clone,
    device_of,
    load_bundle,
    mean_std,
    model_spec,
    path_summary,
    progress_bar,
    tensors,
    train_base,
    write_outputs,
)
from fipray.ops.continual import (
    TaskTensors,
    accuracy_along_path,
    evaluate_row,
    fip_continual_phases,
    seen_classes,
)
from fipray.path import run_path

METHOD_PHASES = {"fip": fip_continual_phases, **CONTINUAL_BASELINES}


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


def build_tasks(cfg: Config, bundle, device: torch.device, seed: int) -> list[TaskTensors]:
    from fipray.data import split_tasks

    cpt = cfg.continual.classes_per_task or None
    try:
        split = split_tasks(bundle, cfg.continual.num_tasks, classes_per_task=cpt)
    except ValueError as e:
        raise ConfigError(f"config section 'continual': {e}") from None
    tasks = []
    for t in split:
        xtr, ytr = tensors(t.train, device)
        xte, yte = tensors(t.test, device)
        if cfg.continual.memory_per_task > len(xtr):
            raise ConfigError(f"config key 'continual.memory_per_task': {cfg.continual.memory_per_task} "
                              f"exceeds the {len(xtr)} training examples of task {t.index}")
        mem = stratified_indices(ytr, cfg.continual.memory_per_task, mix_seed(seed, 5, t.index))
        tasks.append(TaskTensors(t.index, tuple(int(c) for c in t.classes), xtr, ytr, xte, yte,
                                 xtr[mem], ytr[mem]))
    return tasks


def run(cfg: Config, out: Path, *, progress: bool = True, bundle=None) -> dict:
    dev = device_of(cfg)
    bundle = bundle if bundle is not None else load_bundle(cfg)
    spec = model_spec(cfg, bundle)
    methods = ["fip", *cfg.continual.baselines]
    T = cfg.continual.num_tasks
    results: list[dict] = []
    matrices: list[dict] = []
    path_rows: list[dict] = []
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    geometry: list[dict] = []
    total = len(cfg.seeds) * (cfg.train.steps + len(methods) * (T - 1) * cfg.path.steps)
    with progress_bar(total, "continual", progress) as bar:
        for seed in cfg.seeds:
            tasks = build_tasks(cfg, bundle, dev, seed)
            base = build_model(spec, seed, dev)
            rand = {
                "class": [task_accuracy(base, t.x_test, t.y_test, seen_classes(tasks, j))
                          for j, t in enumerate(tasks)],
                "task": [task_accuracy(base, t.x_test, t.y_test, list(t.classes)) for t in tasks],
            }
            t0 = time.perf_counter()
            train_base(base, tasks[0].x_train, tasks[0].y_train, cfg, seed, progress=bar)
            base_seconds = time.perf_counter() - t0
            row0 = evaluate_row(base, tasks, 0)
            for method in methods:
                model = clone(base)
                phases = METHOD_PHASES[method](tasks, cfg, seed)
                ckpt = out / "paths" / cfg.run_id() / method / f"seed{seed}" if method == "fip" else None
                t0 = time.perf_counter()
                heldout = torch.cat([t.x_test for t in tasks])[: cfg.path.heldout]
                res = run_path(model, phases, out_dir=ckpt, record_every=cfg.path.record_every,
                               checkpoint_every=cfg.path.checkpoint_every, heldout=heldout,
                               distance=get_distance(cfg.path.distance),
                               evaluate=accuracy_along_path(tasks) if method == "fip" else None,
                               progress=bar)
                seconds[method].append(base_seconds + time.perf_counter() - t0)
                for r in res.records:
                    path_rows.append({"method": method, "seed": seed, **r})
                if method == "fip":
                    geometry.append(path_summary(res.records))
                for setting in ("class", "task"):
                    R = np.array([row0[setting]] + [res.phase_results[f"task{i}"][setting] for i in range(1, T)])
                    m = cl_metrics(R, np.array(rand[setting]))
                    results.append({"method": method, "seed": seed, "setting": setting, **m,
                                    "memory_per_task": cfg.continual.memory_per_task,
                                    "distance": cfg.path.distance, "seconds": seconds[method][-1]})
                    for i in range(T):
                        for j in range(T):
                            matrices.append({"method": method, "seed": seed, "setting": setting,
                                             "i": i, "j": j, "acc": float(R[i, j])})
                    matrices.extend({"method": method, "seed": seed, "setting": setting, "i": -1, "j": j,
                                     "acc": float(rand[setting][j])} for j in range(T))

    def agg(method: str, setting: str) -> dict:
        rows = [r for r in results if r["method"] == method and r["setting"] == setting]
        acc = mean_std([r["acc"] for r in rows])
        return {"acc_mean": acc[0], "acc_std": acc[1],
                "bwt_mean": mean_std([r["bwt"] for r in rows])[0],
                "bwt_std": mean_std([r["bwt"] for r in rows])[1],
                "forgetting_mean": mean_std([r["forgetting"] for r in rows])[0],
                "fwt_mean": mean_std([r["fwt"] for r in rows])[0],
                "seconds": float(np.mean(seconds[method]))}

    setting = cfg.continual.setting
    other = "task" if setting == "class" else "class"
    summary = {
        "operation": "continual", "setting": setting, "memory_per_task": cfg.continual.memory_per_task,
        "distance": cfg.path.distance, "seeds": list(cfg.seeds), "num_tasks": T,
        "methods": {m: {**agg(m, setting), f"{other}_incremental": agg(m, other)} for m in methods},
        "fip_path": {k: float(np.mean([g[k] for g in geometry])) for k in geometry[0]},
    }
    report.plot_path_accuracy([r for r in path_rows if r["method"] == "fip" and r["seed"] == cfg.seeds[0]],
                              out / "path_accuracy.png")
    report.plot_matrices(matrices, methods, setting, out / "accuracy_matrix.png")
    md = report.continual_report(summary, cfg)
    write_outputs(out, cfg, summary, {"path": path_rows, "accuracy_matrix": matrices, "results": results}, md)
    return summary
