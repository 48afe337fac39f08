"""Robust-ensemble baselines: a deep ensemble of independently trained networks, the base network, and the
robust FIP's compute-matched baselines: fast geometric ensembling (cyclic learning rate from w0, one run), PGD
adversarial training of one network, and an adversarially trained deep ensemble.

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
from fipray.deployment import Deployed, attack_args, fip_budget
from fipray.ensemble import Ensemble
from fipray.eval.attacks import pgd_examples
from fipray.optim import make_optimizer
from fipray.path import Phase, PhaseState, run_path
from fipray.phases import phase_tag, seeded_randomness
from fipray.registry import Registry
from fipray.runtime import RunContext, clone, trained_like_w0

ENSEMBLE_BASELINES: Registry = Registry("ensemble baseline")


def _deep_members(ctx: RunContext, seed: int) -> tuple[list[nn.Module], float]:
    """The deep ensemble's members for `seed` and the seconds they took, trained once per run: the adversarial
    deep ensemble starts from copies of the same networks (and is charged their cost)."""
    def train() -> tuple[list[nn.Module], float]:
        t0 = time.perf_counter()
        members = trained_like_w0(ctx, seed, 7, ctx.cfg.ensemble.members)
        return members, time.perf_counter() - t0

    return ctx.memo(f"deep_members/{seed}", train)


@ENSEMBLE_BASELINES.register("deep")
def deep_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """`ensemble.members` networks trained like w0 from independent initialisations and batch orders."""
    members, seconds = _deep_members(ctx, seed)
    return Deployed(Ensemble(members), members, seconds, ctx.cfg.ensemble.members * ctx.cfg.train.steps)


@ENSEMBLE_BASELINES.register("base")
def base_network(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """The base network w0 alone."""
    return Deployed(base.eval(), [base], base_seconds, ctx.cfg.train.steps)


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
    per_step = cfg.robust.attack_steps + 1
    steps = -(-fip_budget(cfg) // per_step)  # rounded up: PGD-AT never gets less than the FIP
    t0 = time.perf_counter()
    m = adversarial_training(ctx, clone(base), seed, steps)
    return Deployed(m, [m], base_seconds + time.perf_counter() - t0, cfg.train.steps + steps,
                    cfg.train.steps + steps * per_step)


@ENSEMBLE_BASELINES.register("adv_deep")
def adversarial_deep_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """The deep ensemble's `ensemble.members` networks (copies), each then adversarially trained with an equal
    share of the robust FIP's adversarial budget (`fip_budget`); charged the deep ensemble's cost too."""
    cfg = ctx.cfg
    k = cfg.ensemble.members
    per_step = cfg.robust.attack_steps + 1
    steps = fip_budget(cfg) // k // per_step
    clean, clean_seconds = _deep_members(ctx, seed)
    t0 = time.perf_counter()
    members = [adversarial_training(ctx, clone(m), mix_seed(seed, 7, i), steps) for i, m in enumerate(clean)]
    return Deployed(Ensemble(members), members, clean_seconds + time.perf_counter() - t0,
                    k * (cfg.train.steps + steps), k * (cfg.train.steps + steps * per_step))


def fge_lr(i: int, cycle: int, lr_max: float) -> float:
    """Fast geometric ensembling's triangular schedule (Garipov et al. 2018, eq. 2): step i (from 0) of a
    `cycle`-step cycle goes linearly from lr_max to lr_max / 100 at mid-cycle and back."""
    t = (i % cycle + 1) / cycle
    lo = lr_max / 100
    return (1 - 2 * t) * lr_max + 2 * t * lo if t <= 0.5 else (2 - 2 * t) * lo + (2 * t - 1) * lr_max


def fge_phase(ctx: RunContext, seed: int, name: str = "fge") -> Phase:
    """Fast geometric ensembling's run: SGD (momentum 0.9) on cross-entropy with the cyclic rate `fge_lr`
    (`robust.fge_cycle` steps, largest `robust.fge_lr`) for `ensemble.members` cycles, in train mode, batch t
    from the stream mix_seed(seed, 18). The weights at each cycle's lowest rate are kept in the phase state;
    its result's "members" lists them."""
    cfg, rc = ctx.cfg, ctx.cfg.robust
    k, c = cfg.ensemble.members, rc.fge_cycle
    source = ctx.train_data().batches(cfg.train.batch_size, mix_seed(seed, 18))

    def step(model: nn.Module, opt: torch.optim.Optimizer, t: int, state: PhaseState) -> StepOutput:
        for group in opt.param_groups:
            group["lr"] = fge_lr(t, c, rc.fge_lr)
        with seeded_randomness(model, mix_seed(seed, 8, phase_tag(name), t)):
            xb, yb = source.batch(t)
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


@ENSEMBLE_BASELINES.register("fge")
def fast_geometric_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """Fast geometric ensembling from w0 (`fge_phase`): one network taken at the lowest rate of each of
    `ensemble.members` cycles (one training run: its cost is w0's plus members × cycle steps)."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    steps = cfg.ensemble.members * cfg.robust.fge_cycle
    res = run_path(clone(base), [fge_phase(ctx, seed)], record_every=steps, checkpoint_every=10**9)
    members = []
    for state in res.phase_results["fge"]["members"]:
        m = clone(base)
        m.load_state_dict(state)
        members.append(m.eval())
    return Deployed(Ensemble(members), members, base_seconds + time.perf_counter() - t0, cfg.train.steps + steps)
