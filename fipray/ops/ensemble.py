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
from fipray.config import Config, ConfigError, knob
from fipray.core.distances import get_distance
from fipray.data.batches import mix_seed
from fipray.ensemble import Ensemble, save_ensemble
from fipray.eval.diversity import (
    coherence,
    coherence_by_surrogate,
    member_coherence,
    pairwise_disagreement,
    representation_diversity,
)
from fipray.eval.predict import accuracy
from fipray.eval.robustness import craft_transfer, robustness_curve, sanity_flags, transfer_matrix
from fipray.operation import Operation, Report, collect_seeds, register_operation
from fipray.path import Phase, PhaseState, run_path
from fipray.phases import fip_phase
from fipray.registry import Registry
from fipray.runtime import RunContext, clone, mean_std, path_summary, train_base, write_outputs


def _baselines() -> list[str]:
    from fipray.baselines.ensemble import ENSEMBLE_BASELINES

    return ENSEMBLE_BASELINES.names()


# How the FIP ensemble is built: `(ctx, base, seed, base_seconds, out) -> Deployed`. "undirected" is the walk
# below; other operations add theirs (`fipray.ops.robust` registers "robust": FIP with an adversarial L).
FIP_ENSEMBLES: Registry = Registry("FIP ensemble method")


def _fip_methods() -> list[str]:
    return FIP_ENSEMBLES.names()


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
    fip: str = knob("undirected", choices=_fip_methods)  # the FIP that builds the ensemble (results name: fip[_<name>])
    restarts: int = knob(1, ge=1)  # white-box PGD random starts; an example counts only if it survives all
    autoattack_examples: int = knob(0, ge=0)  # AutoAttack on the first this many evaluation examples (0: all)
    autoattack_version: str = knob("standard", choices=("standard", "apgd"))  # apgd: APGD-CE + APGD-T only
    # The review tables: transfer from an independently trained ensemble of `members` networks (beside w0),
    # coherence against each surrogate, per-layer diversity, the member transfer matrix at `focus_eps`,
    # gradient evaluations per method and the robust-accuracy-vs-compute plot.
    review: bool = False
    focus_eps: float = knob(0.1, gt=0)  # the ε of the transfer matrix, the compute plot and the goals

    def check(self, cfg: Config) -> None:
        if self.review and self.focus_eps not in self.eps:
            raise ConfigError(f"config key 'ensemble.focus_eps': {self.focus_eps} is not one of ensemble.eps "
                              f"{list(self.eps)}")


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
    if not ec.load and ec.fip == "undirected" and cfg.path.steps // ec.sample_every < ec.members:
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
    # Forward+backward passes over one minibatch, attack steps included (0: `gradient_steps`, the methods
    # whose every step is one such pass).
    gradient_evals: int = 0

    @property
    def evals(self) -> int:
        return self.gradient_evals or self.gradient_steps


def evaluate_deployed(ctx: RunContext, name: str, d: Deployed, base: nn.Module, seed: int,
                      review: Review | None = None) -> tuple[dict, list, dict]:
    """Robustness curve, members' own white-box accuracy, sanity flags, diversity: (row, curve rows, flags).

    With `review` (ensemble.review) the transfer examples are the ones crafted once per seed on each
    surrogate (w0's give the `transfer` column, exactly as crafting them here would), and the review
    measurements of the deployed model go to `review.rows`."""
    ec = ctx.cfg.ensemble
    xte, yte = ctx.test_tensors()
    x_eval, y_eval = xte[: ec.eval_examples], yte[: ec.eval_examples]
    curve = robustness_curve(d.target, x_eval, y_eval, list(ec.eps), surrogate=None if review else base,
                             steps=ec.pgd_steps, seed=seed, autoattack=ec.autoattack, restarts=ec.restarts,
                             autoattack_examples=ec.autoattack_examples, autoattack_version=ec.autoattack_version,
                             transfer_from=review.transfer if review else None)
    if review is not None:
        for r in curve:
            r["transfer"] = r["transfer_w0"]
    # Each member's own white-box accuracy (PROTOCOLS.md) on the first 100 examples: K extra
    # attacks per ε would otherwise cost more than attacking the ensemble itself.
    n_member = 50 if review else 100  # the review's many methods and attacks: the first 50
    member_wb = {e: float(np.mean([r["whitebox"] for m in d.members for r in robustness_curve(
        m, x_eval[:n_member], y_eval[:n_member], [e], steps=ec.pgd_steps, seed=seed)])) for e in ec.eps}
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
    if review is not None:
        row["gradient_evals"] = d.evals
        review.rows.append(review_measurements(ctx, name, d, review, seed, x_eval, y_eval))
    return row, [{"method": name, "seed": seed, **r} for r in curve], flags


