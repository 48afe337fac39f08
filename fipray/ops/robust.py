"""The `robust` operation: FIPs whose secondary objective is adversarial robustness (paper Fig. 1a, "Task 1 + robust").

Along the path S = λ·d(f(x_mem; w), f(x_mem; w0)) + β·L(w): the invariance term, measured on clean
training inputs against w0, keeps clean behaviour, while L is an adversarial objective computed on the
fly against the *current* weights:

- `objective: ce`: cross-entropy on L∞ PGD examples (random start, `attack_steps` steps of size
  `step_size`, radius `train_eps`) crafted on w, i.e. PGD adversarial training as the path's L;
- `objective: trades`: KL(f(x) ‖ f(x + δ)) with δ from PGD on that same KL (TRADES' robust term; the
  clean term is the invariance's job).

Optionally a diversity term pushes each new sample away from the networks already taken (w0 and the
path's earlier samples, the `diversity_window` most recent), weighted by `diversity_weight`:

- `coherence`: the mean cosine between w's input-gradient of the loss and each earlier member's (the
  paper's coherence, measured against the members, not only w0): a transfer attack follows one of them;
- `disagreement`: the cosine between w's and each earlier member's distribution over the *wrong* classes
  on the PGD examples (ADP-style): members whose errors differ are not all fooled by one perturbation.

Networks are sampled every `ensemble.sample_every` steps; with `robust.paths` > 1 the experiment runs
that many paths from one w0 (seeds mix_seed(seed, 14, p)) and the δ rule of `fipray.deployment`
picks `ensemble.members` of the union, saved as an ordinary ensemble folder (`fipray serve` / `attack`).

The experiment is the ensemble comparison (`fipray.ops.ensemble`) with this FIP: `fipray robust` and
`fipray ensemble` with `ensemble.fip: robust` run the same thing (this module registers "robust" among
the ensemble operation's FIP methods). Cost is counted in gradient evaluations: forward+backward passes
over one minibatch of `path.batch_size` examples (memory batches pro rata), attack steps included, and a
forward-only pass of an earlier member (disagreement) counted as a whole one (an over-count); the counts, the
`robust:` section (`RobustConfig`, registered here) and the training attack live in `fipray.deployment`, which
the compute-matched baselines (`fipray.baselines.ensemble`) read too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray.baselines.ensemble import train_w0
from fipray.config import Config, ConfigError
from fipray.core.distances import get_distance
from fipray.data.batches import mix_seed
from fipray.data.stream import as_examples
from fipray.deployment import (
    Deployed,
    RobustConfig,
    attack_args,
    base_evals,
    candidates_per_path,
    select,
    selection_evals,
    step_evals,
)
from fipray.ensemble import Ensemble
from fipray.ensemble_folder import save_ensemble
from fipray.eval.attacks import input_gradient, pgd_examples
from fipray.eval.robustness import robustness_curve
from fipray.operation import Operation, Report, register_operation
from fipray.ops.ensemble import FIP_ENSEMBLES, RobustEnsemble, trial_baselines, trial_target
from fipray.path import Phase, PhaseState, run_path
from fipray.phases import fip_phase, phase_tag
from fipray.runtime import RunContext, clone, path_summary


def path_lr(cfg: Config, t: int) -> float:
    """The learning rate of robust path step t (from 0): path.lr, then from `robust.sample_from` on (with
    `robust.lr_cycle` > 0) cosine cycles (snapshot ensembles, Huang et al. 2017) from path.lr × `lr_peak` down
    to path.lr / 100 at each cycle's last step, so samples every lr_cycle steps land at the lowest rate."""
    rc, lr = cfg.robust, cfg.path.lr
    if not rc.lr_cycle or t < rc.sample_from:
        return lr
    u = ((t - rc.sample_from) % rc.lr_cycle + 1) / rc.lr_cycle
    lo, hi = lr / 100, lr * rc.lr_peak
    return lo + (hi - lo) * (1 + math.cos(math.pi * u)) / 2


