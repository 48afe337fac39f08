"""Robust-ensemble baselines: a deep ensemble of independently trained networks, the base network, and the
robust FIP's compute-matched baselines: fast geometric ensembling (cyclic learning rate from w0, one run), PGD
adversarial training of one network, and an adversarially trained deep ensemble; and the published adversarial
training recipes from scratch (`fast_fgsm`: Wong et al. 2020; `pgd_at_scratch`: Madry et al. 2018), which also
train w0 itself under `robust.start: adversarial` (`train_w0`), with their weight-averaging and snapshot
ensembles (`adv_swa`, `adv_fge`) and a deep ensemble of recipe-trained networks at the FIP's total compute
(`adv_deep_equal`).

Each is `(ctx, base, seed, base_seconds) -> Deployed` (the model to attack, its members, its compute),
registered by the name `ensemble.baselines` uses. Their training runs through `run_path` like FIP's: the deep
ensemble's members train like w0 (`fipray.runtime.trained_like_w0`), PGD-AT and FGE are phases of their own
(`adversarial_phase`, `fge_phase`). The budgets they are matched to come from `fipray.deployment`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from fipray.core.step import StepOutput
from fipray.data.batches import mix_seed
from fipray.deployment import (
    Deployed,
    attack_args,
    attack_step_evals,
    base_evals,
    fip_budget,
    recipe_step_evals,
)
from fipray.ensemble import Ensemble
from fipray.eval.attacks import pgd_examples
from fipray.optim import make_optimizer
from fipray.path import Phase, PhaseState, run_path
from fipray.phases import phase_tag, seeded_randomness
from fipray.registry import Registry
from fipray.runtime import RunContext, clone, load_weights, train_base, trained_like_w0

ENSEMBLE_BASELINES: Registry = Registry("ensemble baseline")


def _deep_members(ctx: RunContext, seed: int) -> tuple[list[nn.Module], float]:
    """The deep ensemble's members for `seed` and the seconds they took, trained once per run: the adversarial
    deep ensemble starts from copies of the same networks (and is charged their cost)."""
    def train() -> tuple[list[nn.Module], float]:
        t0 = time.perf_counter()
        members = trained_like_w0(ctx, seed, 7, ctx.cfg.ensemble.members, lambda m, s: train_w0(ctx, m, s))
        return members, time.perf_counter() - t0

    return ctx.memo(f"deep_members/{seed}", train)


@ENSEMBLE_BASELINES.register("deep")
def deep_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """`ensemble.members` networks trained like w0 from independent initialisations and batch orders."""
    members, seconds = _deep_members(ctx, seed)
    k = ctx.cfg.ensemble.members
    return Deployed(Ensemble(members), members, seconds, k * ctx.cfg.train.steps, k * base_evals(ctx.cfg))


@ENSEMBLE_BASELINES.register("base")
def base_network(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """The base network w0 alone."""
    return Deployed(base.eval(), [base], base_seconds, ctx.cfg.train.steps, base_evals(ctx.cfg))


# The published adversarial training recipes, from scratch ----------------------------------------------------
def recipe_lr(t: int, steps: int, lr: float, schedule: str) -> float:
    """The recipe's learning rate at step t (from 0) of `steps`: flat, or cyclic as Wong et al. schedule it per
    iteration: linear from 0 to `lr` at 40% of the steps, then linear down to 0 at the last."""
    if schedule == "flat":
        return lr
    u = (t + 1) / steps
    return lr * (u / 0.4 if u <= 0.4 else max(0.0, (1 - u) / 0.6))


def fgsm_rs_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                     generator: torch.Generator) -> torch.Tensor:
    """FGSM from a random start as Wong et al.'s code crafts it: δ ~ U(−ε, ε) (x + δ clipped to [0, 1]); the
    examples the model classifies correctly at that start take one step δ + α·sign ∇_δ CE, clipped to the ε-ball
    and x + δ to [0, 1]; those it already gets wrong keep their random start. Crafted in the model's current mode
    (the recipe trains in train mode)."""
    noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1).to(x.device)
    delta = ((x + eps * noise).clamp(0, 1) - x).requires_grad_(True)
    with torch.enable_grad():
        out = model(x + delta)
        (g,) = torch.autograd.grad(F.cross_entropy(out, y), delta)
    right = (out.argmax(1) == y).view(-1, *([1] * (x.ndim - 1)))
    stepped = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
    return (x + torch.where(right, stepped, delta.detach())).clamp(0, 1).detach()


def recipe_phase(ctx: RunContext, seed: int, *, steps: int | None = None, recipe: str | None = None,
                 name: str = "recipe") -> Phase:
    """Adversarial training from the network at the phase start by the published recipe `robust.recipe` (or
    `recipe`): fast_fgsm (FGSM from a random start, step `recipe_alpha`) or pgd (`recipe_steps` PGD steps of
    `recipe_step_size`, random start), radius `recipe_eps`, cross-entropy on the adversarial batch only, in train
    mode, with train.optimizer and train.batch_size, the rate following `recipe_schedule` up to train.lr, for
    `steps` (default train.steps) steps. Batch t is batch t of the stream mix_seed(seed, phase_tag(name)); its
    attack's random start draws from mix_seed(seed, 17, phase_tag(name), t)."""
    cfg, rc = ctx.cfg, ctx.cfg.robust
    recipe = recipe or rc.recipe
    n = cfg.train.steps if steps is None else steps
    source = ctx.train_data().batches(cfg.train.batch_size, mix_seed(seed, phase_tag(name)))

    def craft(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if recipe == "fast_fgsm":
            return fgsm_rs_examples(model, xb, yb, eps=rc.recipe_eps, alpha=rc.recipe_alpha, generator=gen)
        return pgd_examples(model, xb, yb, eps=rc.recipe_eps, step_size=rc.recipe_step_size, steps=rc.recipe_steps,
                            generator=gen)

    def step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        for group in opt.param_groups:
            group["lr"] = recipe_lr(t, n, cfg.train.lr, rc.recipe_schedule)
        with seeded_randomness(model, mix_seed(seed, 8, phase_tag(name), t)):
            xb, yb = source.batch(t)
            gen = torch.Generator().manual_seed(mix_seed(seed, 17, phase_tag(name), t))
            loss = F.cross_entropy(model(craft(model, xb, yb, gen)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return StepOutput(loss.detach(), torch.zeros((), device=loss.device), loss.detach())

    return Phase(name=name, steps=n, step=step, train_mode=True,
                 optimizer=lambda m: make_optimizer(cfg.train.optimizer, m.parameters(), cfg.train.lr,
                                                    cfg.train.weight_decay))


def train_w0(ctx: RunContext, model: nn.Module, seed: int, progress: object = None) -> None:
    """Train w0 (in place): `train_base` (robust.start: w0), or the adversarial recipe from scratch, or the
    weights of `robust.base_weights` (robust.start: adversarial)."""
    rc = ctx.cfg.robust
    if rc.start == "w0":  # checkpointed into the run's folder: a rerun loads it instead of training it again
        train_base(model, ctx.train_data(), None, ctx.cfg, seed, progress=progress, out_dir=ctx.base_dir(seed))
    elif rc.base_weights:
        load_weights(model, rc.base_weights, "robust.base_weights")
    else:
        run_path(model, [recipe_phase(ctx, seed)], record_every=ctx.cfg.train.steps, checkpoint_every=10**9,
                 progress=progress)


def _from_scratch(ctx: RunContext, seed: int, recipe: str, tag: int) -> Deployed:
    cfg = ctx.cfg
    t0 = time.perf_counter()
    m = ctx.model(mix_seed(seed, tag))
    run_path(m, [recipe_phase(ctx, mix_seed(seed, tag), recipe=recipe)], record_every=cfg.train.steps,
             checkpoint_every=10**9)
    per_step = recipe_step_evals(cfg.robust, recipe)
    m.eval()
    return Deployed(m, [m], time.perf_counter() - t0, cfg.train.steps, cfg.train.steps * per_step)


@ENSEMBLE_BASELINES.register("fast_fgsm")
def fast_fgsm(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """One network adversarially trained from its own initialisation by Wong et al.'s fast-FGSM recipe
    (`recipe_phase` with recipe fast_fgsm; train.steps steps): the published single-model baseline."""
    return _from_scratch(ctx, seed, "fast_fgsm", 21)


@ENSEMBLE_BASELINES.register("pgd_at_scratch")
def pgd_at_scratch(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """One network adversarially trained from its own initialisation with `robust.recipe_steps`-step PGD
    (Madry et al.; `recipe_phase` with recipe pgd, train.steps steps)."""
    return _from_scratch(ctx, seed, "pgd", 22)


@ENSEMBLE_BASELINES.register("adv_deep_equal")
def adversarial_deep_equal(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """`ensemble.members` networks, each adversarially trained from its own initialisation by `robust.recipe`
    with 1/members of the robust FIP ensemble's total compute (w0's training plus `fip_budget`): a deep ensemble
    of robust networks at the FIP's compute (each member's schedule compressed into its share of the steps)."""
    cfg, k = ctx.cfg, ctx.cfg.ensemble.members
    per_step = recipe_step_evals(cfg.robust)
    steps = max(1, (base_evals(cfg) + fip_budget(cfg)) // k // per_step)
    t0 = time.perf_counter()
    members = []
    for i in range(k):
        ms = mix_seed(seed, 23, i)
        m = ctx.model(ms)
        run_path(m, [recipe_phase(ctx, ms, steps=steps)], record_every=steps, checkpoint_every=10**9)
        members.append(m.eval())
    return Deployed(Ensemble(members), members, time.perf_counter() - t0, k * steps, k * steps * per_step)


# Compute-matched baselines of the robust FIP (`fipray.ops.robust`) --------------------------------------------
def adversarial_phase(ctx: RunContext, seed: int, steps: int, name: str = "pgd_at") -> Phase:
    """PGD adversarial training (Madry et al.): `steps` updates of cross-entropy on PGD examples crafted
    against the current weights (the robust FIP's attack, `fipray.deployment.attack_args`), with the training
    recipe's optimizer and learning rate (or `robust.at_lr`), in train mode. Batch t is batch t of the
    stream mix_seed(seed, 16); its attack's random start draws from mix_seed(seed, 17, t)."""
    cfg = ctx.cfg
    source = ctx.train_data().batches(cfg.train.batch_size, mix_seed(seed, 16))
    attack = attack_args(cfg.robust)
    lr = cfg.robust.at_lr or cfg.train.lr

    def step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        with seeded_randomness(model, mix_seed(seed, 8, phase_tag(name), t)):
            xb, yb = source.batch(t)
            gen = torch.Generator().manual_seed(mix_seed(seed, 17, t))
            loss = F.cross_entropy(model(pgd_examples(model, xb, yb, **attack, generator=gen)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return StepOutput(loss.detach(), torch.zeros((), device=loss.device), loss.detach())

    return Phase(name=name, steps=steps, step=step, train_mode=True,
                 optimizer=lambda m: make_optimizer(cfg.train.optimizer, m.parameters(), lr, cfg.train.weight_decay))


def adversarial_training(ctx: RunContext, model: nn.Module, seed: int, steps: int) -> nn.Module:
    """`model` after `adversarial_phase` (updated in place, through `run_path`), in eval mode."""
    run_path(model, [adversarial_phase(ctx, seed, steps)], record_every=max(steps, 1), checkpoint_every=10**9)
    return model


@ENSEMBLE_BASELINES.register("pgd_at")
def pgd_at(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """One network: w0 adversarially trained with the robust FIP's budget (`fip_budget`) of gradient
    evaluations, each update costing `robust.attack_steps` + 1 of them: the same compute as the robust FIP
    (rounded up to whole updates)."""
    cfg = ctx.cfg
    per_step = attack_step_evals(cfg.robust)
    steps = -(-fip_budget(cfg) // per_step)  # rounded up: PGD-AT never gets less than the FIP
    t0 = time.perf_counter()
    m = adversarial_training(ctx, clone(base), seed, steps)
    return Deployed(m, [m], base_seconds + time.perf_counter() - t0, cfg.train.steps + steps,
                    base_evals(cfg) + steps * per_step)


@ENSEMBLE_BASELINES.register("adv_deep")
def adversarial_deep_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """The deep ensemble's `ensemble.members` networks (copies), each then adversarially trained with an equal
    share of the robust FIP's adversarial budget (`fip_budget`); charged the deep ensemble's cost too."""
    cfg = ctx.cfg
    k = cfg.ensemble.members
    per_step = attack_step_evals(cfg.robust)
    steps = fip_budget(cfg) // k // per_step
    clean, clean_seconds = _deep_members(ctx, seed)
    t0 = time.perf_counter()
    members = [adversarial_training(ctx, clone(m), mix_seed(seed, 7, i), steps) for i, m in enumerate(clean)]
    return Deployed(Ensemble(members), members, clean_seconds + time.perf_counter() - t0,
                    k * (cfg.train.steps + steps), k * (base_evals(cfg) + steps * per_step))


def fge_lr(i: int, cycle: int, lr_max: float) -> float:
    """Fast geometric ensembling's triangular schedule (Garipov et al. 2018, eq. 2): step i (from 0) of a
    `cycle`-step cycle goes linearly from lr_max to lr_max / 100 at mid-cycle and back."""
    t = (i % cycle + 1) / cycle
    lo = lr_max / 100
    return (1 - 2 * t) * lr_max + 2 * t * lo if t <= 0.5 else (2 - 2 * t) * lo + (2 * t - 1) * lr_max


def fge_phase(ctx: RunContext, seed: int, name: str = "fge", *, cycle: int = 0, adversarial: bool = False) -> Phase:
    """Fast geometric ensembling's run: SGD (momentum 0.9) on cross-entropy with the cyclic rate `fge_lr`
    (`cycle` steps, default `robust.fge_cycle`; largest `robust.fge_lr`) for `ensemble.members` cycles, in train
    mode, batch t from the stream mix_seed(seed, 18) (adversarial: mix_seed(seed, 19)). With `adversarial` the loss
    is cross-entropy on the robust FIP's training attack (`attack_args`; random start from mix_seed(seed, 20, t)):
    adversarial training with FGE's schedule. The weights at each cycle's lowest rate are kept in the phase
    state; its result's "members" lists them."""
    cfg, rc = ctx.cfg, ctx.cfg.robust
    k, c = cfg.ensemble.members, cycle or rc.fge_cycle
    source = ctx.train_data().batches(cfg.train.batch_size, mix_seed(seed, 19 if adversarial else 18))
    attack = attack_args(rc)

    def step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        for group in opt.param_groups:
            group["lr"] = fge_lr(t, c, rc.fge_lr)
        with seeded_randomness(model, mix_seed(seed, 8, phase_tag(name), t)):
            xb, yb = source.batch(t)
            if adversarial:
                xb = pgd_examples(model, xb, yb, **attack, generator=torch.Generator().manual_seed(mix_seed(seed, 20, t)))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if t % c + 1 == c // 2:  # mid-cycle: the lowest learning rate
            state["members"].append({n: v.detach().clone() for n, v in model.state_dict().items()})
        return StepOutput(loss.detach(), torch.zeros((), device=loss.device), loss.detach())

    return Phase(name=name, steps=k * c, step=step, train_mode=True, prepare=lambda m: {"members": []},
                 optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=rc.fge_lr, momentum=0.9),
                 finish=lambda m, state: {"members": state["members"]})


def _snapshots(base: nn.Module, states: list[dict]) -> list[nn.Module]:
    """Copies of `base` holding the state dicts an FGE run kept, in eval mode."""
    members = []
    for state in states:
        m = clone(base)
        m.load_state_dict(state)
        members.append(m.eval())
    return members


@ENSEMBLE_BASELINES.register("fge")
def fast_geometric_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """Fast geometric ensembling from w0 (`fge_phase`): one network taken at the lowest rate of each of
    `ensemble.members` cycles (one training run: its cost is w0's plus members × cycle steps)."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    steps = cfg.ensemble.members * cfg.robust.fge_cycle
    res = run_path(clone(base), [fge_phase(ctx, seed)], record_every=steps, checkpoint_every=10**9)
    members = _snapshots(base, res.phase_results["fge"]["members"])
    return Deployed(Ensemble(members), members, base_seconds + time.perf_counter() - t0, cfg.train.steps + steps)


def _adversarial_fge_run(ctx: RunContext, base: nn.Module, seed: int) -> tuple[list[nn.Module], float, int, int]:
    """One adversarial FGE run from w0 with the robust FIP's budget (`fip_budget`, in cycles of equal length, one
    per member): (members in eval mode, seconds, steps, gradient evaluations after w0); run once per seed."""
    def run() -> tuple[list[nn.Module], float, int, int]:
        cfg, k = ctx.cfg, ctx.cfg.ensemble.members
        per_step = attack_step_evals(cfg.robust)
        cycle = max(2, -(-fip_budget(cfg) // (per_step * k)))  # rounded up: never less than the FIP's budget
        t0 = time.perf_counter()
        res = run_path(clone(base), [fge_phase(ctx, seed, "adv_fge", cycle=cycle, adversarial=True)],
                       record_every=k * cycle, checkpoint_every=10**9)
        members = _snapshots(base, res.phase_results["adv_fge"]["members"])
        return members, time.perf_counter() - t0, k * cycle, k * cycle * per_step

    return ctx.memo(f"adv_fge/{seed}", run)


@ENSEMBLE_BASELINES.register("adv_fge")
def adversarial_fge(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """Fast geometric ensembling of adversarial training from w0 (`fge_phase` with the robust FIP's training
    attack), the FIP's budget split into `ensemble.members` cycles: snapshots of one robust run."""
    members, seconds, steps, evals = _adversarial_fge_run(ctx, base, seed)
    return Deployed(Ensemble(members), members, base_seconds + seconds, ctx.cfg.train.steps + steps,
                    base_evals(ctx.cfg) + evals)


@ENSEMBLE_BASELINES.register("adv_swa")
def adversarial_swa(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """Stochastic weight averaging of the adversarial FGE run's snapshots (`adv_fge`; the same run, its cost
    counted again): one network whose weights are the mean of the robust checkpoints (buffers too)."""
    members, seconds, steps, evals = _adversarial_fge_run(ctx, base, seed)
    m = clone(base)
    states = [s.state_dict() for s in members]
    m.load_state_dict({k: torch.stack([st[k].float() for st in states]).mean(0).to(states[0][k].dtype)
                       for k in states[0]})
    m.eval()
    return Deployed(m, [m], base_seconds + seconds, ctx.cfg.train.steps + steps, base_evals(ctx.cfg) + evals)

