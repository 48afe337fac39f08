"""The `ensemble` operation (alias `undirected`): undirected FIPs and robust ensembles (paper Algorithm 3).

With L = 0 the path objective S = λ·d(f(x; w), f(x; w0)) has zero gradient at w0, so plain
gradient descent would not move. We drive the walk with a small random kick each step
(Gaussian, scaled by each tensor's RMS) and let the invariance gradient pull the outputs back:
components of the kick along directions that change the function are undone, components in the
(near-)null space of the metric g accumulate, so the weights travel while the outputs stay put.
Optionally β weights a diversity objective: the cosine similarity between the input-gradient
of the network's loss and that of w0 (the "coherence" the paper links to robustness).

Networks are sampled every k steps; `select_members` (`fipray.deployment`) keeps the N samples whose
outputs move least under an FGSM perturbation of the inputs (the δ rule).

Here: the section, the walk, the experiment's rows (each deployed model's evaluation and the review's
measurements), the FIP paths and the sweep trial. The summary, report.md and the review's tables and goals:
`fipray.ops.ensemble_report`; the deployed-model type, selection and budgets: `fipray.deployment`.

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

from fipray.baselines.ensemble import ENSEMBLE_BASELINES, train_w0
from fipray.config import Config, ConfigError, knob
from fipray.data.batches import mix_seed
from fipray.deployment import Deployed, select
from fipray.ensemble import Ensemble
from fipray.ensemble_folder import load_ensemble, read_ensemble_meta, save_ensemble
from fipray.eval.attacks import input_gradient
from fipray.eval.diversity import (
    coherence,
    coherence_by_surrogate,
    member_coherence,
    pairwise_disagreement,
    representation_diversity,
)
from fipray.eval.robustness import craft_transfer, robustness_curve, sanity_flags, transfer_matrix
from fipray.operation import Operation, Report, collect_seeds, get_operation, register_operation
from fipray.ops.ensemble_report import aggregate, write_report
from fipray.path import Phase, PhaseState, run_path
from fipray.phases import fip_phase
from fipray.registry import Registry
from fipray.runtime import RunContext, clone, path_summary, trained_like_w0


def _baselines() -> list[str]:
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
    pgd_alpha: float = knob(0.0, ge=0)  # white-box PGD step size (0: 2.5 ε / pgd_steps)
    # The ε at which the costly attacks run: `restarts` random starts and AutoAttack (empty: every ε of `eps`);
    # at the others one PGD start and no AutoAttack.
    strong_eps: tuple[float, ...] = knob((), ge=0)
    # The review tables: transfer from an independently trained ensemble of `members` networks (beside w0),
    # coherence against each surrogate, per-layer diversity, the member transfer matrix at `focus_eps`,
    # gradient evaluations per method and the robust-accuracy-vs-compute plot.
    review: bool = False
    focus_eps: float = knob(0.1, gt=0)  # the ε of the transfer matrix, the compute plot and the goals

    def check(self, cfg: Config) -> None:
        if any(e not in self.eps for e in self.strong_eps):
            raise ConfigError(f"config key 'ensemble.strong_eps': {list(self.strong_eps)} must be among ensemble.eps "
                              f"{list(self.eps)}")
        if self.review and self.focus_eps not in self.eps:
            raise ConfigError(f"config key 'ensemble.focus_eps': {self.focus_eps} is not one of ensemble.eps "
                              f"{list(self.eps)}")


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


def check_samples(cfg: Config) -> None:
    """The walk must sample at least `members` networks."""
    ec = cfg.ensemble
    if not ec.load and ec.fip == "undirected" and cfg.path.steps // ec.sample_every < ec.members:
        raise ConfigError(f"path.steps // ensemble.sample_every = {cfg.path.steps // ec.sample_every} sampled "
                          f"networks < ensemble.members = {ec.members}")


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


def loaded_candidates(directory: str, spec: dict, dev: torch.device) -> tuple[list[nn.Module], list, list, int]:
    """Networks of an ensemble folder as FIP candidates (e.g. the union of `fipray paths`' samples)."""
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


def evaluate_deployed(ctx: RunContext, name: str, d: Deployed, base: nn.Module, seed: int,
                      review: Review | None = None) -> tuple[dict, list, dict]:
    """Robustness curve, members' own white-box accuracy, sanity flags, diversity: (row, curve rows, flags).

    With `review` (ensemble.review) the transfer examples are the ones crafted once per seed on each
    surrogate (w0's give the `transfer` column, exactly as crafting them here would), and the review
    measurements of the deployed model go to `review.rows`."""
    ec = ctx.cfg.ensemble
    test = ctx.test_split()
    x_eval, y_eval = test.head(ec.eval_examples)
    curve = robustness_curve(d.target, x_eval, y_eval, list(ec.eps), surrogate=None if review else base,
                             steps=ec.pgd_steps, seed=seed, autoattack=ec.autoattack, restarts=ec.restarts,
                             autoattack_examples=ec.autoattack_examples, autoattack_version=ec.autoattack_version,
                             transfer_from=review.transfer if review else None, alpha=ec.pgd_alpha or None,
                             strong_eps=ec.strong_eps or None)
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
    member_clean = [test.accuracy(m) for m in d.members]
    row = {"method": name, "seed": seed, "clean": curve[0]["clean"],  # clean accuracy on x_eval
           "clean_full_test": test.accuracy(d.target),
           "member_clean_mean": float(np.mean(member_clean)), "member_clean_min": float(np.min(member_clean)),
           "base_clean": test.accuracy(base), "diversity": float(div["mean"]),
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


def independent_ensemble(ctx: RunContext, seed: int) -> Ensemble:
    """`ensemble.members` networks trained like w0 from initialisations and batch orders of their own (not
    the deep ensemble's): the surrogate of a transfer attack that knows the task but not the deployed model."""
    return Ensemble(trained_like_w0(ctx, seed, 13, ctx.cfg.ensemble.members, lambda m, s: train_w0(ctx, m, s)))


def prepare_review(ctx: RunContext, base: nn.Module, seed: int) -> Review:
    """Train the independent ensemble and craft each surrogate's PGD examples once for every method."""
    ec = ctx.cfg.ensemble
    test = ctx.test_split()
    x_eval, y_eval = test.head(ec.eval_examples)
    surrogates = {"w0": base.eval(), "independent": independent_ensemble(ctx, seed)}
    transfer = {k: craft_transfer(s, x_eval, y_eval, list(ec.eps), steps=ec.pgd_steps, seed=seed,
                                  alpha=ec.pgd_alpha or None)
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
        summary = aggregate(cfg, methods, rows, min(len(ctx.test_split()), ec.eval_examples))
        write_report(ctx, summary, rows)
        return summary

    def run_seed(self, ctx: RunContext, seed: int, methods: list[str]) -> dict[str, list]:
        cfg = ctx.cfg
        base = ctx.model(seed)
        t0 = time.perf_counter()
        train_w0(ctx, base, seed, progress=ctx.bar)
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
            test = ctx.test_split()
            res, candidates = walk(ctx, base, seed, out_dir=ctx.checkpoint_dir(f"seed{seed}"),
                                   **ctx.path_kwargs(test.head(cfg.path.heldout)[0],
                                                     lambda m: {"accuracy": test.accuracy(m)}))
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

    def brief(self, summary: dict) -> dict:
        return {m: round(v["clean_mean"], 4) for m, v in summary["methods"].items()}

    # FIP paths: the undirected walk, sampling every `ensemble.sample_every` steps ------------------------
    def path(self, ctx: RunContext, model: nn.Module, seed: int, *, rank: int = 0,
             world: int = 1) -> tuple[list[Phase], dict]:
        if ctx.cfg.ensemble.fip != "undirected":
            # Another FIP method (ensemble.fip) is registered by the operation of that name, which owns its paths.
            return get_operation(ctx.cfg.ensemble.fip).path(ctx, model, seed, rank=rank, world=world)
        test = ctx.test_split()
        if world > 1:  # each DDP rank walks on its own shard of the (in-memory) training data
            xtr, ytr = ctx.rank_shard(*ctx.train_tensors(), rank=rank, world=world)
            phases = [undirected_phase(xtr, ytr, ctx.cfg, seed)]
        else:
            phases = [undirected_phase(ctx.train_data(), None, ctx.cfg, seed)]
        return phases, {"heldout": test.head(ctx.cfg.path.heldout)[0], "evaluate": lambda m: {"accuracy": test.accuracy(m)}}

    # Sweep trials: an iteration per seed; white-box, transfer and clean accuracy at `eps` ---------------
    def check_sweep(self, cfg: Config) -> None:
        if cfg.ensemble.fip != "undirected":
            raise ConfigError(f"config key 'ensemble.fip': the ensemble sweep trial walks the undirected FIP; sweep "
                              f"the {cfg.ensemble.fip!r} FIP with operation: {cfg.ensemble.fip}")
        check_samples(cfg)

    def trial_methods(self, cfg: Config) -> tuple[str, ...]:
        return ("fip", *trial_baselines(cfg))

    def trial(self, ctx: RunContext, report: Report, *, eps: float = 0.0, method: str = "fip",
              **options: Any) -> None:
        """White-box, transfer-from-w0 and clean accuracy at `eps` (default the largest of ensemble.eps) of the
        undirected FIP ensemble, or of what baseline `method` deploys from the same w0 (`trial_target`)."""
        cfg, ec = ctx.cfg, ctx.cfg.ensemble
        e = eps or max(ec.eps)
        test = ctx.test_split()
        x_eval, y_eval = test.head(ec.eval_examples)
        got: dict[str, list[float]] = {"whitebox": [], "transfer": [], "clean": []}
        for seed in cfg.seeds:
            base = ctx.model(seed)
            train_w0(ctx, base, seed)
            if method == "fip":
                _, candidates = walk(ctx, base, seed, record_every=10**9, checkpoint_every=10**9)
                keep, _h = select(ctx, candidates)
                target: nn.Module = Ensemble([candidates[i] for i in keep])
            else:
                target = trial_target(ctx, method, base, seed)
            curve = robustness_curve(target, x_eval, y_eval, [e], surrogate=base.eval(), steps=ec.pgd_steps, seed=seed)
            for k in got:
                got[k].append(float(curve[0][k]))
            report({k: float(np.mean(v)) for k, v in got.items()} | {"seed": seed, "eps": e})


def trial_baselines(cfg: Config) -> tuple[str, ...]:
    """The baselines an ensemble or robust sweep trial can run (`sweep.method`), tuned with the FIP's budget:
    every registered ensemble baseline but `base` (w0 itself, no knob of its own), e.g. pgd_at and adv_deep
    (`robust.at_lr`), fge and adv_fge (`robust.fge_lr`, `robust.fge_cycle`), the recipes (`robust.recipe_*`);
    with w0 loaded from `robust.base_weights`, not deep or adv_deep (each member would be that same network,
    as the experiment refuses too)."""
    copies = ("deep", "adv_deep") if cfg.robust.base_weights else ()
    return tuple(n for n in ENSEMBLE_BASELINES.names() if n != "base" and n not in copies)


def trial_target(ctx: RunContext, method: str, base: nn.Module, seed: int) -> nn.Module:
    """The model a sweep trial of baseline `method` attacks: what the experiment deploys for it from the trained
    w0 `base` (`run_seed`'s call): an ensemble or one network."""
    return ENSEMBLE_BASELINES.get(method)(ctx, base, seed, 0.0).target


def fip_method_name(fip: str) -> str:
    """The results' name of the FIP ensemble built by `ensemble.fip`: "fip" for the undirected walk."""
    return "fip" if fip == "undirected" else f"fip_{fip}"


FIP_ENSEMBLES.register("undirected")(RobustEnsemble.fip_ensemble)
