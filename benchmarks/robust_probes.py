"""Probes of the robust FIP ensemble against PGD-AT at the same gradient evaluations, scored on held-out
*training* examples (`robust.validation`), never on the test split.

For each variant (dotted overrides of a config) and seed: w0 trained on the training split minus the held-out
examples, the variant's robust FIP ensemble and PGD-AT of w0 at the variant's budget (`fip_budget`), then clean
accuracy and white-box PGD (ensemble.pgd_steps, ensemble.restarts) at ensemble.focus_eps on the held-out examples,
plus each member's own white-box accuracy in path order. One JSON line per (variant, seed) on stdout.

    python benchmarks/robust_probes.py --config jobs/configs/ensemble_robust_digits.yaml --seeds 0 \\
        --variant today= --variant noclean=robust.clean_pass=false
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import torch

from fipray.baselines.ensemble import pgd_at
from fipray.config import load_config
from fipray.deployment import fip_budget
from fipray.eval.predict import accuracy
from fipray.eval.robustness import robustness_curve
from fipray.ops.robust import robust_fip_ensemble, validation_context
from fipray.runtime import RunContext, train_base


def whitebox(m: torch.nn.Module, *, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, seed: int,
             restarts: int) -> float:
    return robustness_curve(m, x, y, [eps], steps=steps, seed=seed, restarts=restarts)[0]["whitebox"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--validation", type=int, default=150, help="held-out training examples scored on")
    ap.add_argument("--variant", action="append", default=[],
                    help="name=key=value,key=value (name= alone: the config as it is)")
    ap.add_argument("--at-lr", type=float, nargs="*", default=[],
                    help="also PGD-AT (same budget) at these learning rates (robust.at_lr)")
    ap.add_argument("--no-pgd-at", action="store_true", help="skip PGD-AT (e.g. when a variant repeats a budget)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for v in args.variant or ["config="]:
        name, _, rest = v.partition("=")
        over = [o for o in rest.split(",") if o]
        cfg = load_config(args.config, [*over, f"robust.validation={args.validation}"])
        ec = cfg.ensemble
        for seed in args.seeds:
            t0 = time.perf_counter()
            ctx = validation_context(RunContext.create(cfg), args.validation)
            xv, yv = ctx.test_tensors()
            base = ctx.model(seed)
            train_base(base, ctx.train_data(), None, cfg, seed)
            base.eval()
            out: dict = {"path": [], "geometry": []}
            d = robust_fip_ensemble(ctx, base, seed, 0.0, out)
            wb = functools.partial(whitebox, x=xv, y=yv, eps=ec.focus_eps, steps=ec.pgd_steps, seed=seed,
                                   restarts=ec.restarts)

            row = {"variant": name, "overrides": over, "seed": seed, "fip_evals": d.evals, "budget": fip_budget(cfg),
                   "base_clean": accuracy(base, xv, yv), "fip_clean": accuracy(d.target, xv, yv),
                   "fip_wb": wb(d.target), "members_wb": [round(wb(m), 3) for m in d.members]}
            if not args.no_pgd_at:
                at = pgd_at(ctx, base, seed, 0.0)
                row |= {"pgd_at_evals": at.evals, "pgd_at_clean": accuracy(at.target, xv, yv), "pgd_at_wb": wb(at.target)}
            for lr in args.at_lr:
                at = pgd_at(dataclasses.replace(ctx, cfg=cfg.replace(**{"robust.at_lr": lr})), base, seed, 0.0)
                row |= {f"pgd_at_lr{lr}_clean": accuracy(at.target, xv, yv), f"pgd_at_lr{lr}_wb": wb(at.target)}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
