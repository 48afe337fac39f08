"""The `compose` operation (`fipray compose`): operations applied in sequence, every sampled network a node of one set.

The paper (Fig. 6) applies continual learning (CL) and compression (Co) in both orders, CL∘Co
and Co∘CL, and finds networks of similar task performance and sparsity at distinct weights. Here
each order in `compose.orders` (e.g. `continual>sparsify`) is one path from the same base network
w0 (trained on task 0), run operation by operation:

* continual: FIP phases for tasks 1..T−1, invariance on the replay memory of the earlier tasks
  (as `fipray continual`); after a sparsify, its masks are kept (gradients masked, weights
  re-masked after each step), so the network stays exactly p-sparse.
* sparsify: FIP to the p-sparse submanifold then the masked invariance phase (as `fipray
  sparsify`), invariance on what a continual learner holds at that moment: the training inputs
  of the latest task learned plus the replay memory of the earlier ones.

Every phase end (and every `compose.sample_every` steps) is a node of a network set
(`fipray.netset`: nodes with their metrics, edges = weight distances between consecutive nodes of
a path, weights as safetensors), all sharing the root w0: one path-connected set that `fipray
query` can search. Each operation is its own checkpointed `run_path`, so runs resume.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fipray import report
from fipray.atomic import atomic_write
from fipray.config import Config, ConfigError, knob
from fipray.core.masks import apply_masks, counted_tensors, magnitude_masks
from fipray.core.step import Anchor
from fipray.data.memory import TaskTensors, memory_upto
from fipray.eval.continual import heldout_inputs, task_accuracy
from fipray.eval.sparsity import sparsity
from fipray.netset import NetworkSetWriter
from fipray.operation import Operation, register_operation
from fipray.ops.continual import Continual, build_tasks
from fipray.ops.sparsify import Sparsify, counted, fip_sparsify_phases
from fipray.path import Phase, run_path
from fipray.phases import cross_entropy_secondary, fip_phase
from fipray.runtime import RunContext, path_summary, train_base, write_outputs

# The operations a composition may chain, by their registered names.
CHAINABLE = (Continual.name, Sparsify.name)


@dataclass(frozen=True)
class ComposeConfig:
    """Operations applied in sequence (`fipray compose`), e.g. continual then sparsify and back."""

    orders: tuple[str, ...] = knob(("continual>sparsify", "sparsify>continual"), nonempty=True)
    target: float = knob(0.8, gt=0, lt=1)  # the sparsify operation's sparsity
    sample_every: int = knob(0, ge=0)  # also a node every k steps of a phase (0: one node per phase end)

    def check(self, cfg: Config) -> None:
        for o in self.orders:
            if not all(op in CHAINABLE for op in o.split(">")):
                raise ConfigError(f"config key 'compose.orders': {o!r} must chain {' and '.join(CHAINABLE)} with "
                                  f"'>' (e.g. {'>'.join(CHAINABLE)})")


def _masked_continual_phases(tasks: list[TaskTensors], cfg: Config, seed: int, prefix: str,
                             names: list[str], masks: list[torch.Tensor] | None) -> list[Phase]:
    """FIP continual phases for tasks 1..T−1; with masks, the network stays on the sparse support."""
    grad_hook = after_step = None
    if masks is not None:
        def grad_hook(model: nn.Module) -> None:
            for t, m in zip(counted_tensors(model, names), masks):
                if t.grad is not None:
                    t.grad.mul_(m)

        def after_step(model: nn.Module, state) -> None:
            apply_masks(counted_tensors(model, names), masks)

    phases = []
    for i in range(1, len(tasks)):
        x_mem, _ = memory_upto(tasks, i)
        phases.append(fip_phase(f"{prefix}task{i}", cfg.path, seed, memory=x_mem, secondary=cross_entropy_secondary,
                                new_data=tasks[i].train_data, grad_hook=grad_hook,
                                after_step=after_step))
    return phases


class _NodeMetrics:
    """A node's metrics: accuracy on all test inputs and per task (argmax over all classes), sparsity."""

    def __init__(self, tasks: list[TaskTensors]):
        self.tasks = tasks
        self.every = [c for t in tasks for c in t.classes]
        self.splits = [t.test_tensors() for t in tasks]  # compose holds the test splits in memory
        self.x = torch.cat([x for x, _ in self.splits])
        self.y = torch.cat([y for _, y in self.splits])

    def __call__(self, model: nn.Module, names: list[str]) -> dict:
        accs = [task_accuracy(model, x, y, self.every) for x, y in self.splits]
        return {"accuracy": task_accuracy(model, self.x, self.y, self.every),
                "task_accuracy_mean": float(np.mean(accs)), "sparsity": sparsity(model, names),
                **{f"acc_task{j}": a for j, a in enumerate(accs)}}


