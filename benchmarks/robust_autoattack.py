"""Standard AutoAttack (torchattacks: APGD-CE, APGD-T, FAB-T, Square with 5000 queries) on the robust FIP ensemble
and its baselines, beside the shipped evaluation's PGD and APGD-only AutoAttack, at one ε on a test subset.

The models are rebuilt exactly as `fipray ensemble --config <config>` builds them (same seeds, same code: w0, the
robust FIP ensemble, PGD-AT at its gradient evaluations, the deep ensemble), then attacked on the first
`--examples` test examples. One JSON line per (seed, method) on stdout.

    python benchmarks/robust_autoattack.py --config jobs/configs/ensemble_robust_digits.yaml --seeds 0 \\
        --eps 0.1 --examples 50 --methods fip_robust pgd_at deep
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fipray.baselines.ensemble import ENSEMBLE_BASELINES
from fipray.config import load_config
from fipray.eval.predict import accuracy
from fipray.eval.robustness import robustness_curve
from fipray.ops.ensemble import FIP_ENSEMBLES
from fipray.runtime import RunContext, train_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--examples", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=["fip_robust", "pgd_at"],
                    help="fip_robust (the config's ensemble.fip) and/or baselines (pgd_at, deep, ...)")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    torch.set_num_threads(cfg.threads or 1)
    ec = cfg.ensemble
    for seed in args.seeds:
        ctx = RunContext.create(cfg)
        xte, yte = ctx.test_tensors()
        x, y = xte[: args.examples], yte[: args.examples]
        base = ctx.model(seed)
        train_base(base, ctx.train_data(), None, cfg, seed)
        base.eval()
        for method in args.methods:
            if method == "fip_robust":
                d = FIP_ENSEMBLES.get(ec.fip)(ctx, base, seed, 0.0, {"path": [], "geometry": []})
            else:
                d = ENSEMBLE_BASELINES.get(method)(ctx, base, seed, 0.0)
            row = {"seed": seed, "method": method, "eps": args.eps, "n": len(x), "gradient_evals": d.evals,
                   "clean_full_test": accuracy(d.target, xte, yte), "clean": accuracy(d.target, x, y)}
            for version in ("apgd", "standard"):
                t0 = time.perf_counter()
                r = robustness_curve(d.target, x, y, [args.eps], steps=ec.pgd_steps, restarts=ec.restarts, seed=seed,
                                     autoattack=True, autoattack_version=version)[0]
                row |= {"pgd": r["whitebox"], f"autoattack_{version}": r["autoattack"],
                        f"seconds_{version}": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
