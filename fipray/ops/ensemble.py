"""The `ensemble` operation (alias `undirected`): undirected FIPs and robust ensembles (paper Algorithm 3).

With L = 0 the path objective S = λ·d(f(x; w), f(x; w0)) has zero gradient at w0, so plain
gradient descent would not move. We drive the walk with a small random kick each step
(Gaussian, scaled by each tensor's RMS) and let the invariance gradient pull the outputs back:
components of the kick along directions that change the function are undone, components in the
(near-)null space of the metric g accumulate, so the weights travel while the outputs stay put.
Optionally β weights a diversity objective: the cosine similarity between the input-gradient
of the network's loss and that of w0 (the "coherence" the paper links to robustness).

Networks are sampled every k steps; `select_members` keeps the N samples whose outputs move
least under an FGSM perturbation of the inputs (the δ rule).

Protocol (shared/PROTOCOLS.md), against the baselines of `fipray.baselines.ensemble` (a deep ensemble,
the base network): inputs in [0, 1]; ensembles are attacked through their log(mean softmax) head with
members in eval mode; white-box PGD (≥ 20 steps, random start) on the deployed ensemble itself and
transfer from the base network w0; an ε curve; sanity flags; each member's own accuracy; diversity and
coherence; the compute each ensemble cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray import report
from fipray._batches import mix_seed
from fipray.config import Config, ConfigError, knob
from fipray.core.distances import get_distance
from fipray.ensemble import Ensemble, save_ensemble
from fipray.eval.diversity import coherence, pairwise_disagreement, representation_diversity
from fipray.eval.robustness import robustness_curve, sanity_flags
from fipray.operation import Operation, Report, collect_seeds, register_operation
from fipray.path import Phase, PhaseState, run_path
from fipray.phases import fip_phase
from fipray.runtime import RunContext, accuracy, clone, mean_std, path_summary, train_base, write_outputs


def _baselines() -> list[str]:
    from fipray.baselines.ensemble import ENSEMBLE_BASELINES

    return ENSEMBLE_BASELINES.names()


@dataclass(frozen=True)
class EnsembleConfig:
    """Undirected path (L = 0) and member selection (paper Algorithm 3)."""

    members: int = knob(10, gt=0)
    sample_every: int = knob(20, gt=0)
    fgsm_eps: float = knob(0.1, ge=0)
    delta: float = knob(0.0, ge=0)  # 0: keep the `members` candidates whose outputs move least
    noise: float = knob(0.02, ge=0)  # per-step random kick, relative to each tensor's RMS (drives the L = 0 walk)
    diversity: bool = False  # add beta * input-gradient coherence with w0 to the path objective
    eps: tuple[float, ...] = knob((0.05, 0.1, 0.2, 0.3), ge=0, nonempty=True)
    pgd_steps: int = knob(20, gt=0)
    eval_examples: int = knob(300, gt=0)
    autoattack: bool = False  # also run torchattacks' AutoAttack on each deployed model (slow)
    load: str = ""  # an ensemble folder (e.g. `fipray paths`' ensemble/) whose networks replace the walk's samples
    baselines: tuple[str, ...] = knob(("deep", "base"), choices=_baselines)


def input_gradient(logits_fn, x: Tensor, y: Tensor, create_graph: bool = False) -> Tensor:
    """∇_x CE(f(x), y), (B, *input_shape)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(logits_fn(x), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return g


def _kick(noise: float, seed: int):
    def before_step(model: nn.Module, t: int) -> None:
        if noise <= 0:
            return
        dev = next(model.parameters()).device
        g = torch.Generator(device=dev).manual_seed(mix_seed(seed, 6, t))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    rms = p.pow(2).mean().sqrt().clamp_min(1e-8)
                    p.add_(torch.randn(p.shape, generator=g, device=dev, dtype=p.dtype) * (noise * rms))

    return before_step


def undirected_phase(x_mem: Any, y_mem: Tensor | None, cfg: Config, seed: int, name: str = "undirected") -> Phase:
    """The L = 0 walk from the network at the phase start, sampling every `ensemble.sample_every` steps.

    `x_mem, y_mem` are tensors, or `x_mem` is `Examples` (e.g. streamed) and `y_mem` None.
    """
    ec = cfg.ensemble
    secondary = prepare_extra = None
    if ec.diversity:
        def prepare_extra(model: nn.Module) -> PhaseState:
            # w0 lives in the phase state, so a resumed walk measures coherence to the same w0.
            return {"w0": {k: v.detach().clone() for k, v in model.state_dict().items()}}

        def secondary(model: nn.Module, logits: Tensor | None, x: Tensor | None, y: Tensor | None,
                      state: PhaseState) -> Tensor:
            assert x is not None and y is not None  # the diversity phase samples new data
            g0 = input_gradient(lambda z: torch.func.functional_call(model, state["w0"], (z,)), x, y)
            g = input_gradient(model, x, y, create_graph=True)
            return F.cosine_similarity(g.flatten(1), g0.detach().flatten(1), dim=1, eps=1e-12).mean()

    return fip_phase(name, cfg.path, seed, memory=x_mem, secondary=secondary,
                     new_data=(x_mem if y_mem is None else (x_mem, y_mem)) if ec.diversity else None,
                     before_step=_kick(ec.noise, seed), sample_every=ec.sample_every,
                     prepare_extra=prepare_extra)


def fgsm_output_shift(model: nn.Module, x: Tensor, y: Tensor, eps: float, distance: str) -> float:
    """H = d(f(x; w), f(x'; w)) with x' = clip(x + ε·sign ∇_x CE) (Algorithm 3, line 10)."""
    was = model.training
    model.eval()
    g = input_gradient(model, x, y)
    x_adv = (x + eps * g.sign()).clamp(0, 1)
    with torch.no_grad():
        h = float(get_distance(distance)(model(x_adv), model(x)))
    model.train(was)
    return h


def select_members(candidates: list[nn.Module], x: Tensor, y: Tensor, *, members: int, eps: float,
                   delta: float, distance: str) -> tuple[list[int], list[float]]:
    """Indices of the kept candidates (δ rule) and every candidate's H.

    δ > 0 keeps candidates with H ≤ δ (lowest H first, at most `members`); δ = 0 keeps the
    `members` candidates with the lowest H. Raises if fewer than `members` qualify.
    """
    h = [fgsm_output_shift(m, x, y, eps, distance) for m in candidates]
    order = sorted(range(len(h)), key=lambda i: h[i])
    if delta > 0:
        order = [i for i in order if h[i] <= delta]
    if len(order) < members:
        raise ValueError(
            f"only {len(order)} of {len(candidates)} sampled networks qualify (δ = {delta}); "
            f"need ensemble.members = {members}: raise ensemble.delta, path.steps or lower sample_every"
        )
    return sorted(order[:members]), h


def check_samples(cfg: Config) -> None:
    """The walk must sample at least `members` networks."""
    ec = cfg.ensemble
    if not ec.load and cfg.path.steps // ec.sample_every < ec.members:
        raise ConfigError(f"path.steps // ensemble.sample_every = {cfg.path.steps // ec.sample_every} sampled "
                          f"networks < ensemble.members = {ec.members}")


def selection_inputs(data: Any) -> tuple[Tensor, Tensor]:
    """The 256 training examples (fixed, seed 0) on which the δ rule measures FGSM output shifts."""
    return data.take(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:256])