def _slug(order: str) -> str:
    return order.replace(">", "-")


@dataclass
class _Chain:
    """Where one order's path stands: the last node, tasks learned so far, whether it is sparse."""

    prev: str
    learned: int = 1
    sparse: bool = False
    global_step: int = 0


def _phases(op: str, k: int, model: nn.Module, chain: _Chain, tasks: list[TaskTensors], cfg: Config, seed: int,
            names: list[str]) -> list[Phase]:
    """The phases of the k-th operation `op` of an order, from where the chain stands."""
    p, prefix = cfg.compose.target, f"{k}{op}_"
    if op == Continual.name:
        # Keep the exact sparse support an earlier sparsify left.
        masks = magnitude_masks(counted_tensors(model, names), p) if chain.sparse else None
        phases = _masked_continual_phases(tasks, cfg, seed, prefix, names, masks)
        chain.learned = len(tasks)
    else:
        # What a continual learner holds now: the latest task's inputs + older memories.
        x_inv = torch.cat([typing.cast(torch.Tensor, tasks[chain.learned - 1].x_train), memory_upto(tasks, chain.learned - 1)[0]]) \
            if chain.learned > 1 else typing.cast(torch.Tensor, tasks[0].x_train)
        phases = fip_sparsify_phases(x_inv, Anchor.from_model(model, x_inv), p, cfg, seed, names)
        for ph in phases:
            ph.name = prefix + ph.name
        chain.sparse = True
    for ph in phases:
        ph.sample_every = cfg.compose.sample_every or ph.steps
    return phases


