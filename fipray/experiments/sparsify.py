"""FIP sparsification vs one-shot magnitude pruning, with and without masked fine-tuning.

Protocol (shared/PROTOCOLS.md): counted tensors are the Linear/Conv weights (head included
unless `sparsify.exclude_head`), every final network is exactly p-sparse over them (masks
applied), accuracy vs sparsity over a sweep of p. magnitude_ft fine-tunes for as many steps as
the FIP path takes in all (path.steps + sparsify.invariance_steps).
"""

from __future__ import annotations

import time
from pathlib import Path

from fipray import report
from fipray.baselines.sparsify import iterative_magnitude, magnitude_finetune, one_shot
from fipray.config import Config
from fipray.core.distances import get_distance
from fipray.core.step import Anchor
from fipray.eval.sparsity import sparsity
from fipray.experiments._common import (
    accuracy,
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
from fipray.ops.sparsify import counted, fip_sparsify_phases
from fipray.path import run_path


def run(cfg: Config, out: Path, *, progress: bool = True, bundle=None) -> dict:
    dev = device_of(cfg)
    bundle = bundle if bundle is not None else load_bundle(cfg)
    spec = model_spec(cfg, bundle)
    sc = cfg.sparsify
    methods = ["fip", *sc.baselines]
    ft_steps = cfg.path.steps + sc.invariance_steps
    rows: list[dict] = []
    path_rows: list[dict] = []
    dense: list[float] = []
    geometry: dict[str, list[dict]] = {}
    per_p = cfg.path.steps + sc.invariance_steps + ft_steps * len({"magnitude_ft", "imp"} & set(methods))
    total = len(cfg.seeds) * (cfg.train.steps + len(sc.targets) * per_p)
    with progress_bar(total, "sparsify", progress) as bar:
        xtr, ytr = tensors(bundle.train, dev)
        xte, yte = tensors(bundle.test, dev)
        for seed in cfg.seeds:
            base = build_model(spec, seed, dev)
            t0 = time.perf_counter()
            train_base(base, xtr, ytr, cfg, seed, progress=bar)
            base_seconds = time.perf_counter() - t0
            dense.append(accuracy(base, xte, yte))
            names = counted(base, sc.exclude_head)
            anchor = Anchor.from_model(base, xtr)
            for p in sc.targets:
                for method in methods:
                    model = clone(base)
                    t0 = time.perf_counter()
                    if method == "fip":
                        phases = fip_sparsify_phases(xtr, anchor, p, cfg, seed, names)
                        res = run_path(
                            model, phases,
                            out_dir=out / "paths" / cfg.run_id() / f"seed{seed}" / f"p{p:g}",
                            record_every=cfg.path.record_every, checkpoint_every=cfg.path.checkpoint_every,
                            heldout=xte[: cfg.path.heldout], distance=get_distance(cfg.path.distance),
                            evaluate=lambda m, names=names: {"accuracy": accuracy(m, xte, yte),
                                                             "sparsity": sparsity(m, names)},
                            progress=bar)
                        path_rows += [{"seed": seed, "target": p, **r} for r in res.records]
                        geometry.setdefault(f"{p:g}", []).append(path_summary(res.records))
                    elif method == "magnitude":
                        one_shot(model, names, p)
                    elif method == "magnitude_ft":
                        magnitude_finetune(model, names, p, xtr, ytr, cfg.train, seed, ft_steps, progress=bar)
                    else:
                        iterative_magnitude(model, names, p, xtr, ytr, cfg.train, seed, ft_steps, progress=bar)
                    rows.append({"method": method, "seed": seed, "target": p,
                                 "sparsity": sparsity(model, names), "accuracy": accuracy(model, xte, yte),
                                 "dense_accuracy": dense[-1],
                                 "seconds": time.perf_counter() - t0 + base_seconds})

    methods_summary: dict = {}
    for m in methods:
        methods_summary[m] = {}
        for p in sc.targets:
            sel = [r for r in rows if r["method"] == m and r["target"] == p]
            acc = mean_std([r["accuracy"] for r in sel])
            methods_summary[m][f"{p:g}"] = {
                "accuracy_mean": acc[0], "accuracy_std": acc[1],
                "sparsity": min(r["sparsity"] for r in sel), "sparsity_max": max(r["sparsity"] for r in sel),
                "seconds": sum(r["seconds"] for r in sel) / len(sel)}
    summary = {"operation": "sparsify", "dense_accuracy": mean_std(dense)[0], "dense_accuracy_std": mean_std(dense)[1],
               "seeds": list(cfg.seeds), "counted": names, "exclude_head": sc.exclude_head,
               "targets": [f"{p:g}" for p in sc.targets], "methods": methods_summary,
               "fip_path": {p: {k: float(sum(g[k] for g in v) / len(v)) for k in v[0]} for p, v in geometry.items()}}
    series = {m: ([v["sparsity"] for v in methods_summary[m].values()],
                  [v["accuracy_mean"] for v in methods_summary[m].values()]) for m in methods}
    report.plot_lines(series, "sparsity (fraction of counted weights = 0)", "test accuracy",
                      f"Accuracy vs sparsity ({cfg.model.name} on {cfg.data.name})", out / "accuracy_vs_sparsity.png")
    table = [[m, p, v["sparsity"], f"{v['accuracy_mean']:.4f} ± {v['accuracy_std']:.4f}"]
             for m in methods for p, v in methods_summary[m].items()]
    md = "\n".join([
        f"# Sparsification: {cfg.model.name} on {cfg.data.name}", "",
        f"Dense accuracy {summary['dense_accuracy']:.4f}; seeds {list(cfg.seeds)} (mean ± std). Counted tensors "
        f"({'head excluded' if sc.exclude_head else 'head included'}): {', '.join(names)}. "
        f"magnitude_ft and imp fine-tune {ft_steps} steps in all (= FIP path + invariance phase); "
        f"imp prunes 20% of the remaining weights per round.", "",
        report.md_table(["method", "target", "sparsity", "accuracy"], table), "",
        "Plot: `accuracy_vs_sparsity.png`. Tables: `results.parquet`, `path.parquet`.", ""])
    write_outputs(out, cfg, summary, {"results": rows, "path": path_rows}, md)
    return summary