@dataclass
class Review:
    """One seed's surrogates and the transfer examples crafted on them (ensemble.review)."""

    surrogates: dict[str, nn.Module]  # {"w0": base, "independent": an independently trained ensemble}
    transfer: dict[str, dict[float, Tensor]]  # {surrogate: {eps: PGD examples on the evaluation inputs}}
    rows: list[dict]


def trained_like_w0(ctx: RunContext, seed: int, tag: int) -> list[nn.Module]:
    """`ensemble.members` networks trained like w0, member k from seed mix_seed(seed, tag, k) (its
    initialisation and batch order); in eval mode."""
    members = []
    for k in range(ctx.cfg.ensemble.members):
        ms = mix_seed(seed, tag, k)
        m = ctx.model(ms)
        train_base(m, ctx.train_data(), None, ctx.cfg, ms, progress=ctx.bar)
        members.append(m.eval())
    return members


def independent_ensemble(ctx: RunContext, seed: int) -> Ensemble:
    """`ensemble.members` networks trained like w0 from initialisations and batch orders of their own (not
    the deep ensemble's): the surrogate of a transfer attack that knows the task but not the deployed model."""
    return Ensemble(trained_like_w0(ctx, seed, 13))


def prepare_review(ctx: RunContext, base: nn.Module, seed: int) -> Review:
    """Train the independent ensemble and craft each surrogate's PGD examples once for every method."""
    ec = ctx.cfg.ensemble
    xte, yte = ctx.test_tensors()
    x_eval, y_eval = xte[: ec.eval_examples], yte[: ec.eval_examples]
    surrogates = {"w0": base.eval(), "independent": independent_ensemble(ctx, seed)}
    transfer = {k: craft_transfer(s, x_eval, y_eval, list(ec.eps), steps=ec.pgd_steps, seed=seed)
                for k, s in surrogates.items()}
    return Review(surrogates, transfer, [])


def review_measurements(ctx: RunContext, name: str, d: Deployed, review: Review, seed: int, x: Tensor,
                        y: Tensor) -> dict:
    """Per-layer diversity, coherence against each surrogate, the members' coherence and transfer matrix."""
    ec = ctx.cfg.ensemble
    many = len(d.members) > 1
    out: dict[str, Any] = {"method": name, "seed": seed, "gradient_evals": d.evals,
                           "coherence": coherence_by_surrogate(d.members, review.surrogates, x, y)}
    if many:
        out["diversity_layers"] = representation_diversity(d.members, x)
        out["member_coherence"] = member_coherence(d.members, x, y)
        # On the first 100 examples: K PGD attacks, one per member.
        out["transfer_matrix"] = transfer_matrix(d.members, x[:100], y[:100], ec.focus_eps, steps=ec.pgd_steps,
                                                 seed=seed)
    return out