@register_operation
class Compose(Operation):
    """Continual learning and sparsification in sequence, both orders, as one network set."""

    name = "compose"
    help = "apply operations in sequence (e.g. continual>sparsify and back), recording one path-connected network set"
    section = ComposeConfig
    smoke = ("seeds=[0]", "train.steps=40", "path.steps=10", "sparsify.invariance_steps=5", "continual.num_tasks=2",
             "compose.sample_every=5",
             "path.record_every=5", "path.checkpoint_every=10")

    def run(self, ctx: RunContext) -> dict:
        cfg, cc = ctx.cfg, ctx.cfg.compose
        assert ctx.out is not None
        writer = NetworkSetWriter(ctx.out / "set", ctx.spec, metadata={
            "operation": self.name, "orders": list(cc.orders), "target": cc.target, "config_hash": cfg.run_id()})
        steps_per = {op.name: op().path_steps(cfg) for op in (Continual, Sparsify)}
        total = len(cfg.seeds) * (cfg.train.steps + sum(steps_per[op] for o in cc.orders for op in o.split(">")))
        path_rows: list[dict] = []
        results: list[dict] = []
        with ctx.progress(total, "compose"):
            for seed in cfg.seeds:
                self.run_seed(ctx, seed, writer, path_rows, results)
        writer.close()
        summary = self.aggregate(ctx, results, writer)
        self.report(ctx, summary, writer, results, path_rows)
        return summary

    def run_seed(self, ctx: RunContext, seed: int, writer: NetworkSetWriter, path_rows: list[dict],
                 results: list[dict]) -> None:
        """w0 on task 0, then every order from it; every phase end a node of the set."""
        cfg, cc = ctx.cfg, ctx.cfg.compose
        if cfg.data.stream:
            raise ConfigError("compose keeps its tasks in memory: data.stream: true is not supported here yet")
        tasks = build_tasks(cfg, ctx.bundle, ctx.device, seed)
        metrics = _NodeMetrics(tasks)
        base = ctx.model(seed)
        train_base(base, tasks[0].train_data, None, cfg, seed, progress=ctx.bar, out_dir=ctx.base_dir(seed))
        names = counted(base, cfg.sparsify.exclude_head, cfg.sparsify.include)
        root = f"s{seed}-w0"
        writer.add_node(root, base.state_dict(), seed=seed, order="", operation="base", phase="base",
                        step=0, **metrics(base, names))
        ends: dict[str, str] = {}
        heldout = heldout_inputs(tasks, cfg.path.heldout)
        for order in cc.orders:
            model = ctx.model(seed)
            model.load_state_dict(base.state_dict())
            chain = _Chain(root)
            for k, op in enumerate(order.split(">")):
                phases = _phases(op, k, model, chain, tasks, cfg, seed, names)
                res = run_path(model, phases, out_dir=ctx.checkpoint_dir(f"seed{seed}", _slug(order), f"{k}{op}"),
                               **ctx.path_kwargs(heldout))
                path_rows += [{"seed": seed, "order": order, "operation": op, **r,
                               "step": r["step"] + chain.global_step} for r in res.records]
                for i, smp in enumerate(res.samples):
                    node = f"s{seed}-{_slug(order)}-{smp['phase']}-{smp['step']}"
                    state = res.sample_state(i)
                    probe = ctx.model(seed)
                    probe.load_state_dict(state)
                    writer.add_node(node, state, parent=chain.prev, seed=seed, order=order, operation=op,
                                    phase=smp["phase"], step=chain.global_step + smp["global_step"],
                                    **metrics(probe, names))
                    chain.prev = node
                chain.global_step += res.steps
            ends[order] = chain.prev
            results.append(_end_row(writer, seed, order, root, chain.prev, path_rows))
        orders = list(cc.orders)
        for a in range(len(orders)):
            for b in range(a + 1, len(orders)):
                results.append({"seed": seed, "order": f"{orders[a]} | {orders[b]}",
                                "end_point_distance": writer.distance(ends[orders[a]], ends[orders[b]])})

    @staticmethod
    def aggregate(ctx: RunContext, results: list[dict], writer: NetworkSetWriter) -> dict:
        cfg, cc = ctx.cfg, ctx.cfg.compose
        assert ctx.out is not None
        per_order: dict[str, dict[str, Any]] = {}
        for order in cc.orders:
            sel = [r for r in results if r["order"] == order]
            per_order[order] = {k: float(np.mean([r[k] for r in sel]))
                                for k in ("accuracy", "task_accuracy_mean", "sparsity", "distance_to_w0", "graph_length")}
            per_order[order]["end_nodes"] = [r["end_node"] for r in sel]
        pairs: dict[str, list[float]] = {r["order"]: [] for r in results if "end_point_distance" in r}
        for r in results:
            if "end_point_distance" in r:
                pairs[r["order"]].append(r["end_point_distance"])
        return {"operation": "compose", "orders": per_order, "target": cc.target, "seeds": list(cfg.seeds),
                "end_point_distance": {k: float(np.mean(v)) for k, v in pairs.items()},
                "num_nodes": len(writer.nodes), "num_edges": len(writer.edges), "set": str(ctx.out / "set"),
                "step": cfg.path.step}

    @staticmethod
    def report(ctx: RunContext, summary: dict, writer: NetworkSetWriter, results: list[dict],
               path_rows: list[dict]) -> None:
        cfg, out = ctx.cfg, ctx.out
        assert out is not None
        _plot_graph(writer, out / "graph.png")
        per_order, end_distance = summary["orders"], summary["end_point_distance"]
        table = [[o, v["accuracy"], v["sparsity"], v["distance_to_w0"], v["graph_length"]] for o, v in per_order.items()]
        md = "\n".join([
            f"# Composed operations: {cfg.model.name} on {cfg.data.name}", "",
            f"Base network trained on task 0 of {cfg.continual.num_tasks} (class-incremental, "
            f"{cfg.continual.memory_per_task} memories per task); sparsify target {cfg.compose.target:g}; step "
            f"`{cfg.path.step}`; seeds {list(cfg.seeds)} (means). Accuracy: all test inputs, argmax over all classes.", "",
            report.md_table(["order", "accuracy", "sparsity", "‖w_end − w0‖", "graph length"], table), "",
            "End-point distances: " + "; ".join(f"{k}: {v:.4f}" for k, v in end_distance.items()), "",
            f"Network set: `set/` ({summary['num_nodes']} nodes, {summary['num_edges']} edges; query it with "
            "`fipray query --set`). Plot: `graph.png`. Tables: `results.parquet`, `path.parquet`.", ""])
        write_outputs(out, cfg, summary, {"results": results, "path": path_rows}, md)

    def brief(self, summary: dict) -> dict:
        return {"end_point_distance": summary["end_point_distance"],
                **{o: {"accuracy": round(v["accuracy"], 4), "sparsity": round(v["sparsity"], 4)}
                   for o, v in summary["orders"].items()}}


