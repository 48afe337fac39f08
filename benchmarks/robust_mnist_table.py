"""Robust accuracy on MNIST at L∞ ε = 0.3 beside the published numbers, from `fipray ensemble` runs.

Usage (after the runs; each folder holds the summary.json `fipray ensemble` writes):

    python benchmarks/robust_mnist_table.py runs/ensemble_robust_mnist runs/ensemble_robust_mnist_lenet5 > table.md

One table per run: per method the clean accuracy (full test split), white-box PGD at ε = 0.3 (the run's steps and
restarts), standard AutoAttack at ε = 0.3 (the run's subset), PGD at the other ε, transfer from w0 and from the
independently trained ensemble, the members' own PGD accuracy, their disagreement, and the gradient evaluations
counted from scratch. Then the published rows (AutoAttack's MNIST table; the settings are in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# model -> (clean, PGD as its authors report it, AutoAttack), %: AutoAttack's README MNIST table (ε = 0.3).
PUBLISHED = {
    "Madry et al. 2018 (PGD-40 AT, 100k steps)": (98.53, 89.62, 88.50),
    "TRADES 2019 (100 epochs of 40-step KL attacks)": (99.48, 96.07, 92.81),
    "Wong et al. 2020, fast FGSM (10 epochs)": (98.50, 88.77, 82.93),
}
NAMES = {"fip_robust": "robust FIP ensemble", "base": "w0", "pgd_at": "PGD-AT continued from w0 (same budget)",
         "adv_swa": "SWA of adversarial FGE from w0", "adv_fge": "adversarial FGE from w0 (ensemble)",
         "adv_deep_equal": "deep ensemble of fast-FGSM networks (same total budget)",
         "fast_fgsm": "fast FGSM from scratch", "pgd_at_scratch": "PGD-AT from scratch",
         "deep": "deep ensemble (each trained like w0)", "adv_deep": "adversarial deep ensemble"}


def pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _evals(v: dict) -> str:
    """Gradient evaluations when the run counted them (`ensemble.review`), else the optimizer steps, labelled."""
    if v.get("gradient_evals") is not None:
        return f"{v['gradient_evals']:,}"
    return f"— ({v['gradient_steps']:,} steps)"


def table(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    if "restarts" not in s and (run / "config.yaml").is_file():  # summaries before the key: the run's config
        import yaml

        ens = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("ensemble", {})
        s["restarts"] = ens.get("restarts", 1)
    eps = s["eps"]
    strong = "0.3" if "0.3" in eps else eps[-1]
    others = [e for e in eps if e != strong]
    head = (["method", "clean", f"PGD ε={strong}", f"AutoAttack ε={strong}"] + [f"PGD ε={e}" for e in others]
            + [f"w0→ ε={strong}", f"indep→ ε={strong}", f"members' PGD ε={strong}", "disagreement",
               "gradient evals", "seconds"])
    rows = []
    for m, v in s["methods"].items():
        rows.append([NAMES.get(m, m), pct(v["clean_full_test_mean"]), pct(v["whitebox"][strong]),
                     pct(v["autoattack"][strong])] + [pct(v["whitebox"][e]) for e in others]
                    + [pct(v["transfer"][strong]) if m != "base" else "(white-box)",
                       pct(v.get("transfer_independent", {}).get(strong)), pct(v["member_whitebox"][strong]),
                       f"{v['disagreement']:.4f}", _evals(v),
                       f"{v['seconds']:.0f}"])
    lines = [f"### {run.name}: {s.get('members')} members, seeds {s['seeds']}, {s['eval_examples']} test examples "
             f"(PGD-{s['pgd_steps']}, {s.get('restarts', 1)} restarts at ε = {strong}; AutoAttack on the first "
             f"{s.get('autoattack_examples') or 'all'})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    goals = s.get("goals", {})
    for m, g in goals.items():
        if "c_measured" in g:
            c = g["c_measured"]
            lines += ["", f"Goal (c), {m}: AutoAttack {pct(c['autoattack'])} vs PGD-AT {pct(c['pgd_at_autoattack'])} "
                          f"+ 1 point, at {c['evals_ratio']:.2f}× its gradient evaluations (≤ 1.2×): "
                          f"{'met' if g['c'] else 'NOT met'}."]
    return "\n".join(lines)


def published() -> str:
    lines = ["### Published (AutoAttack's MNIST table, ε = 0.3)", "", "| model | clean | PGD (as reported) | AutoAttack |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {a:.2f} | {b:.2f} | {c:.2f} |" for k, (a, b, c) in PUBLISHED.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join([table(Path(p)) for p in sys.argv[1:]] + [published()]))