@register_operation
class RobustEnsemble(Operation):
    """FIP robust ensembles vs a deep ensemble of independently trained networks and the base network."""

    name = "ensemble"
    aliases = ("undirected",)
    help = "run the ensemble experiment (FIP ensemble vs deep ensemble vs base, PGD robustness)"
    section = EnsembleConfig
    metrics = ("whitebox", "clean", "transfer")
    smoke = ("seeds=[0]", "train.steps=40", "path.steps=40", "ensemble.members=2", "ensemble.sample_every=20",
             "ensemble.pgd_steps=2", "ensemble.eval_examples=50", "path.record_every=20", "path.checkpoint_every=20",
             "robust.sample_from=0")
    cli_options = (("--ensemble", "ensemble.load", "evaluate the networks of this ensemble folder (e.g. `fipray "
                    "paths`' ensemble/) as the FIP candidates instead of walking a new path"),)
    supports_paths = True

    # The experiment -------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> dict:
        cfg, ec = ctx.cfg, ctx.cfg.ensemble
        methods = [fip_method_name(ec.fip), *ec.baselines]
        check_samples(cfg)
        n_train = 1 + (ec.members if "deep" in methods else 0) + (ec.members if ec.review else 0)
        rows = collect_seeds(ctx, len(cfg.seeds) * (n_train * cfg.train.steps + cfg.path.steps), self.name,
                             ("results", "robustness", "path", "geometry", "sanity", "review"),
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
        out: dict[str, list] = {"results": [], "robustness": [], "path": [], "geometry": [], "sanity": [],
                                "review": []}
        deployed = {methods[0]: FIP_ENSEMBLES.get(cfg.ensemble.fip)(ctx, base, seed, base_seconds, out)}
        for name in methods[1:]:
            deployed[name] = ENSEMBLE_BASELINES.get(name)(ctx, base, seed, base_seconds)
        review = prepare_review(ctx, base, seed) if cfg.ensemble.review else None
        for name, d in deployed.items():
            row, curve, flags = evaluate_deployed(ctx, name, d, base, seed, review)
            out["results"].append(row)
            out["robustness"] += curve
            out["sanity"].append((name, flags))
        out["review"] += review.rows if review is not None else []
        return out

    @staticmethod
    def fip_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float,
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
                "operation": "ensemble", "seed": seed, "config_hash": cfg.run_id(),
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
                "sanity_measurements": {m: [f["measured"] for f in fl] for m, fl in sanity.items()}} \
            | (review_summary(cfg, methods, rows, per_method, curve_mean) if ec.review else {})

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
            f"(members' own white-box accuracy, `member_whitebox` in summary.json: the first {50 if ec.review else 100}), "
            f"seeds "
            f"{list(cfg.seeds)} (means).", "",
            report.md_table(header, table), "", "## Sanity flags", "",
            report.md_table(["method"] + list(next(iter(sanity.values())).keys()), flag_rows), "",
            "Plot: `robust_accuracy.png`. Tables: `results.parquet`, `robustness.parquet`, `path.parquet`. "
            f"FIP ensembles: `ensembles/{'fip_robust' if cfg.ensemble.fip == 'robust' else 'fip'}_seed*/`.", ""])
        if ec.review:
            plot_compute(summary, out / "robust_vs_compute.png")
            md += review_report(summary)
        write_outputs(out, cfg, summary, {k: rows[k] for k in ("results", "robustness", "path")}, md)

    def brief(self, summary: dict) -> dict:
        return {m: round(v["clean_mean"], 4) for m, v in summary["methods"].items()}

    # FIP paths: the undirected walk, sampling every `ensemble.sample_every` steps ------------------------
    def path(self, ctx: RunContext, model: nn.Module, seed: int, *, rank: int = 0,
             world: int = 1) -> tuple[list[Phase], dict]:
        if ctx.cfg.ensemble.fip != "undirected":
            # Another FIP method (ensemble.fip) is registered by the operation of that name, which owns its paths.
            from fipray.operation import get_operation

            return get_operation(ctx.cfg.ensemble.fip).path(ctx, model, seed, rank=rank, world=world)
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
        if cfg.ensemble.fip != "undirected":
            raise ConfigError(f"config key 'ensemble.fip': the ensemble sweep trial walks the undirected FIP; sweep "
                              f"the {cfg.ensemble.fip!r} FIP with operation: {cfg.ensemble.fip}")
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


# The review tables (ensemble.review) ------------------------------------------------------------------------
def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([d[k] for d in ds])) for k in ds[0]} if ds else {}