def _end_row(writer: NetworkSetWriter, seed: int, order: str, root: str, end: str, path_rows: list[dict]) -> dict:
    """The result row of one order's end node: its metrics, distance to w0, graph length, mean drift."""
    end_row = next(n for n in writer.nodes if n["node"] == end)
    geo = path_summary([r for r in path_rows if r["seed"] == seed and r["order"] == order])
    return {"seed": seed, "order": order, "end_node": end,
            "accuracy": end_row["accuracy"], "task_accuracy_mean": end_row["task_accuracy_mean"],
            "sparsity": end_row["sparsity"], "distance_to_w0": writer.distance(root, end),
            "graph_length": sum(e["weight_distance"] for e in writer.edges
                                if e["dst"].startswith(f"s{seed}-{_slug(order)}-")),
            "heldout_distance_mean": geo.get("heldout_distance_mean", float("nan"))}


def _principal_plane(writer: NetworkSetWriter, ids: list[str]) -> np.ndarray:
    """(K, 2) coordinates of the nodes in the plane of their first two principal components.

    From the K×K Gram matrix of the weights (read back two nodes at a time), so memory stays two
    networks: centred Gram = U Λ Uᵀ gives the same coordinates U √Λ as the SVD of the centred weights.
    """
    k = len(ids)
    if k < 2:
        return np.zeros((k, 2))
    gram = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        wi = writer.weights(ids[i])
        for j in range(i + 1):
            wj = writer.weights(ids[j])
            gram[i, j] = gram[j, i] = sum(float((v.double() * wj[n].double()).sum())
                                          for n, v in wi.items() if v.is_floating_point())
    h = torch.eye(k, dtype=torch.float64) - 1.0 / k
    vals, vecs = torch.linalg.eigh(h @ gram @ h)  # ascending
    top = vals.flip(0)[:2].clamp_min(0).sqrt()
    return (vecs.flip(1)[:, :2] * top).numpy()


def _plot_graph(writer: NetworkSetWriter, path: Path) -> None:
    """The set in the plane of its first two principal components, edges drawn, coloured by order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [n["node"] for n in writer.nodes]
    xy = _principal_plane(writer, ids)
    pos = {i: xy[j] for j, i in enumerate(ids)}
    fig, ax = plt.subplots(figsize=(6, 5))
    for e in writer.edges:
        a, b = pos[e["src"]], pos[e["dst"]]
        ax.plot([a[0], b[0]], [a[1], b[1]], color="gray", lw=0.6, zorder=1)
    orders = sorted({n["order"] for n in writer.nodes})
    for o in orders:
        sel = [j for j, n in enumerate(writer.nodes) if n["order"] == o]
        ax.scatter(xy[sel, 0], xy[sel, 1], s=18, label=o or "w0 (base)", zorder=2)
    ax.set_xlabel("PC 1 of the weights")
    ax.set_ylabel("PC 2")
    ax.set_title("Composed FIPs: one path-connected set")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