def _wrong_class_probs(logits: Tensor, y: Tensor) -> Tensor:
    """Softmax over the classes other than the label: (B, C − 1)."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, y[:, None], False)
    return F.softmax(logits[keep].view(len(logits), -1), dim=1)


def diversity_term(model: nn.Module, taken: list[dict[str, Tensor]], x: Tensor, y: Tensor, x_adv: Tensor,
                   kind: str) -> Tensor:
    """Mean similarity of `model` to each network in `taken` (lower = more diverse); see the module docstring."""
    sims = []
    if kind == "coherence":
        g = input_gradient(model, x, y, create_graph=True).flatten(1)
        for state in taken:
            gj = input_gradient(lambda z, s=state: torch.func.functional_call(model, s, (z,)), x, y).flatten(1)
            sims.append(F.cosine_similarity(g, gj.detach(), dim=1, eps=1e-12).mean())
    else:
        p = _wrong_class_probs(model(x_adv), y)
        for state in taken:
            with torch.no_grad():
                pj = _wrong_class_probs(torch.func.functional_call(model, state, (x_adv,)), y)
            sims.append(F.cosine_similarity(p, pj, dim=1).mean())
    return torch.stack(sims).mean()


def robust_phase(data: Any, cfg: Config, seed: int, name: str = "robust") -> Phase:
    """The robustness-directed FIP from the network at the phase start (w0), sampling every
    `ensemble.sample_every` steps. `data` (Examples or (x, y)) serves as memory and as the new batches.

    The phase state holds the step count, the gradient evaluations so far and the networks the diversity
    term pushes away from (w0, then each sample), so a resumed path continues exactly."""
    rc, every = cfg.robust, cfg.ensemble.sample_every
    dist = get_distance(cfg.path.distance)
    x_mem = data[0] if isinstance(data, tuple) else data
    # clean_pass false: L's batches are drawn here (the stream fip_phase would use), never forwarded clean.
    own = None if rc.clean_pass else as_examples(data).batches(cfg.path.batch_size, mix_seed(seed, 1, phase_tag(name)))

    def prepare_extra(model: nn.Module) -> PhaseState:
        w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"t": 0, "evals": 0.0, "taken": [w0] if rc.diversity != "none" else [],
                "w0": w0 if rc.adv_invariance else None}

    def secondary(model: nn.Module, logits: Tensor | None, x: Tensor | None, y: Tensor | None,
                  state: PhaseState) -> Tensor:
        if own is not None:
            x, y = own.batch(state["t"])
        assert x is not None and y is not None
        gen = torch.Generator().manual_seed(mix_seed(seed, 15, state["t"]))
        trades = rc.objective == "trades"
        x_adv = pgd_examples(model, x, y, **attack_args(rc), generator=gen, clean_logits=logits if trades else None)
        adv_logits = model(x_adv)
        if trades:
            assert logits is not None  # clean_pass: true (RobustConfig.check)
            loss = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        else:
            loss = F.cross_entropy(adv_logits, y)
        if rc.adv_invariance:  # w0's outputs on the same adversarial inputs: keep them too
            with torch.no_grad():
                ref = torch.func.functional_call(model, state["w0"], (x_adv,))
            loss = loss + rc.adv_invariance * dist(adv_logits, ref)
        window = state["taken"][-rc.diversity_window:]
        state["evals"] += step_evals(cfg, len(window))
        if rc.diversity != "none":
            loss = loss + rc.diversity_weight * diversity_term(model, window, x, y, x_adv, rc.diversity)
        return loss

    def after_step(model: nn.Module, state: PhaseState) -> None:
        state["t"] += 1
        if rc.diversity != "none" and state["t"] % every == 0:  # the sample run_path takes at this step
            state["taken"].append({k: v.detach().clone() for k, v in model.state_dict().items()})

    phase = fip_phase(name, cfg.path, seed, memory=x_mem, secondary=secondary, new_data=data if own is None else None,
                      after_step=after_step, sample_every=every, prepare_extra=prepare_extra,
                      finish=lambda m, state: {"gradient_evals": int(math.ceil(state["evals"]))})
    if not rc.lr_cycle:
        return phase
    inner = phase.step

    def cyclic_step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> Any:
        for group in opt.param_groups:
            group["lr"] = path_lr(cfg, t)
        return inner(model, opt, t, state)

    return dataclasses.replace(phase, step=cyclic_step)


def robust_paths(ctx: RunContext, base: nn.Module, seed: int, *, out_dir: bool = True,
                 **path_kwargs: Any) -> tuple[list[Any], list[nn.Module], list[int], list[int], int]:
    """`robust.paths` paths from `base`: (results, candidates in eval mode, path ids, sample steps, evals)."""
    results, candidates, path_ids, steps, evals = [], [], [], [], 0
    for p in range(ctx.cfg.robust.paths):
        ps = seed if p == 0 else mix_seed(seed, 14, p)
        res = run_path(clone(base), [robust_phase(ctx.train_data(), ctx.cfg, ps)],
                       out_dir=ctx.checkpoint_dir(f"seed{seed}", f"robust{p}") if out_dir else None, **path_kwargs)
        results.append(res)
        evals += res.phase_results["robust"]["gradient_evals"]
        for i, s in enumerate(res.samples):
            if s["global_step"] < ctx.cfg.robust.sample_from:
                continue
            m = clone(base)
            m.load_state_dict(res.sample_state(i))
            candidates.append(m.eval())
            path_ids.append(p)
            steps.append(s["global_step"])
    return results, candidates, path_ids, steps, evals


def validation_context(ctx: RunContext, n: int) -> RunContext:
    """`ctx` with `n` training examples (a fixed permutation, seed 0) held out as its test split and the rest as
    its training split: what a sweep trial scores on (`robust.validation`), so selection never sees the test set."""
    from torch.utils.data import Subset

    train = ctx.bundle.train
    if not 0 < n < len(train):
        raise ConfigError(f"config key 'robust.validation' = {n}: must lie between 1 and the training split's "
                          f"{len(train) - 1} examples")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    held, rest = perm[:n].sort().values, perm[n:].sort().values
    bundle = dataclasses.replace(ctx.bundle, train=Subset(train, rest.tolist()), test=Subset(train, held.tolist()))
    return dataclasses.replace(ctx, bundle=bundle, memos={})


@FIP_ENSEMBLES.register("robust")
def robust_fip_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float,
                        out: dict[str, list]) -> Deployed:
    """Robust FIP paths from w0, the δ rule over the union of their samples, saved as an ensemble folder."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    test = ctx.test_split()
    results, candidates, path_ids, steps, evals = robust_paths(
        ctx, base, seed, **ctx.path_kwargs(test.head(cfg.path.heldout)[0], lambda m: {"accuracy": test.accuracy(m)}))
    for p, res in enumerate(results):
        out["path"] += [{"seed": seed, "path": p, **r} for r in res.records]
        out["geometry"].append(path_summary(res.records))
    keep, h = select(ctx, candidates)
    members = [candidates[i] for i in keep]
    seconds = base_seconds + time.perf_counter() - t0
    if ctx.out is not None:
        save_ensemble(members, ctx.out / "ensembles" / f"fip_robust_seed{seed}", model_spec=ctx.spec, metadata={
            "operation": "robust", "seed": seed, "config_hash": cfg.run_id(), "path_ids": [path_ids[i] for i in keep],
            "steps": [steps[i] for i in keep], "fgsm_shift": [h[i] for i in keep], "candidates": len(candidates)})
    assert len(candidates) == cfg.robust.paths * candidates_per_path(cfg)
    return Deployed(Ensemble(members), members, seconds, cfg.train.steps + cfg.robust.paths * cfg.path.steps,
                    base_evals(cfg) + evals + selection_evals(len(candidates), cfg.path.batch_size))


