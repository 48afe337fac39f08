"""Robust-ensemble baselines: a deep ensemble of independently trained networks, and the base network.

Each is `(ctx, base, seed, base_seconds) -> Deployed` (the model to attack, its members, its compute),
registered by the name `ensemble.baselines` uses.
"""

from __future__ import annotations

import time

from torch import nn

from fipray._batches import mix_seed
from fipray._registry import Registry
from fipray.ensemble import Ensemble
from fipray.ops.ensemble import Deployed
from fipray.runtime import RunContext, train_base

ENSEMBLE_BASELINES: Registry = Registry("ensemble baseline")


@ENSEMBLE_BASELINES.register("deep")
def deep_ensemble(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """`ensemble.members` networks trained like w0 from independent initialisations and batch orders."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    members = []
    for k in range(cfg.ensemble.members):
        ms = mix_seed(seed, 7, k)
        m = ctx.model(ms)
        train_base(m, ctx.train_data(), None, cfg, ms, progress=ctx.bar)
        members.append(m.eval())
    return Deployed(Ensemble(members), members, time.perf_counter() - t0, cfg.ensemble.members * cfg.train.steps)


@ENSEMBLE_BASELINES.register("base")
def base_network(ctx: RunContext, base: nn.Module, seed: int, base_seconds: float) -> Deployed:
    """The base network w0 alone."""
    return Deployed(base.eval(), [base], base_seconds, ctx.cfg.train.steps)