def walk(ctx: RunContext, base: nn.Module, seed: int, *, out_dir: Any = None, **path_kwargs: Any) -> Any:
    """The undirected walk from `base`; returns (PathResult, candidate networks in eval mode)."""
    res = run_path(clone(base), [undirected_phase(ctx.train_data(), None, ctx.cfg, seed)], out_dir=out_dir,
                   **path_kwargs)
    candidates = []
    for i in range(len(res.samples)):
        m = clone(base)
        m.load_state_dict(res.sample_state(i))
        candidates.append(m.eval())
    return res, candidates


def select(ctx: RunContext, candidates: list[nn.Module]) -> tuple[list[int], list[float]]:
    """The δ rule on the fixed selection inputs (a ConfigError when too few candidates qualify)."""
    ec = ctx.cfg.ensemble
    xs, ys = selection_inputs(ctx.train_data())
    try:
        return select_members(candidates, xs, ys, members=ec.members, eps=ec.fgsm_eps, delta=ec.delta,
                              distance=ctx.cfg.path.distance)
    except ValueError as e:
        raise ConfigError(f"config key 'ensemble.delta': {e}") from None


def loaded_candidates(directory: str, spec: dict, dev: torch.device) -> tuple[list[nn.Module], list, list, int]:
    """Networks of an ensemble folder as FIP candidates (e.g. the union of `fipray paths`' samples)."""
    from fipray.ensemble import load_ensemble, read_ensemble_meta

    try:
        meta = read_ensemble_meta(directory)
        loaded = load_ensemble(directory, device=dev)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'ensemble.load': {e}") from None
    theirs = {k: meta["model_spec"][k] for k in ("name", "num_classes", "input_shape")}
    ours = {k: spec[k] for k in ("name", "num_classes", "input_shape")}
    if {**theirs, "input_shape": list(theirs["input_shape"])} != ours:
        raise ConfigError(f"config key 'ensemble.load': {directory} holds {theirs}, the config builds {ours}")
    md = meta.get("metadata", {})
    n = len(loaded.members)
    steps = list(md.get("steps") or [0] * n)
    paths = list(md.get("path_ids") or [0] * n)
    return [m.eval() for m in loaded.members], steps, paths, int(max(steps, default=0))