def review_summary(cfg: Config, methods: list[str], rows: dict[str, list], per_method: dict, curve_mean: Any) -> dict:
    """Per method: gradient evaluations, transfer from each surrogate, coherence against each surrogate,
    per-layer diversity, member coherence and transfer matrix (means over seeds); then the goals."""
    ec = cfg.ensemble
    for m in methods:
        sel = [r for r in rows["review"] if r["method"] == m]
        v = per_method[m]
        v["gradient_evals"] = int(sel[0]["gradient_evals"])
        v["transfer_independent"] = curve_mean(m, "transfer_independent")
        v["coherence_by_surrogate"] = _mean_dicts([r["coherence"] for r in sel])
        if "diversity_layers" in sel[0]:
            v["diversity_layers"] = _mean_dicts([r["diversity_layers"] for r in sel])
            v["member_coherence"] = float(np.mean([r["member_coherence"] for r in sel]))
            v["transfer_matrix"] = np.mean([r["transfer_matrix"] for r in sel], axis=0).tolist()
    return {"restarts": ec.restarts, "autoattack_examples": ec.autoattack_examples,
            "autoattack_version": ec.autoattack_version, "focus_eps": f"{ec.focus_eps:g}",
            "surrogates": ["w0", "independent"], "goals": goals(per_method, f"{ec.focus_eps:g}")}


def goals(per_method: dict, e: str, clean_slack: float = 0.01) -> dict:
    """The robust-ensemble goals at ε = `e`, for each FIP method, with the numbers behind each verdict.

    clean_ok: clean accuracy (full test split) at least the base network's minus `clean_slack`.
    a: white-box accuracy >= the deep ensemble's with at most half its gradient evaluations (and clean_ok).
    b: white-box accuracy >= PGD adversarial training of one network's, with at most its gradient
       evaluations (and clean_ok). None where the baseline did not run.
    """
    out = {}
    base, deep, at = per_method.get("base"), per_method.get("deep"), per_method.get("pgd_at")
    for m, v in per_method.items():
        if not m.startswith("fip"):
            continue
        clean_ok = None if base is None else v["clean_full_test_mean"] >= base["clean_full_test_mean"] - clean_slack
        g: dict[str, Any] = {"eps": e, "clean_ok": clean_ok, "whitebox": v["whitebox"][e],
                             "gradient_evals": v["gradient_evals"]}
        if deep is not None:
            g["a"] = bool(v["whitebox"][e] >= deep["whitebox"][e] and v["gradient_evals"] <= deep["gradient_evals"] / 2
                          and clean_ok is not False)
            g["a_measured"] = {"deep_whitebox": deep["whitebox"][e],
                               "evals_ratio": v["gradient_evals"] / deep["gradient_evals"]}
        if at is not None:
            g["b"] = bool(v["whitebox"][e] >= at["whitebox"][e] and v["gradient_evals"] <= at["gradient_evals"]
                          and clean_ok is not False)
            g["b_measured"] = {"pgd_at_whitebox": at["whitebox"][e],
                               "evals_ratio": v["gradient_evals"] / at["gradient_evals"],
                               "pgd_at_clean": at["clean_full_test_mean"]}
        out[m] = g
    return out


