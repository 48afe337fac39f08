"""The `sparsify` operation: sparsification along a FIP (paper Algorithm 2), ending exactly p-sparse.

Phase 1 follows S = λ·d(f(x; w), f(x; w0)) + β·‖w − project_p(w)‖², where project_p zeroes the
p fraction of smallest-magnitude counted weights (global over the counted tensors). Phase 2
applies the projection as a mask (the network is now exactly p-sparse) and runs a short masked
invariance phase back towards w0's outputs, re-applying the mask after every update.

Protocol (shared/PROTOCOLS.md): counted tensors are the Linear/Conv weights (head included unless
`sparsify.exclude_head`; `sparsify.include` narrows them by name, e.g. to a transformer's encoder
Linears), every final network is exactly p-sparse over them (masks applied),
accuracy vs sparsity over a sweep of p, against the baselines of `fipray.baselines.sparsify`
(fine-tuning ones take as many steps as the FIP path takes in all; wanda is one-shot on
`sparsify.calibration` training examples; `lth` runs open_lth's lottery-ticket levels once per seed from the
untrained network, `sparsify.lth`). Every result row carries its compute: optimizer steps and the examples
they took gradients on (`steps`, `examples`; the shared dense training is reported apart), and its sparsity
over the counted tensors and over every Linear/Conv weight (`sparsity_all`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fipray import report
from fipray.baselines.sparsify import (
    SEQUENTIAL_BASELINES,
    SPARSIFY_BASELINES,
    LotteryConfig,
    baseline_names,
    finetune_steps,
    finetune_train,
    imp_schedule,
)
from fipray.config import Config, ConfigError, knob
from fipray.core.masks import apply_masks, counted_tensors, magnitude_masks, projection_loss
from fipray.core.step import Anchor
from fipray.data.stream import Examples, TensorExamples
from fipray.eval.sparsity import counted_parameters, sparsity
from fipray.eval.split import EvalSplit
from fipray.operation import Operation, Report, collect_seeds, register_operation
from fipray.path import Phase, PhaseState, run_path
from fipray.phases import fip_phase, streamed_logits
from fipray.runtime import RunContext, clone, mean_std, path_summary, train_base, write_outputs


@dataclass(frozen=True)
class SparsifyConfig:
    """Path to the p-sparse submanifold (paper Algorithm 2), then a masked invariance phase."""

    targets: tuple[float, ...] = knob((0.5, 0.8, 0.9), gt=0, lt=1, nonempty=True)
    exclude_head: bool = False  # the classifier head counts unless this is set (PROTOCOLS.md)
    invariance_steps: int = knob(200, ge=0)
    baselines: tuple[str, ...] = knob(("magnitude", "magnitude_ft"), choices=baseline_names)
    # Glob patterns over parameter names selecting which Linear/Conv weights count, e.g.
    # ["model.bert.encoder.*"] (a HF BERT's encoder Linears, not pooler/head); empty = all of them.
    include: tuple[str, ...] = knob(())
    calibration: int = knob(128, gt=0)  # training examples whose activations wanda's scores use
    finetune_lr: float = knob(0.0, ge=0)  # magnitude_ft / imp fine-tuning learning rate (0: train.lr)
    lth: LotteryConfig = field(default_factory=LotteryConfig)  # the `lth` baseline (open_lth's protocol)
    # Flush denormal floats to zero on the CPU during a seed's run: the pruned weights FIP drives towards zero
    # with Adam, and their Adam moments, reach denormal range after ~1000 steps at p ≥ 0.98, where each CPU
    # operation on them is tens of times slower (a 1500-step path on MNIST ran 5-25x slower). Off by default:
    # flushing changes the last bits of runs that shipped without it.
    flush_denormal: bool = False

    def check(self, cfg: Config) -> None:
        if "lth" in self.baselines and not self.lth.prune_head and not self.exclude_head:
            raise ConfigError("config key 'sparsify.lth.prune_head': lth leaves the output layer unpruned "
                              "(open_lth); set sparsify.exclude_head: true so that every method counts the same "
                              "tensors, or sparsify.lth.prune_head: true to prune it")
        if "lth" in self.baselines and self.lth.prune_head and self.exclude_head:
            raise ConfigError("config key 'sparsify.lth.prune_head': true, but sparsify.exclude_head leaves the "
                              "head out of the counted tensors that every method prunes")


def counted(model: nn.Module, exclude_head: bool = False, include: tuple[str, ...] = ()) -> list[str]:
    """Names of the tensors that count towards sparsity (Linear/Conv weights, head unless excluded,
    only those matching a pattern of `include` when given).

    Raises:
        ConfigError: a pattern of `include` (`sparsify.include`) matches none of them.
    """
    if include and isinstance(model, nn.parallel.DistributedDataParallel):
        # Patterns are written for the model's own names; DDP prefixes them with "module.".
        return ["module." + n for n in counted(model.module, exclude_head, include)]
    try:
        names = counted_parameters(model, include_head=not exclude_head, include=include)
    except ValueError as e:
        if not include:
            raise
        raise ConfigError(f"config key 'sparsify.include': {e}") from None
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv weights to sparsify")
    return names


def fip_sparsify_phases(x_mem: Tensor | Examples, dense_anchor: Anchor | Tensor, p: float, cfg: Config, seed: int,
                        names: list[str], evaluate=None) -> list[Phase]:
    """The two phases for one target p, starting at the dense network w0.

    Args:
        x_mem: (M, ...) inputs on which outputs stay invariant (the training inputs), or streamed
            `Examples` of them.
        dense_anchor: w0's outputs on x_mem (both phases stay near the dense function): an Anchor, or
            with streamed `x_mem` the (M, C) logits.
        names: counted tensor names.
        evaluate: model -> dict merged into the final phase's results.
    """
    tag = f"{p:g}"

    def secondary(model: nn.Module, logits, x, y, state) -> Tensor:
        return projection_loss(counted_tensors(model, names), p)

    def project(model: nn.Module) -> PhaseState:
        masks = magnitude_masks(counted_tensors(model, names), p)
        apply_masks(counted_tensors(model, names), masks)
        return {"masks": masks}

    def remask(model: nn.Module, state: PhaseState) -> None:
        apply_masks(counted_tensors(model, names), state["masks"])

    def finish(model: nn.Module, state: PhaseState) -> dict:
        out = {"target": p, "sparsity": sparsity(model, names)}
        if evaluate is not None:
            out.update(evaluate(model))
        return out

    if isinstance(x_mem, Examples):
        assert isinstance(dense_anchor, Tensor)
        mem: dict[str, Any] = {"memory": x_mem, "memory_logits": dense_anchor}
    else:
        assert isinstance(dense_anchor, Anchor)
        fixed = dense_anchor
        mem = {"memory": lambda m: fixed}
    return [
        fip_phase(f"sparsify_{tag}", cfg.path, seed, secondary=secondary, **mem),
        fip_phase(f"mask_{tag}", cfg.path, seed, beta=0.0, lam=1.0,
                  steps=cfg.sparsify.invariance_steps, prepare_extra=project, after_step=remask,
                  finish=finish, **mem),
    ]


@register_operation
class Sparsify(Operation):
    """FIP sparsification vs one-shot magnitude pruning, with and without masked fine-tuning, IMP and Wanda."""

    name = "sparsify"
    help = "run the sparsify experiment (FIP vs magnitude pruning baselines over seeds)"
    section = SparsifyConfig
    metrics = ("accuracy", "sparsity")
    smoke = ("seeds=[0]", "train.steps=40", "path.steps=30", "sparsify.invariance_steps=10",
             "path.record_every=10", "path.checkpoint_every=20", "sparsify.lth.steps_per_level=5")
    supports_paths = True

    # The experiment -------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> dict:
        cfg, sc = ctx.cfg, ctx.cfg.sparsify
        methods = ["fip", *sc.baselines]
        per_p = cfg.path.steps + sc.invariance_steps + finetune_steps(cfg) * len({"magnitude_ft", "imp"} & set(methods))
        rows = collect_seeds(ctx, len(cfg.seeds) * (cfg.train.steps + len(sc.targets) * per_p), self.name,
                             ("results", "path", "dense", "geometry", "names"),
                             lambda seed: self.run_seed(ctx, seed, methods))
        summary = self.aggregate(cfg, methods, rows)
        self.report(ctx, summary, methods, rows)
        return summary

    def run_seed(self, ctx: RunContext, seed: int, methods: list[str]) -> dict[str, list]:
        """Base network, then every method to every target from it."""
        with _flush_denormal(ctx.cfg.sparsify.flush_denormal):
            return self._run_seed(ctx, seed, methods)

    def _run_seed(self, ctx: RunContext, seed: int, methods: list[str]) -> dict[str, list]:
        cfg, sc = ctx.cfg, ctx.cfg.sparsify
        data, test = ctx.train_data(), ctx.test_split()
        # In memory: tensors (the fast path); streamed: the Examples, w0's logits kept for every item.
        xtr, ytr = (data.x, data.y) if isinstance(data, TensorExamples) else (data, None)
        base = ctx.model(seed)
        names = counted(base, sc.exclude_head, sc.include)  # before training: a bad include fails at once
        every = counted_parameters(base)  # every Linear/Conv weight: the sparsity over all of them is reported too
        init = clone(base)  # w_init, where the sequential baselines (lth) start
        t0 = time.perf_counter()
        train_base(base, xtr, ytr, cfg, seed, progress=ctx.bar, out_dir=ctx.base_dir(seed))
        base_seconds = time.perf_counter() - t0
        dense = test.accuracy(base)
        anchor = Anchor.from_model(base, xtr) if ytr is not None else streamed_logits(base, data)
        out: dict[str, list] = {"results": [], "path": [], "dense": [dense], "geometry": [], "names": [names]}
        evaluate = _evaluator(test, names)
        sequential = {}  # method -> {target: row}: one run per seed passes every target
        for method in methods:
            if method in SEQUENTIAL_BASELINES:
                rows = SEQUENTIAL_BASELINES.get(method)(
                    clone(init), names, sc.targets, xtr, ytr, cfg, seed,
                    evaluate=lambda m: {**evaluate(m), "sparsity_all": sparsity(m, every)},
                    out_dir=ctx.checkpoint_dir(f"seed{seed}", method), progress=ctx.bar)
                sequential[method] = {r["target"]: r for r in rows}
        for p in sc.targets:
            for method in methods:
                if method in sequential:
                    r = sequential[method][p]
                    out["results"].append({"method": method, "seed": seed, "target": p, "sparsity": r["sparsity"],
                                           "accuracy": r["accuracy"], "dense_accuracy": sequential[method][0.0][
                                               "accuracy"], "seconds": r["seconds"], "steps": r["steps"],
                                           "examples": r["examples"], "sparsity_all": r["sparsity_all"],
                                           "level": r["level"]})
                    continue
                model = clone(base)
                t0 = time.perf_counter()
                if method == "fip":
                    res = run_path(model, fip_sparsify_phases(xtr, anchor, p, cfg, seed, names),
                                   out_dir=ctx.checkpoint_dir(f"seed{seed}", f"p{p:g}"),
                                   **ctx.path_kwargs(test.head(cfg.path.heldout)[0], _evaluator(test, names)))
                    out["path"] += [{"seed": seed, "target": p, **r} for r in res.records]
                    out["geometry"].append((f"{p:g}", path_summary(res.records)))
                else:
                    SPARSIFY_BASELINES.get(method)(model, names, p, xtr, ytr, cfg, seed, progress=ctx.bar)
                steps, examples = _compute(cfg, method, p, len(xtr))
                out["results"].append({"method": method, "seed": seed, "target": p,
                                       "sparsity": sparsity(model, names), "accuracy": test.accuracy(model),
                                       "dense_accuracy": dense, "seconds": time.perf_counter() - t0 + base_seconds,
                                       "steps": steps, "examples": examples, "sparsity_all": sparsity(model, every),
                                       "level": None})
        return out

    @staticmethod
    def aggregate(cfg: Config, methods: list[str], rows: dict[str, list]) -> dict:
        sc, results = cfg.sparsify, rows["results"]
        per_method: dict = {}
        for m in methods:
            per_method[m] = {}
            for p in sc.targets:
                sel = [r for r in results if r["method"] == m and r["target"] == p]
                acc = mean_std([r["accuracy"] for r in sel])
                per_method[m][f"{p:g}"] = {
                    "accuracy_mean": acc[0], "accuracy_std": acc[1],
                    "sparsity": min(r["sparsity"] for r in sel), "sparsity_max": max(r["sparsity"] for r in sel),
                    "sparsity_all": min(r["sparsity_all"] for r in sel),
                    "seconds": sum(r["seconds"] for r in sel) / len(sel),
                    "steps": max(r["steps"] for r in sel), "examples": max(r["examples"] for r in sel)}
                if sel[0]["level"] is not None:
                    per_method[m][f"{p:g}"]["level"] = sel[0]["level"]
        geometry: dict[str, list[dict]] = {}
        for p, g in rows["geometry"]:
            geometry.setdefault(p, []).append(g)
        dense = mean_std(rows["dense"])
        return {"operation": "sparsify", "dense_accuracy": dense[0], "dense_accuracy_std": dense[1],
                "seeds": list(cfg.seeds), "counted": rows["names"][-1], "exclude_head": sc.exclude_head,
                "dense_steps": cfg.train.steps, "dense_examples": cfg.train.steps * cfg.train.batch_size,
                "include": list(sc.include),
                "targets": [f"{p:g}" for p in sc.targets], "methods": per_method,
                "fip_path": {p: {k: float(sum(g[k] for g in v) / len(v)) for k in v[0]} for p, v in geometry.items()}}

    @staticmethod
    def report(ctx: RunContext, summary: dict, methods: list[str], rows: dict[str, list]) -> None:
        cfg, out, sc = ctx.cfg, ctx.out, ctx.cfg.sparsify
        assert out is not None
        per_method = summary["methods"]
        wanda_note = (f" wanda is one-shot (no fine-tuning): |w|·‖x‖ per output row, input norms over "
                      f"{sc.calibration} training examples." if "wanda" in methods else "")
        # Remaining weights on a log axis: 0.9 and 0.99 sparse are as far apart as 0 and 0.9.
        series = {m: ([1 - v["sparsity"] for v in per_method[m].values()],
                      [v["accuracy_mean"] for v in per_method[m].values()]) for m in methods}
        report.plot_lines(series, "counted weights remaining (1 − sparsity, log scale)", "test accuracy",
                          f"Accuracy vs sparsity ({cfg.model.name} on {cfg.data.name})", out / "accuracy_vs_sparsity.png",
                          xscale="log")
        table = [[m, p, v.get("level", ""), f"{v['sparsity']:.6f}", f"{v['sparsity_all']:.6f}",
                  f"{v['accuracy_mean']:.4f} ± {v['accuracy_std']:.4f}", v["steps"], v["examples"],
                  f"{v['seconds']:.1f}"] for m in methods for p, v in per_method[m].items()]
        lth = sc.lth
        lth_note = (f" lth: open_lth's lottery tickets, one run per seed from the untrained network: levels of "
                    f"{lth.epochs_per_level} epoch(s) ({lth.optimizer} lr {lth.lr:g}, batch {lth.batch_size}), "
                    f"{lth.rate:g} of the remaining counted weights pruned a level by global magnitude (a level "
                    f"that would pass a target lands on it), survivors reset to "
                    f"{'the weights after ' + str(lth.rewind_steps) + ' steps' if lth.rewind_steps else 'init'}; "
                    f"its steps, examples and seconds are those from w_init to the level of each target, its own "
                    f"dense training included." if "lth" in methods else "")
        md = "\n".join([
            f"# Sparsification: {cfg.model.name} on {cfg.data.name}", "",
            f"Dense accuracy {summary['dense_accuracy']:.4f}; seeds {list(cfg.seeds)} (mean ± std). Counted tensors "
            f"({'head excluded' if sc.exclude_head else 'head included'}"
            f"{'; include ' + ', '.join(sc.include) if sc.include else ''}): {', '.join(summary['counted'])}. "
            f"magnitude_ft and imp fine-tune {finetune_steps(cfg)} steps in all (= FIP path + invariance phase) at "
            f"learning rate {finetune_train(cfg).lr:g}; "
            f"imp prunes 20% of the remaining weights per round."
            f"{wanda_note}{lth_note}", "",
            f"Compute: `steps` are optimizer steps, `examples` the examples they took gradients on, `seconds` the "
            f"mean wall time per seed; for the per-target methods these start at the trained dense network, whose "
            f"training ({summary['dense_steps']} steps of {cfg.train.batch_size}) every one of them shares and "
            f"whose seconds are included. `sparsity` is over the counted tensors, `all` over every Linear/Conv "
            f"weight.", "",
            report.md_table(["method", "target", "level", "sparsity", "all", "accuracy", "steps", "examples",
                             "seconds"], table), "",
            "Plot: `accuracy_vs_sparsity.png`. Tables: `results.parquet`, `path.parquet`.", ""])
        write_outputs(out, cfg, summary, {"results": rows["results"], "path": rows["path"]}, md)

    def brief(self, summary: dict) -> dict:
        return {m: {p: round(v["accuracy_mean"], 4) for p, v in d.items()} for m, d in summary["methods"].items()}

    # FIP paths: the two phases to the largest target ----------------------------------------------------
    def path(self, ctx: RunContext, model: nn.Module, seed: int, *, rank: int = 0,
             world: int = 1) -> tuple[list[Phase], dict]:
        cfg = ctx.cfg
        names = counted(model, cfg.sparsify.exclude_head, cfg.sparsify.include)  # as the (wrapped) model has them
        p = max(cfg.sparsify.targets)
        if cfg.data.stream:  # streamed memory: w0's logits on every item, inputs read per memory batch
            ctx.rank_shard(rank=rank, world=world)  # DDP ranks cannot split streamed data: the one ConfigError
            phases = fip_sparsify_phases(ctx.train_data(), streamed_logits(model, ctx.train_data()), p, cfg, seed,
                                         names)
        else:
            (xs,) = ctx.rank_shard(ctx.train_tensors()[0], rank=rank, world=world)
            phases = fip_sparsify_phases(xs, Anchor.from_model(model, xs), p, cfg, seed, names)
        test = ctx.test_split()
        return phases, {"heldout": test.head(cfg.path.heldout)[0], "evaluate": _evaluator(test, names)}

    def path_steps(self, cfg: Config) -> int:
        return cfg.path.steps + cfg.sparsify.invariance_steps

    # Sweep trials: an iteration per seed, metrics at `target` (default the largest target) --------------
    def trial_methods(self, cfg: Config) -> tuple[str, ...]:
        """FIP and the baselines with a knob to tune: the fine-tuning ones (`sparsify.finetune_lr`) and lth
        (`sparsify.lth`); magnitude and wanda have no rate (wanda's `calibration` is a count of examples)."""
        return ("fip", "magnitude_ft", "imp", "lth")

    def trial(self, ctx: RunContext, report: Report, *, target: float = 0.0, method: str = "fip",
              **options: Any) -> None:
        """`method` to `target` for each seed, exactly as the experiment runs it (`_run_seed`): FIP and the
        per-target baselines from the trained dense network, lth's levels from the untrained one (the targets
        up to `target`: the same levels as the experiment's run). Reports the running means of the accuracy
        and sparsity (over the counted tensors) of the network at `target`."""
        cfg, sc = ctx.cfg, ctx.cfg.sparsify
        if method == "lth":
            SparsifyConfig.check(replace(sc, baselines=("lth",)), cfg)
        (xtr, ytr), test = ctx.train_tensors(), ctx.test_split()
        p = target or max(sc.targets)
        accs, sps = [], []
        for seed in cfg.seeds:
            base = ctx.model(seed)
            names = counted(base, sc.exclude_head, sc.include)
            with _flush_denormal(sc.flush_denormal):
                if method in SEQUENTIAL_BASELINES:
                    targets = sorted({*(t for t in sc.targets if t < p), p})
                    rows = SEQUENTIAL_BASELINES.get(method)(base, names, targets, xtr, ytr, cfg, seed,
                                                            evaluate=_evaluator(test, names))
                    acc, sp = next((r["accuracy"], r["sparsity"]) for r in rows if r["target"] == p)
                else:
                    train_base(base, xtr, ytr, cfg, seed)
                    model = clone(base)
                    if method == "fip":
                        run_path(model, fip_sparsify_phases(xtr, Anchor.from_model(base, xtr), p, cfg, seed, names),
                                 record_every=10**9, checkpoint_every=10**9)
                    else:
                        SPARSIFY_BASELINES.get(method)(model, names, p, xtr, ytr, cfg, seed)
                    acc, sp = test.accuracy(model), sparsity(model, names)
            accs.append(acc)
            sps.append(sp)
            report({"accuracy": float(np.mean(accs)), "sparsity": float(np.mean(sps)), "seed": seed})


@contextlib.contextmanager
def _flush_denormal(on: bool) -> Iterator[None]:
    """torch's (process-wide) flush-denormal mode on while inside, back to torch's default (off) after."""
    if not on:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _compute(cfg: Config, method: str, p: float, n: int) -> tuple[int, int]:
    """(optimizer steps, examples they took gradients on) of a per-target method from the trained dense
    network w0 (w0's own training is reported apart): FIP's steps each take the gradient on a memory batch
    (the projection term needs no data), the fine-tuning baselines' on a training batch."""
    if method == "fip":
        steps = cfg.path.steps + cfg.sparsify.invariance_steps
        return steps, steps * min(cfg.path.memory_batch_size or n, n)
    if method == "imp":
        rounds = len(imp_schedule(p))
        steps = max(1, finetune_steps(cfg) // rounds) * rounds
        return steps, steps * min(cfg.train.batch_size, n)
    if method == "magnitude_ft":
        return finetune_steps(cfg), finetune_steps(cfg) * min(cfg.train.batch_size, n)
    return 0, 0  # one-shot: magnitude, wanda (wanda's calibration is forward passes only)


def _evaluator(test: EvalSplit, names: list[str]) -> Any:
    return lambda m: {"accuracy": test.accuracy(m), "sparsity": sparsity(m, names)}