@dataclass
class Deployed:
    """A model to evaluate (an ensemble or one network), its members and what it cost."""

    target: nn.Module
    members: list[nn.Module]
    seconds: float
    gradient_steps: int


def evaluate_deployed(ctx: RunContext, name: str, d: Deployed, base: nn.Module, seed: int) -> tuple[dict, list, dict]:
    """Robustness curve, members' own white-box accuracy, sanity flags, diversity: (row, curve rows, flags)."""
    ec = ctx.cfg.ensemble
    xte, yte = ctx.test_tensors()
    x_eval, y_eval = xte[: ec.eval_examples], yte[: ec.eval_examples]
    curve = robustness_curve(d.target, x_eval, y_eval, list(ec.eps), surrogate=base, steps=ec.pgd_steps, seed=seed,
                             autoattack=ec.autoattack)
    # Each member's own white-box accuracy (PROTOCOLS.md) on the first 100 examples: K extra
    # attacks per ε would otherwise cost more than attacking the ensemble itself.
    member_wb = {e: float(np.mean([r["whitebox"] for m in d.members for r in robustness_curve(
        m, x_eval[:100], y_eval[:100], [e], steps=ec.pgd_steps, seed=seed)])) for e in ec.eps}
    # The steps comparison (PGD at 10 and 40 steps) runs on the first 100 examples: it
    # checks the attack, not the model, and 40-step PGD on an ensemble is the costliest call.
    flags = sanity_flags(curve, target=d.target, x=x_eval[:100], y=y_eval[:100], eps=max(ec.eps))
    many = len(d.members) > 1
    div = representation_diversity(d.members, x_eval) if many else {"mean": 0.0}
    member_clean = [accuracy(m, xte, yte) for m in d.members]
    row = {"method": name, "seed": seed, "clean": curve[0]["clean"],  # clean accuracy on x_eval
           "clean_full_test": accuracy(d.target, xte, yte),
           "member_clean_mean": float(np.mean(member_clean)), "member_clean_min": float(np.min(member_clean)),
           "base_clean": accuracy(base, xte, yte), "diversity": float(div["mean"]),
           "coherence": coherence(d.members, base, x_eval, y_eval),
           "disagreement": pairwise_disagreement(d.members, x_eval) if many else 0.0,
           "seconds": d.seconds, "gradient_steps": d.gradient_steps, "members": len(d.members),
           **{f"member_whitebox_{e:g}": v for e, v in member_wb.items()}}
    return row, [{"method": name, "seed": seed, **r} for r in curve], flags