def plot_compute(summary: dict, path: Any) -> None:
    """White-box accuracy at the focus ε against gradient evaluations, one point per method, clean beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = summary["focus_eps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, v in summary["methods"].items():
        ax.scatter(v["gradient_evals"], v["whitebox"][e], s=30)
        ax.annotate(f"{m} (clean {v['clean_full_test_mean']:.3f})", (v["gradient_evals"], v["whitebox"][e]),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("gradient evaluations (minibatch forward+backward, attack steps included)", fontsize=8)
    ax.set_ylabel(f"white-box PGD accuracy, ε = {e}")
    ax.set_title("Robust accuracy vs compute")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


AA_NOTE = {"standard": "standard: APGD-CE, APGD-T, FAB-T, Square",
           "apgd": "its gradient attacks APGD-CE and APGD-T only, no FAB-T or Square"}


def review_report(summary: dict) -> str:
    """The review section of report.md: attacks per ε, compute, diversity, transfer matrices, goals."""
    eps, pm, e = summary["eps"], summary["methods"], summary["focus_eps"]

    def f(x: float) -> str:
        return "—" if x != x else f"{x:.3f}"  # NaN: not run

    attacks = [[m, f(v["clean_full_test_mean"])] + [f(v["whitebox"][k]) for k in eps]
               + [f(v["autoattack"][k]) for k in eps] + [f(v["transfer"][k]) for k in eps]
               + [f(v["transfer_independent"][k]) for k in eps] + [v["gradient_evals"], round(v["seconds"], 1)]
               for m, v in pm.items()]
    header = (["method", "clean"] + [f"PGD ε={k}" for k in eps] + [f"AA ε={k}" for k in eps]
              + [f"w0→ ε={k}" for k in eps] + [f"indep→ ε={k}" for k in eps] + ["grad evals", "seconds"])
    div = [[m, f(v["diversity"]), f(v.get("member_coherence", float("nan"))), f(v["disagreement"])]
           + [f(c) for c in v["coherence_by_surrogate"].values()]
           + [" ".join(f"{k}:{x:.2f}" for k, x in v.get("diversity_layers", {}).items() if k != "mean")]
           for m, v in pm.items()]
    mats = [f"- {m}: " + "; ".join(" ".join(f"{x:.2f}" for x in row) for row in v["transfer_matrix"])
            for m, v in pm.items() if "transfer_matrix" in v]
    goal_lines = []
    for m, g in summary["goals"].items():
        a, b = g.get("a_measured", {}), g.get("b_measured", {})
        goal_lines.append(
            f"- {m} at ε = {e}: white-box {g['whitebox']:.3f}, {g['gradient_evals']} gradient evaluations, clean "
            f"within 1 point of the base: {g['clean_ok']}. (a) vs deep ensemble {a.get('deep_whitebox', float('nan')):.3f} "
            f"at {a.get('evals_ratio', float('nan')):.2f}× its evaluations: {'met' if g.get('a') else 'NOT met'}. "
            f"(b) vs PGD-AT {b.get('pgd_at_whitebox', float('nan')):.3f} at {b.get('evals_ratio', float('nan')):.2f}× "
            f"its evaluations: {'met' if g.get('b') else 'NOT met'}.")
    return "\n".join([
        "", "## Review: every attack, compute, diversity", "",
        f"White-box PGD-{summary['pgd_steps']} with {summary['restarts']} random start(s) (an example counts only if "
        f"it survives all); AutoAttack (torchattacks; {AA_NOTE[summary['autoattack_version']]}) on the first "
        f"{summary['autoattack_examples'] or 'all'} evaluation examples (— = not run); transfer crafted on w0 (w0→) and on an independently trained ensemble "
        "of the same size (indep→). Clean: the full test split. Members' own white-box accuracy (`member_whitebox`): "
        "the first 50 examples here. Robust FIP ensembles: `ensembles/fip_robust_seed*/`.", "",
        report.md_table(header, attacks), "",
        "Diversity: representation diversity (mean over layers, then per layer), members' mean pairwise "
        "input-gradient cosine, pairwise disagreement, coherence against w0 and against the independent ensemble.", "",
        report.md_table(["method", "diversity", "member coherence", "disagreement", "coherence w0",
                         "coherence indep", "diversity per layer"], div), "",
        f"Member transfer matrices at ε = {e} (row i: PGD crafted on member i; entry j: member j's accuracy):", "",
        *mats, "", "## Goals", "", *goal_lines, "", "Plot: `robust_vs_compute.png`.", ""])


def fip_method_name(fip: str) -> str:
    """The results' name of the FIP ensemble built by `ensemble.fip`: "fip" for the undirected walk."""
    return "fip" if fip == "undirected" else f"fip_{fip}"


FIP_ENSEMBLES.register("undirected")(RobustEnsemble.fip_ensemble)
