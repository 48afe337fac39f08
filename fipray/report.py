"""Plots and markdown tables from result rows (the Parquet tables' rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    from fipray.atomic import atomic_write

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    pyplot().close(fig)


def plot_path_accuracy(rows: list[dict], path: Path) -> None:
    """Per-task accuracy (columns acc_task*) along the path's global step."""
    if not rows:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted(k for k in rows[0] if k.startswith("acc_task"))
    steps = [r["step"] for r in rows]
    for k in keys:
        ax.plot(steps, [r.get(k, np.nan) for r in rows], label=k.replace("acc_", ""))
    for r0, r1 in zip(rows, rows[1:]):
        if r0["phase"] != r1["phase"]:
            ax.axvline(r0["step"], color="gray", lw=0.5, ls=":")
    ax.set_xlabel("path step")
    ax.set_ylabel("test accuracy (all classes)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("FIP continual learning: accuracy along the path")
    save_figure(fig, path)


def plot_task_pair(records: list[dict], out: Path, names: tuple[str, str], title: str = "",
                   others: dict[str, tuple[float, float]] | None = None) -> None:
    """A 2-task stream's FIP path in the plane (task-0 accuracy, task-1 accuracy), like Fig. 2 of the FIP paper.

    Args:
        records: the path's record rows in path order (`acc_task0`, `acc_task1`; rows without both are
            skipped, e.g. those of another phase).
        out: the PNG to write.
        names: the two tasks' names, for the axis labels.
        title: the figure title ("" gives "FIP path: <task 0> vs <task 1>").
        others: method -> its final (task-0, task-1) accuracies (naive, ER, DER++, joint), drawn as
            labelled markers.

    Nothing is written when there is nothing to draw (no row with both accuracies and no `others`).
    """
    pts = [(float(r["acc_task0"]), float(r["acc_task1"])) for r in records
           if r.get("acc_task0") is not None and r.get("acc_task1") is not None]
    others = others or {}
    if not pts and not others:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color="C0", label="FIP path", zorder=3)
        for (x, y), text in ((pts[0], "start"), (pts[-1], "end")):
            ax.plot(x, y, "o", ms=7, mfc="none", mec="k", zorder=4)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, -10 if text == "start" else 6),
                        fontsize=8)
    markers = "sD^vP*Xh"
    for i, (method, (x, y)) in enumerate(others.items()):
        ax.plot(x, y, markers[i % len(markers)], ms=7, color=f"C{i + 1}", label=method, zorder=5)
        ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(f"{names[0]} test accuracy (task 0)")
    ax.set_ylabel(f"{names[1]} test accuracy (task 1)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or f"FIP path: {names[0]} vs {names[1]}", fontsize=9)
    save_figure(fig, Path(out))


def plot_matrices(rows: list[dict], methods: list[str], setting: str, path: Path) -> None:
    """Mean accuracy matrix R per method (one heatmap each)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), squeeze=False)
    for ax, m in zip(axes[0], methods):
        sel = [r for r in rows if r["method"] == m and r["setting"] == setting and r["i"] >= 0]
        T = max(r["i"] for r in sel) + 1
        R = np.zeros((T, T))
        n = np.zeros((T, T))
        for r in sel:
            R[r["i"], r["j"]] += r["acc"]
            n[r["i"], r["j"]] += 1
        R /= np.maximum(n, 1)
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for i in range(T):
            for j in range(T):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if R[i, j] < 0.6 else "k")
        ax.set_title(f"{m} ({setting}-IL)")
        ax.set_xlabel("task j")
        ax.set_ylabel("after task i")
    save_figure(fig, path)


def plot_lines(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
               title: str, path: Path, xscale: str = "linear") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xscale(xscale)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _pm(m: float, s: float) -> str:
    return f"{m:.4f} ± {s:.4f}"


def plot_weight_pca(rows: list[dict], methods: list[str], path: Path, title: str) -> None:
    """Every method's path in the plane of the top two principal components of all their weights."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for m in methods:
        pts = sorted((r["k"], r["pc1"], r["pc2"]) for r in rows if r["method"] == m)
        if not pts:
            continue
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=".", ms=3, lw=1.2, label=m)
        ax.plot(pts[-1][1], pts[-1][2], "o", ms=5, color=ax.lines[-1].get_color())
    first = next(r for r in rows if r["k"] == 0)
    ax.plot(first["pc1"], first["pc2"], "k*", ms=10, label="start (after task 0)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def continual_report(summary: dict, cfg: Any) -> str:
    setting = summary["setting"]
    other = "task" if setting == "class" else "class"
    methods = summary["methods"]
    tasks = summary.get("tasks") or []
    head_text = {"shared": "one head over one label space", "multi": "one head per task",
                 "grow": "one head, output nodes appended per task",
                 "union": "one head over the union of the tasks' label spaces, every column live"}.get(summary.get("head", "shared"), "")
    stream_text = {"split": "class-incremental splits of one dataset", "class": "class-incremental splits of one "
                   "dataset", "datasets": "a sequence of datasets with their own label spaces",
                   "domain": "domain-incremental (same classes, one input transform per task)"}
    out = [f"# Continual learning: {summary['num_tasks']} tasks, model {cfg.model.name}",
           "",
           f"Stream: {stream_text.get(summary.get('stream', 'class'), summary.get('stream'))}"
           f"{' — ' + '; '.join(f'task {i}: {t}' for i, t in enumerate(tasks)) if tasks else ''}. "
           f"Head: {summary.get('head', 'shared')} ({head_text}). Task 0: "
           f"{'trained' if summary.get('base', 'train') == 'train' else 'the network as it is (no training)'}.",
           "",
           f"Memory: {summary['memory_per_task']} examples per earlier task (FIP, ER and DER++ alike; LwF, LoRA "
           f"and naive use none; joint sees all data); "
           f"output distance: {summary['distance']}; seeds: {summary['seeds']} (mean ± std).", ""]
    for s, key in ((setting, None), (other, f"{other}_incremental")):
        rows = []
        for m, v in methods.items():
            d = v if key is None else v[key]
            rows.append([m, _pm(d["acc_mean"], d["acc_std"]), _pm(d["bwt_mean"], d.get("bwt_std", 0.0)),
                         d["forgetting_mean"], d["fwt_mean"], round(v["seconds"], 1)])
        out += [f"## {s}-incremental", "",
                md_table(["method", "ACC", "BWT", "forgetting", "FWT", "seconds/seed"], rows), ""]
    if any("final_task_accuracy" in v for v in methods.values()):
        T = summary["num_tasks"]
        out += ["## After the last task, per task (task-incremental accuracy, mean over seeds)", "",
                md_table(["method", *[f"task {j}" for j in range(T)]],
                         [[m, *v["final_task_accuracy"]] for m, v in methods.items()]), ""]
    if any(v.get("weight_change") for v in methods.values()):
        layers = list(dict.fromkeys(k for v in methods.values() for k in v.get("weight_change", {}) if k != "all"))
        out += ["## Weight change from the network after task 0 (‖ΔW‖F / ‖W0‖F per layer; path length in "
                "weight space, summed over every optimizer step; mean output drift on held-out inputs)", "",
                md_table(["method", "all", *layers, "path length", "straight distance", "held-out drift"],
                         [[m, v["weight_change"].get("all", float("nan")),
                           *[v["weight_change"].get(k, float("nan")) for k in layers],
                           v["path"].get("fip_length", float("nan")), v["path"].get("straight_distance", float("nan")),
                           v["path"].get("heldout_distance_mean", float("nan"))] for m, v in methods.items()]), ""]
    out += ["Plots: `path_accuracy.png` (FIP, first seed), `accuracy_matrix.png`, `weight_pca.png` (every method's "
            "path, first seed). Tables: `results.parquet`, `accuracy_matrix.parquet` (i = −1 is the random-init "
            "row), `path.parquet`, `weight_change.parquet`, `pca.parquet`.", ""]
    return "\n".join(out)


def plot_serve_throughput(rows: list[dict], path: Path) -> None:
    """Examples/s through HTTP (per ingress, payload and inputs per request) beside the in-process ensemble's.

    ``rows``: ``benchmarks/bench_serve.py``'s HTTP rows (keys ``ingress``, ``payload``, ``request_batch``,
    ``examples_per_s``, ``inproc_examples_per_s``, ``http/in-process``).
    """
    if not rows:
        return
    plt = pyplot()
    batches = sorted({r["request_batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.6), squeeze=False)
    for ax, rb in zip(axes[0], batches):
        sel = [r for r in rows if r["request_batch"] == rb]
        labels = [f"{r.get('ingress', 'proxy')}\n{r['payload']}" + ("\nno access log" if r.get("access_log") is False
                                                                else "") for r in sel]
        ax.bar(range(len(sel)), [r["examples_per_s"] for r in sel], color="tab:blue", label="HTTP")
        ax.axhline(sel[0]["inproc_examples_per_s"], color="k", ls="--", lw=1, label="in-process")
        for i, r in enumerate(sel):
            ax.text(i, r["examples_per_s"], f"{r['http/in-process']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(sel)), labels, fontsize=8)
        ax.set_title(f"{rb} input(s) per request")
        ax.set_ylabel("examples / s")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("HTTP / in-process throughput (numbers above the bars)", fontsize=9)
    save_figure(fig, path)
