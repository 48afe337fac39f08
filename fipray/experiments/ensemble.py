"""FIP robust ensembles vs a deep ensemble of independently trained networks and the base network.

Protocol (shared/PROTOCOLS.md): inputs in [0, 1]; ensembles are attacked through their
log(mean softmax) head with members in eval mode; white-box PGD (≥ 20 steps, random start) on the
deployed ensemble itself and transfer from the base network w0; an ε curve; sanity flags; each
member's own accuracy; diversity and coherence; the compute each ensemble cost.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fipray import report
from fipray._batches import mix_seed
from fipray.config import Config, ConfigError
from fipray.core.distances import get_distance
from fipray.ensemble import Ensemble, save_ensemble
from fipray.eval.diversity import coherence, pairwise_disagreement, representation_diversity
from fipray.eval.robustness import robustness_curve, sanity_flags
from fipray.experiments._common import (
    accuracy,
    build_model,
    clone,
    device_of,
    load_bundle,
    mean_std,
    model_spec,
    path_summary,
    progress_bar,
    tensors,
    train_base,
    write_outputs,
)
from fipray.ops.undirected import select_members, undirected_phase
from fipray.path import run_path


def _loaded_candidates(directory: str, spec: dict, dev: torch.device):
    """Networks of an ensemble folder as FIP candidates (e.g. the union of `fipray paths`' samples)."""
    from fipray.ensemble import load_ensemble, read_ensemble_meta

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


def run(cfg: Config, out: Path, *, progress: bool = True, bundle=None) -> dict:
    dev = device_of(cfg)
    bundle = bundle if bundle is not None else load_bundle(cfg)
    spec = model_spec(cfg, bundle)
    ec = cfg.ensemble
    methods = ["fip", *ec.baselines]
    if not ec.load and cfg.path.steps // ec.sample_every < ec.members:
        raise ConfigError(f"path.steps // ensemble.sample_every = {cfg.path.steps // ec.sample_every} sampled "
                          f"networks < ensemble.members = {ec.members}")
    xtr, ytr = tensors(bundle.train, dev)
    xte, yte = tensors(bundle.test, dev)
    x_eval, y_eval = xte[: ec.eval_examples], yte[: ec.eval_examples]
    g = torch.Generator().manual_seed(0)
    sel_idx = torch.randperm(len(xtr), generator=g)[:256].to(dev)
    rows: list[dict] = []
    curve_rows: list[dict] = []
    path_rows: list[dict] = []
    sanity: dict = {}
    geometry: list[dict] = []
    n_train = 1 + (ec.members if "deep" in methods else 0)
    total = len(cfg.seeds) * (n_train * cfg.train.steps + cfg.path.steps)
    with progress_bar(total, "ensemble", progress) as bar:
        for seed in cfg.seeds:
            base = build_model(spec, seed, dev)
            t0 = time.perf_counter()
            train_base(base, xtr, ytr, cfg, seed, progress=bar)
            base_seconds = time.perf_counter() - t0
            base_clean = accuracy(base, xte, yte)
            targets: dict[str, tuple[torch.nn.Module, list[torch.nn.Module], float, int]] = {}
            # FIP: undirected walk from w0 (or networks loaded from a folder), then the δ rule picks the members.
            t0 = time.perf_counter()
            if ec.load:
                candidates, sample_steps, path_ids, walk_steps = _loaded_candidates(ec.load, spec, dev)
            else:
                walker = clone(base)
                res = run_path(walker, [undirected_phase(xtr, ytr, cfg, seed)],
                               out_dir=out / "paths" / cfg.run_id() / f"seed{seed}",
                               record_every=cfg.path.record_every, checkpoint_every=cfg.path.checkpoint_every,
                               heldout=xte[: cfg.path.heldout], distance=get_distance(cfg.path.distance),
                               evaluate=lambda m: {"accuracy": accuracy(m, xte, yte)}, progress=bar)
                path_rows += [{"seed": seed, **r} for r in res.records]
                geometry.append(path_summary(res.records))
                candidates = []
                for s in res.samples:
                    m = clone(base)
                    m.load_state_dict(s["state"])
                    candidates.append(m.eval())
                sample_steps = [s["global_step"] for s in res.samples]
                path_ids, walk_steps = [seed] * len(candidates), cfg.path.steps
            try:
                keep, h = select_members(candidates, xtr[sel_idx], ytr[sel_idx], members=ec.members,
                                         eps=ec.fgsm_eps, delta=ec.delta, distance=cfg.path.distance)
            except ValueError as e:
                raise ConfigError(f"config key 'ensemble.delta': {e}") from None
            fip_members = [candidates[i] for i in keep]
            fip_seconds = base_seconds + time.perf_counter() - t0
            targets["fip"] = (Ensemble(fip_members), fip_members, fip_seconds, cfg.train.steps + walk_steps)
            save_ensemble(fip_members, out / "ensembles" / f"fip_seed{seed}", model_spec=spec, metadata={
                "operation": "ensemble", "seed": seed, "config_hash": cfg.run_id(),
                "path_ids": [path_ids[i] for i in keep], "steps": [sample_steps[i] for i in keep],
                "fgsm_shift": [h[i] for i in keep], "candidates": len(candidates)})
            if "deep" in methods:
                t0 = time.perf_counter()
                deep = []
                for k in range(ec.members):
                    ms = mix_seed(seed, 7, k)
                    m = build_model(spec, ms, dev)
                    train_base(m, xtr, ytr, cfg, ms, progress=bar)
                    deep.append(m.eval())
                targets["deep"] = (Ensemble(deep), deep, time.perf_counter() - t0, ec.members * cfg.train.steps)
            if "base" in methods:
                targets["base"] = (base.eval(), [base], base_seconds, cfg.train.steps)
            for name, (target, members, secs, grad_steps) in targets.items():
                curve = robustness_curve(target, x_eval, y_eval, list(ec.eps), surrogate=base,
                                         steps=ec.pgd_steps, seed=seed, autoattack=ec.autoattack)
                # Each member's own white-box accuracy (PROTOCOLS.md) on the first 100 examples: K extra
                # attacks per ε would otherwise cost more than attacking the ensemble itself.
                member_wb = {e: float(np.mean([r["whitebox"] for m in members for r in robustness_curve(
                    m, x_eval[:100], y_eval[:100], [e], steps=ec.pgd_steps, seed=seed)])) for e in ec.eps}
                for r in curve:
                    curve_rows.append({"method": name, "seed": seed, **r})
                # The steps comparison (PGD at 10 and 40 steps) runs on the first 100 examples: it
                # checks the attack, not the model, and 40-step PGD on an ensemble is the costliest call.
                flags = sanity_flags(curve, target=target, x=x_eval[:100], y=y_eval[:100], eps=max(ec.eps))
                sanity.setdefault(name, []).append(flags)
                div = representation_diversity(members, x_eval) if len(members) > 1 else {"mean": 0.0}
                member_clean = [accuracy(m, xte, yte) for m in members]
                rows.append({
                    "method": name, "seed": seed, "clean": curve[0]["clean"],  # clean accuracy on x_eval
                    "clean_full_test": accuracy(target, xte, yte),
                    "member_clean_mean": float(np.mean(member_clean)),
                    "member_clean_min": float(np.min(member_clean)),
                    "base_clean": base_clean,
                    "diversity": float(div["mean"]),
                    "coherence": coherence(members, base, x_eval, y_eval),
                    "disagreement": pairwise_disagreement(members, x_eval) if len(members) > 1 else 0.0,
                    "seconds": secs, "gradient_steps": grad_steps, "members": len(members),
                    **{f"member_whitebox_{e:g}": v for e, v in member_wb.items()}})

    eps_keys = [f"{e:g}" for e in ec.eps]

    def curve_mean(method: str, col: str) -> dict:
        return {f"{e:g}": float(np.mean([r[col] for r in curve_rows if r["method"] == method and r["eps"] == e]))
                for e in ec.eps}

    summary_methods = {}
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        summary_methods[m] = {
            "clean_mean": mean_std([r["clean"] for r in sel])[0], "clean_std": mean_std([r["clean"] for r in sel])[1],
            "clean_full_test_mean": mean_std([r["clean_full_test"] for r in sel])[0],
            "member_clean_mean": mean_std([r["member_clean_mean"] for r in sel])[0],
            "member_clean_min": min(r["member_clean_min"] for r in sel),
            "whitebox": curve_mean(m, "whitebox"), "transfer": curve_mean(m, "transfer"),
            "autoattack": curve_mean(m, "autoattack"),
            "member_whitebox": {f"{e:g}": float(np.mean([r[f"member_whitebox_{e:g}"] for r in sel])) for e in ec.eps},
            "diversity": mean_std([r["diversity"] for r in sel])[0],
            "coherence": mean_std([r["coherence"] for r in sel])[0],
            "disagreement": mean_std([r["disagreement"] for r in sel])[0],
            "seconds": float(np.mean([r["seconds"] for r in sel])),
            "gradient_steps": sel[0]["gradient_steps"]}
    sanity_summary = {m: {k: all(f["flags"][k] is not False for f in fl) for k in fl[0]["flags"]}
                      for m, fl in sanity.items()}
    summary = {"operation": "ensemble", "members": ec.members, "seeds": list(cfg.seeds), "eps": eps_keys,
               "pgd_steps": ec.pgd_steps, "eval_examples": len(x_eval), "surrogate": "base network w0",
               "methods": summary_methods, "sanity": sanity_summary,
               "fip_path": {k: float(np.mean([g[k] for g in geometry])) for k in geometry[0]} if geometry else {},
               "loaded_from": ec.load or None,
               "sanity_measurements": {m: [f["measured"] for f in fl] for m, fl in sanity.items()}}
    report.plot_lines({f"{m} white-box": ([float(e) for e in eps_keys], list(v["whitebox"].values()))
                       for m, v in summary_methods.items()}
                      | {f"{m} transfer": ([float(e) for e in eps_keys], list(v["transfer"].values()))
                         for m, v in summary_methods.items() if m != "base"},
                      "ε (L∞)", "robust accuracy", "Robust accuracy vs ε (PGD)", out / "robust_accuracy.png")
    table = [[m, v["clean_mean"], v["member_clean_mean"]] + [v["whitebox"][e] for e in eps_keys]
             + [v["transfer"][e] for e in eps_keys] + [v["coherence"], v["disagreement"], round(v["seconds"], 1)]
             for m, v in summary_methods.items()]
    header = (["method", "clean", "member clean"] + [f"white-box ε={e}" for e in eps_keys]
              + [f"transfer ε={e}" for e in eps_keys] + ["coherence", "disagreement", "seconds"])
    flag_rows = [[m] + [("ok" if v else "FAILED") for v in f.values()] for m, f in sanity_summary.items()]
    md = "\n".join([
        f"# Robust ensembles: {cfg.model.name} on {cfg.data.name}, {ec.members} members", "",
        f"PGD with {ec.pgd_steps} steps and random start; white-box on each deployed model itself "
        f"(ensembles through log(mean softmax), members in eval mode); transfer crafted on the base network w0 "
        f"(so the base network's transfer equals its white-box). {len(x_eval)} test examples (members' own "
        f"white-box accuracy, `member_whitebox` in summary.json: the first 100), seeds "
        f"{list(cfg.seeds)} (means).", "",
        report.md_table(header, table), "", "## Sanity flags", "",
        report.md_table(["method"] + list(next(iter(sanity_summary.values())).keys()), flag_rows), "",
        "Plot: `robust_accuracy.png`. Tables: `results.parquet`, `robustness.parquet`, `path.parquet`. "
        "FIP ensembles: `ensembles/fip_seed*/`.", ""])
    write_outputs(out, cfg, summary, {"results": rows, "robustness": curve_rows, "path": path_rows}, md)
    return summary
