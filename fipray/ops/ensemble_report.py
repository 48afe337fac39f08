"""The ensemble operation's summary and report: means over seeds, summary.json, report.md and its plots,
and the review's tables and goals (`ensemble.review`).

`fipray.ops.ensemble` computes the rows (one per method and seed); everything here only reads them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fipray import report
from fipray.config import Config
from fipray.eval.robustness import ACCURACY_FLAGS, NOT_EVALUATED, flag_verdict, mark_not_evaluated, smoke_size
from fipray.runtime import RunContext, mean_std, write_outputs


def aggregate(cfg: Config, methods: list[str], rows: dict[str, list], eval_examples: int) -> dict:
    """summary.json of an ensemble run: per method the means over seeds, the sanity flags, the path geometry."""
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
    # The flags' examples are the first 100 of the evaluation set (fipray.ops.ensemble); a smoke run's are too few.
    smoke = smoke_size(min(eval_examples, 100), ec.pgd_steps)
    sanity: dict[str, list] = {}
    for name, flags in rows["sanity"]:
        sanity.setdefault(name, []).append(mark_not_evaluated(flags, smoke) if smoke else flags)
    geometry = rows["geometry"]
    return {"operation": "ensemble", "members": ec.members, "seeds": list(cfg.seeds),
            "eps": [f"{e:g}" for e in ec.eps], "pgd_steps": ec.pgd_steps,
            "eval_examples": eval_examples,
            "surrogate": "base network w0", "methods": per_method,
            "sanity": {m: {k: _all_seeds([f["flags"][k] for f in fl]) for k in fl[0]["flags"]}
                       for m, fl in sanity.items()},
            "fip_path": {k: float(np.mean([g[k] for g in geometry])) for k in geometry[0]} if geometry else {},
            "loaded_from": ec.load or None,
            "sanity_measurements": {m: [f["measured"] for f in fl] for m, fl in sanity.items()}} \
        | ({"sanity_not_evaluated": smoke} if smoke else {}) \
        | (review_summary(cfg, methods, rows, per_method, curve_mean) if ec.review else {})

def _all_seeds(verdicts: list[bool | None]) -> bool | None:
    """One flag over the seeds: False if any seed failed, None if none was checked, else True."""
    if any(v is False for v in verdicts):
        return False
    return None if all(v is None for v in verdicts) else True


def write_report(ctx: RunContext, summary: dict, rows: dict[str, list]) -> None:
    """report.md, the plots and the tables of an ensemble run."""
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
    smoke = summary.get("sanity_not_evaluated")
    flag_rows = [[m] + [flag_verdict(v, bool(smoke) and k in ACCURACY_FLAGS) for k, v in f.items()]
                 for m, f in sanity.items()]
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
        *([f"Accuracy flags {NOT_EVALUATED}: {smoke}.", ""] if smoke else []),
        "Plot: `robust_accuracy.png`. Tables: `results.parquet`, `robustness.parquet`, `path.parquet`. "
        f"FIP ensembles: `ensembles/{'fip_robust' if cfg.ensemble.fip == 'robust' else 'fip'}_seed*/`.", ""])
    if ec.review:
        plot_compute(summary, out / "robust_vs_compute.png")
        md += review_report(summary)
    write_outputs(out, cfg, summary, {k: rows[k] for k in ("results", "robustness", "path")}, md)


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
    c: AutoAttack accuracy >= PGD-AT's + 1 point, with at most 1.2× its gradient evaluations (and clean_ok);
       only where both ran AutoAttack at ε = `e`.
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
        aa, at_aa = v.get("autoattack", {}).get(e, math.nan), (at or {}).get("autoattack", {}).get(e, math.nan)
        if at is not None and not (math.isnan(aa) or math.isnan(at_aa)):
            g["c"] = bool(aa >= at_aa + 0.01
                          and v["gradient_evals"] <= 1.2 * at["gradient_evals"] and clean_ok is not False)
            g["c_measured"] = {"autoattack": aa, "pgd_at_autoattack": at_aa,
                               "evals_ratio": v["gradient_evals"] / at["gradient_evals"]}
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
            f"its evaluations: {'met' if g.get('b') else 'NOT met'}."
            + (f" (c) AutoAttack {g['c_measured']['autoattack']:.3f} vs PGD-AT "
               f"{g['c_measured']['pgd_at_autoattack']:.3f} + 0.01 at {g['c_measured']['evals_ratio']:.2f}× its "
               f"evaluations (≤ 1.2×): {'met' if g['c'] else 'NOT met'}." if "c" in g else ""))
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