@register_operation
class RobustEnsemble(Operation):
    """FIP robust ensembles vs a deep ensemble of independently trained networks and the base network."""

    name = "ensemble"
    aliases = ("undirected",)
    help = "run the ensemble experiment (FIP ensemble vs deep ensemble vs base, PGD robustness)"
    section = EnsembleConfig
    metrics = ("whitebox", "clean", "transfer")
    smoke = ("seeds=[0]", "train.steps=40", "path.steps=40", "ensemble.members=2", "ensemble.sample_every=20",
             "ensemble.pgd_steps=2", "ensemble.eval_examples=50", "path.record_every=20", "path.checkpoint_every=20")
    cli_options = (("--ensemble", "ensemble.load", "evaluate the networks of this ensemble folder (e.g. `fipray "
                    "paths`' ensemble/) as the FIP candidates instead of walking a new path"),)
    supports_paths = True

    # The experiment -------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> dict:
        cfg, ec = ctx.cfg, ctx.cfg.ensemble
        methods = ["fip", *ec.baselines]
        check_samples(cfg)
        n_train = 1 + (ec.members if "deep" in methods else 0)
        rows = collect_seeds(ctx, len(cfg.seeds) * (n_train * cfg.train.steps + cfg.path.steps), self.name,
                             ("results", "robustness", "path", "geometry", "sanity"),
                             lambda seed: self.run_seed(ctx, seed, methods))
        summary = self.aggregate(cfg, methods, rows, len(ctx.test_tensors()[0][: ec.eval_examples]))
        self.report(ctx, summary, rows)
        return summary

    def run_seed(self, ctx: RunContext, seed: int, methods: list[str]) -> dict[str, list]:
        from fipray.baselines.ensemble import ENSEMBLE_BASELINES

        cfg = ctx.cfg
        base = ctx.model(seed)
        t0 = time.perf_counter()
        train_base(base, ctx.train_data(), None, cfg, seed, progress=ctx.bar)
        base_seconds = time.perf_counter() - t0
        out: dict[str, list] = {"results": [], "robustness": [], "path": [], "geometry": [], "sanity": []}
        deployed = {"fip": self.fip_ensemble(ctx, base, seed, base_seconds, out)}
        for name in methods[1:]:
            deployed[name] = ENSEMBLE_BASELINES.get(name)(ctx, base, seed, base_seconds)
        for name, d in deployed.items():
            row, curve, flags = evaluate_deployed(ctx, name, d, base, seed)
            out["results"].append(row)
            out["robustness"] += curve
            out["sanity"].append((name, flags))
        return out

    def fip_ensemble(self, ctx: RunContext, base: nn.Module, seed: int, base_seconds: float,
                     out: dict[str, list]) -> Deployed:
        """Undirected walk from w0 (or networks loaded from a folder), then the δ rule picks the members."""
        cfg, ec = ctx.cfg, ctx.cfg.ensemble
        t0 = time.perf_counter()
        if ec.load:
            candidates, sample_steps, path_ids, walk_steps = loaded_candidates(ec.load, ctx.spec, ctx.device)
        else:
            xte, yte = ctx.test_tensors()
            res, candidates = walk(ctx, base, seed, out_dir=ctx.checkpoint_dir(f"seed{seed}"),
                                   **ctx.path_kwargs(xte[: cfg.path.heldout],
                                                     lambda m: {"accuracy": accuracy(m, xte, yte)}))
            out["path"] += [{"seed": seed, **r} for r in res.records]
            out["geometry"].append(path_summary(res.records))
            sample_steps = [s["global_step"] for s in res.samples]
            path_ids, walk_steps = [seed] * len(candidates), cfg.path.steps
        keep, h = select(ctx, candidates)
        members = [candidates[i] for i in keep]
        seconds = base_seconds + time.perf_counter() - t0
        if ctx.out is not None:
            save_ensemble(members, ctx.out / "ensembles" / f"fip_seed{seed}", model_spec=ctx.spec, metadata={
                "operation": self.name, "seed": seed, "config_hash": cfg.run_id(),
                "path_ids": [path_ids[i] for i in keep], "steps": [sample_steps[i] for i in keep],
                "fgsm_shift": [h[i] for i in keep], "candidates": len(candidates)})
        return Deployed(Ensemble(members), members, seconds, cfg.train.steps + walk_steps)

    @staticmethod
    def aggregate(cfg: Config, methods: list[str], rows: dict[str, list], eval_examples: int) -> dict:
        ec, results, curve_rows = cfg.ensemble, rows["results"], rows["robustness"]

        def curve_mean(method: str, col: str) -> dict:
            return {f"{e:g}": float(np.mean([r[col] for r in curve_rows if r["method"] == method and r["eps"] == e]))
                    for e in ec.eps}

        def ms(sel: list[dict], key: str) -> tuple[float, float]:
            return mean_std([r[key] for r in sel])

        per_method = {}
        for m in methods:
            sel = [r for r in results if r["method"] == m]
            per_method[m] = {
                "clean_mean": ms(sel, "clean")[0], "clean_std": ms(sel, "clean")[1],
                "clean_full_test_mean": ms(sel, "clean_full_test")[0],
                "member_clean_mean": ms(sel, "member_clean_mean")[0],
                "member_clean_min": min(r["member_clean_min"] for r in sel),
                "whitebox": curve_mean(m, "whitebox"), "transfer": curve_mean(m, "transfer"),
                "autoattack": curve_mean(m, "autoattack"),
                "member_whitebox": {f"{e:g}": float(np.mean([r[f"member_whitebox_{e:g}"] for r in sel]))
                                    for e in ec.eps},
                "diversity": ms(sel, "diversity")[0], "coherence": ms(sel, "coherence")[0],
                "disagreement": ms(sel, "disagreement")[0],
                "seconds": float(np.mean([r["seconds"] for r in sel])), "gradient_steps": sel[0]["gradient_steps"]}
        sanity: dict[str, list] = {}
        for name, flags in rows["sanity"]:
            sanity.setdefault(name, []).append(flags)
        geometry = rows["geometry"]
        return {"operation": "ensemble", "members": ec.members, "seeds": list(cfg.seeds),
                "eps": [f"{e:g}" for e in ec.eps], "pgd_steps": ec.pgd_steps,
                "eval_examples": eval_examples,
                "surrogate": "base network w0", "methods": per_method,
                "sanity": {m: {k: all(f["flags"][k] is not False for f in fl) for k in fl[0]["flags"]}
                           for m, fl in sanity.items()},
                "fip_path": {k: float(np.mean([g[k] for g in geometry])) for k in geometry[0]} if geometry else {},
                "loaded_from": ec.load or None,
                "sanity_measurements": {m: [f["measured"] for f in fl] for m, fl in sanity.items()}}

    @staticmethod
    def report(ctx: RunContext, summary: dict, rows: dict[str, list]) -> None:
        cfg, out, ec = ctx.cfg, ctx.out, ctx.cfg.ensemble
        assert out is not None
        eps_keys, per_method, sanity = summary["eps"], summary["methods"], summary["sanity"]
        report.plot_lines({f"{m} white-box": ([float(e) for e in eps_keys], list(v["whitebox"].values()))
                           for m, v in per_method.items()}
                          | {f"{m} transfer": ([float(e) for e in eps_keys], list(v["transfer"].values()))
                             for m, v in per_method.items() if m != "base"},
                          "ε (L∞)", "robust accuracy", "Robust accuracy vs ε (PGD)", out / "robust_accuracy.png")
        table = [[m, v["clean_mean"], v["member_clean_mean"]] + [v["whitebox"][e] for e in eps_keys]
                 + [v["transfer"][e] for e in eps_keys] + [v["coherence"], v["disagreement"], round(v["seconds"], 1)]
                 for m, v in per_method.items()]
        header = (["method", "clean", "member clean"] + [f"white-box ε={e}" for e in eps_keys]
                  + [f"transfer ε={e}" for e in eps_keys] + ["coherence", "disagreement", "seconds"])
        flag_rows = [[m] + [("ok" if v else "FAILED") for v in f.values()] for m, f in sanity.items()]
        md = "\n".join([
            f"# Robust ensembles: {cfg.model.name} on {cfg.data.name}, {ec.members} members", "",
            f"PGD with {ec.pgd_steps} steps and random start; white-box on each deployed model itself "
            f"(ensembles through log(mean softmax), members in eval mode); transfer crafted on the base network w0 "
            f"(so the base network's transfer equals its white-box). {summary['eval_examples']} test examples "
            f"(members' own white-box accuracy, `member_whitebox` in summary.json: the first 100), seeds "
            f"{list(cfg.seeds)} (means).", "",
            report.md_table(header, table), "", "## Sanity flags", "",
            report.md_table(["method"] + list(next(iter(sanity.values())).keys()), flag_rows), "",
            "Plot: `robust_accuracy.png`. Tables: `results.parquet`, `robustness.parquet`, `path.parquet`. "
            "FIP ensembles: `ensembles/fip_seed*/`.", ""])
        write_outputs(out, cfg, summary, {k: rows[k] for k in ("results", "robustness", "path")}, md)

    def brief(self, summary: dict) -> dict:
        return {m: round(v["clean_mean"], 4) for m, v in summary["methods"].items()}

    # FIP paths: the undirected walk, sampling every `ensemble.sample_every` steps ------------------------
    def path(self, ctx: RunContext, model: nn.Module, seed: int, *, rank: int = 0,
             world: int = 1) -> tuple[list[Phase], dict]:
        xte, yte = ctx.test_tensors()
        if world > 1:  # each DDP rank walks on its own shard of the (in-memory) training data
            if ctx.cfg.data.stream:
                raise ConfigError("ray.workers_per_path > 1 (DDP) shards in-memory data; data.stream: true is "
                                  "not supported there yet")
            xtr, ytr = ctx.train_tensors()
            phases = [undirected_phase(xtr[rank::world], ytr[rank::world], ctx.cfg, seed)]
        else:
            phases = [undirected_phase(ctx.train_data(), None, ctx.cfg, seed)]
        return phases, {"heldout": xte[: ctx.cfg.path.heldout], "evaluate": lambda m: {"accuracy": accuracy(m, xte, yte)}}

    # Sweep trials: an iteration per seed; white-box, transfer and clean accuracy at `eps` ---------------
    def check_sweep(self, cfg: Config) -> None:
        check_samples(cfg)

    def trial(self, ctx: RunContext, report: Report, *, eps: float = 0.0, **options: Any) -> None:
        cfg, ec = ctx.cfg, ctx.cfg.ensemble
        e = eps or max(ec.eps)
        xte, yte = ctx.test_tensors()
        x_eval, y_eval = xte[: ec.eval_examples], yte[: ec.eval_examples]
        got: dict[str, list[float]] = {"whitebox": [], "transfer": [], "clean": []}
        for seed in cfg.seeds:
            base = ctx.model(seed)
            train_base(base, ctx.train_data(), None, cfg, seed)
            _, candidates = walk(ctx, base, seed, record_every=10**9, checkpoint_every=10**9)
            keep, _h = select(ctx, candidates)
            curve = robustness_curve(Ensemble([candidates[i] for i in keep]), x_eval, y_eval, [e],
                                     surrogate=base.eval(), steps=ec.pgd_steps, seed=seed)
            for k in got:
                got[k].append(float(curve[0][k]))
            report({k: float(np.mean(v)) for k, v in got.items()} | {"seed": seed, "eps": e})