@register_operation
class Robust(Operation):
    """Robust FIP ensembles: the ensemble comparison with a robustness-directed FIP, its paths and sweeps."""

    name = "robust"
    runs_configs_of = ("ensemble",)
    help = "robust FIP ensembles (L = adversarial loss, optional diversity) vs deep / adversarial baselines"
    section = RobustConfig
    metrics = ("whitebox_floor", "whitebox", "clean", "transfer")
    smoke = ("seeds=[0]", "train.steps=40", "path.steps=20", "ensemble.members=2", "ensemble.sample_every=10",
             "ensemble.pgd_steps=2", "ensemble.eval_examples=40", "ensemble.autoattack=false",
             "path.record_every=10", "path.checkpoint_every=10", "robust.attack_steps=1", "robust.paths=1",
             "robust.sample_from=0", "path.memory_batch_size=32")
    supports_paths = True

    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg if ctx.cfg.ensemble.fip == "robust" else ctx.cfg.replace(**{"ensemble.fip": "robust"})
        return RobustEnsemble().run(dataclasses.replace(ctx, cfg=cfg))

    def brief(self, summary: dict) -> dict:
        return RobustEnsemble().brief(summary)

    # FIP paths (`fipray paths`): one robust path from the shared w0; the union of samples is one ensemble.
    def path(self, ctx: RunContext, model: nn.Module, seed: int, *, rank: int = 0,
             world: int = 1) -> tuple[list[Phase], dict]:
        test = ctx.test_split()
        if world > 1:  # each DDP rank walks on its own shard of the (in-memory) training data
            phases = [robust_phase(ctx.rank_shard(*ctx.train_tensors(), rank=rank, world=world), ctx.cfg, seed)]
        else:
            phases = [robust_phase(ctx.train_data(), ctx.cfg, seed)]
        return phases, {"heldout": test.head(ctx.cfg.path.heldout)[0],
                        "evaluate": lambda m: {"accuracy": test.accuracy(m)}}

    # Sweep trials: an iteration per seed --------------------------------------------------------------------
    def validation_context(self, ctx: RunContext, validation: float, seed: int) -> RunContext:
        """With `robust.validation` set, the trial holds out its own examples (`validation_context` below);
        else the sweep's held-out part of the training split."""
        return ctx if ctx.cfg.robust.validation else super().validation_context(ctx, validation, seed)

    def check_sweep(self, cfg: Config) -> None:
        RobustConfig.check(cfg.robust, cfg.replace(**{"ensemble.fip": "robust"}))

    def trial_methods(self, cfg: Config) -> tuple[str, ...]:
        """FIP and the ensemble baselines with a knob of their own (`trial_baselines`), e.g. pgd_at: w0's PGD
        adversarial training continued with the robust FIP's budget at `robust.at_lr`."""
        return ("fip", *trial_baselines(cfg))

    def trial(self, ctx: RunContext, report: Report, *, eps: float = 0.0, method: str = "fip",
              **options: Any) -> None:
        """White-box PGD accuracy at `eps` (default ensemble.focus_eps) of the robust FIP ensemble, or with
        `method` of what that baseline deploys from the same w0 (`trial_target`, e.g. pgd_at's one network), clean
        and transfer-from-w0 accuracy, and `whitebox_floor`: the white-box accuracy when the model's clean
        accuracy (full test split) is at least the base network's minus `robust.clean_floor`, else that
        accuracy minus 1 and the shortfall (negative: trials below the floor rank below every trial above it,
        and among themselves by how far below they are). With `robust.validation` > 0 every accuracy here is
        measured on that many held-out training examples (trained on the rest), never on the test split."""
        if ctx.cfg.robust.validation:
            ctx = validation_context(ctx, ctx.cfg.robust.validation)
        cfg, ec = ctx.cfg, ctx.cfg.ensemble
        e = eps or ec.focus_eps
        test = ctx.test_split()
        x_eval, y_eval = test.head(ec.eval_examples)
        got: dict[str, list[float]] = {"whitebox_floor": [], "whitebox": [], "transfer": [], "clean": [],
                                       "base_clean": []}
        for seed in cfg.seeds:
            base = ctx.model(seed)
            train_w0(ctx, base, seed)
            if method == "fip":
                _, candidates, _, _, _ = robust_paths(ctx, base, seed, out_dir=False, record_every=10**9,
                                                      checkpoint_every=10**9)
                keep, _h = select(ctx, candidates)
                ens: nn.Module = Ensemble([candidates[i] for i in keep])
            else:
                ens = trial_target(ctx, method, base, seed)
            curve = robustness_curve(ens, x_eval, y_eval, [e], surrogate=base.eval(), steps=ec.pgd_steps, seed=seed,
                                     restarts=ec.restarts)
            clean, base_clean = test.accuracy(ens), test.accuracy(base)
            shortfall = max(0.0, base_clean - cfg.robust.clean_floor - clean)
            got["whitebox_floor"].append(curve[0]["whitebox"] - (1.0 + shortfall if shortfall > 0 else 0.0))
            got["whitebox"].append(curve[0]["whitebox"])
            got["transfer"].append(curve[0]["transfer"])
            got["clean"].append(clean)
            got["base_clean"].append(base_clean)
            report({k: float(np.mean(v)) for k, v in got.items()} | {"seed": seed, "eps": e})
