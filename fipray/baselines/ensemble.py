"""Robust-ensemble baselines: a deep ensemble of independently trained networks, the base network, and the
robust FIP's compute-matched baselines: fast geometric ensembling (cyclic learning rate from w0, one run), PGD
adversarial training of one network, and an adversarially trained deep ensemble.

Each is `(ctx, base, seed, base_seconds) -> Deployed` (the model to attack, its members, its compute),
registered by the name `ensemble.baselines` uses.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from fipray.config import Config
from fipray.data.batches import mix_seed
from fipray.ensemble import Ensemble
from fipray.ops.ensemble import Deployed, trained_like_w0
from fipray.optim import make_optimizer
from fipray.registry import Registry
from fipray.runtime import RunContext, clone

ENSEMBLE_BASELINES: Registry = Registry("ensemble baseline")


def _deep_members(ctx: RunContext, seed: int) -> tuple[list[nn.Module], float]:
    """The deep ensemble's members for `seed` and the seconds they took, trained once per run: the adversarial
    deep ensemble starts from copies of the same networks (and is charged their cost)."""
    def train() -> tuple[list[nn.Module], float]:
        t0 = time.perf_counter()
        members = trained_like_w0(ctx, seed, 7)
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
def fip_budget(cfg: Config) -> int:
    """Gradient evaluations after w0 that the robust FIP ensemble spends (its paths and the δ rule), or
    `robust.at_evals` when set: the budget PGD-AT and the adversarial deep ensemble get."""
    from fipray.ops.robust import candidates_per_path, path_evals

    if cfg.robust.at_evals:
        return cfg.robust.at_evals
    candidates = cfg.robust.paths * candidates_per_path(cfg)
    return cfg.robust.paths * path_evals(cfg) + candidates * math.ceil(256 / cfg.path.batch_size)


def adversarial_training(ctx: RunContext, model: nn.Module, seed: int, steps: int) -> nn.Module:
    """PGD adversarial training (Madry et al.): `steps` updates of cross-entropy on PGD examples crafted
    against the current weights (the robust FIP's attack: `robust.train_eps`, `attack_steps`, `step_size`),
    with the training recipe's optimizer and learning rate (or `robust.at_lr`), in train mode. Returns the model in eval mode."""
    from fipray.ops.robust import pgd_examples

    cfg = ctx.cfg
    source = ctx.train_data().batches(cfg.train.batch_size, mix_seed(seed, 16))
    lr = cfg.robust.at_lr or cfg.train.lr
    opt = make_optimizer(cfg.train.optimizer, model.parameters(), lr, cfg.train.weight_decay)
    model.train()
    for t in range(steps):
        xb, yb = source.batch(t)
        x_adv = pgd_examples(model, xb, yb, cfg.robust, torch.Generator().manual_seed(mix_seed(seed, 17, t)))
        loss = F.cross_entropy(model(x_adv), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


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


@ENSEMBLE_BASELINES.register("fge")
def fast_geometric_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """Fast geometric ensembling from w0: SGD (momentum 0.9) with a cyclic learning rate (`robust.fge_cycle`
    steps, largest `robust.fge_lr`), one network taken at the lowest rate of each of `ensemble.members` cycles
    (one training run: its cost is w0's plus members × cycle steps)."""
    cfg, rc = ctx.cfg, ctx.cfg.robust
    k, c = cfg.ensemble.members, rc.fge_cycle
    t0 = time.perf_counter()
    m = clone(base).train()
    opt = torch.optim.SGD(m.parameters(), lr=rc.fge_lr, momentum=0.9)
    source = ctx.train_data().batches(cfg.train.batch_size, mix_seed(seed, 18))
    members = []
    for i in range(k * c):
        for group in opt.param_groups:
            group["lr"] = fge_lr(i, c, rc.fge_lr)
        xb, yb = source.batch(i)
        loss = F.cross_entropy(m(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % c + 1 == c // 2:  # mid-cycle: the lowest learning rate
            members.append(clone(m).eval())
    return Deployed(Ensemble(members), members, base_seconds + time.perf_counter() - t0,
                    cfg.train.steps + k * c)
