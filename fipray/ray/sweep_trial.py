"""What one sweep trial computes, without Ray: the operation's FIP over the config's seeds, reporting.

A trial runs exactly the FIP method of the core experiment (same data, base network, phases and
seeds; baselines skipped), so its final metric equals what `fipray continual|sparsify|ensemble` reports
for FIP with the same config. `report(metrics)` is called once per iteration (Tune's training
iteration; ASHA stops trials at iterations), each metric a running mean over the work done so far:

- continual: an iteration per task phase per seed (seeds × (T−1) in all); `acc_mean` is the mean over
  seeds of the class-incremental accuracy on the tasks seen so far, so the last report is the ACC mean
  (`task_acc_mean`: task-incremental; `bwt_mean`: backward transfer over the tasks seen so far);
- sparsify: an iteration per seed; `accuracy` and `sparsity` at `sweep.target` (default the largest target);
- ensemble: an iteration per seed; `whitebox`, `transfer` (crafted on w0) and `clean` accuracy of the
  FIP ensemble at `sweep.eps` (default the largest of `ensemble.eps`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fipray.config import Config

Report = Callable[[dict], None]


def iterations(cfg: Config) -> int:
    """How many reports a full trial makes (ASHA's max_t)."""
    if cfg.operation == "continual":
        return len(cfg.seeds) * (cfg.continual.num_tasks - 1)
    return len(cfg.seeds)


def run_trial(cfg: Config, report: Report, *, eps: float = 0.0, target: float = 0.0) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    {"continual": _continual, "sparsify": _sparsify, "ensemble": _ensemble,
     "undirected": _ensemble}[cfg.operation](cfg, report, eps=eps, target=target)


def _continual(cfg: Config, report: Report, **_: float) -> None:
    from fipray.core.distances import get_distance
    from fipray.eval.continual import cl_metrics, task_accuracy
    from fipray.experiments._common import build_model, clone, device_of, load_bundle, model_spec, train_base
    from fipray.experiments.continual import build_tasks
    from fipray.ops.continual import evaluate_row, fip_continual_phases, seen_classes
    from fipray.path import run_path

    dev = device_of(cfg)
    bundle = load_bundle(cfg)
    spec = model_spec(cfg, bundle)
    done: dict[str, list[float]] = {"class": [], "task": [], "bwt": []}
    for seed in cfg.seeds:
        tasks = build_tasks(cfg, bundle, dev, seed)
        base = build_model(spec, seed, dev)
        rand = [task_accuracy(base, t.x_test, t.y_test, seen_classes(tasks, j)) for j, t in enumerate(tasks)]
        train_base(base, tasks[0].x_train, tasks[0].y_train, cfg, seed)
        rows = {0: evaluate_row(base, tasks, 0)}
        last = len(tasks) - 1

        def on_event(event: str, payload: dict, rows=rows, rand=rand, seed=seed, last=last) -> None:
            if event != "phase_end":
                return
            i = int(payload["phase"][len("task"):])
            rows[i] = payload
            R = np.array([rows[r]["class"][: i + 1] for r in range(i + 1)])
            cur = {"class": float(np.mean(R[i])), "task": float(np.mean(rows[i]["task"][: i + 1])),
                   "bwt": cl_metrics(R, np.array(rand[: i + 1]))["bwt"]}
            m = {f"{k}": float(np.mean(done[k] + [v])) for k, v in cur.items()}
            report({"acc_mean": m["class"], "task_acc_mean": m["task"], "bwt_mean": m["bwt"],
                    "seed": seed, "task": i})
            if i == last:
                for k, v in cur.items():
                    done[k].append(v)

        run_path(clone(base), fip_continual_phases(tasks, cfg, seed), record_every=10**9,
                 checkpoint_every=10**9, distance=get_distance(cfg.path.distance), callback=on_event)


def _sparsify(cfg: Config, report: Report, *, target: float = 0.0, **_: float) -> None:
    from fipray.core.step import Anchor
    from fipray.eval.sparsity import sparsity
    from fipray.experiments._common import (
        accuracy,
        build_model,
        clone,
        device_of,
        load_bundle,
        model_spec,
        tensors,
        train_base,
    )
    from fipray.ops.sparsify import counted, fip_sparsify_phases
    from fipray.path import run_path

    dev = device_of(cfg)
    bundle = load_bundle(cfg)
    spec = model_spec(cfg, bundle)
    xtr, ytr = tensors(bundle.train, dev)
    xte, yte = tensors(bundle.test, dev)
    p = target or max(cfg.sparsify.targets)
    accs, sps = [], []
    for seed in cfg.seeds:
        base = build_model(spec, seed, dev)
        train_base(base, xtr, ytr, cfg, seed)
        names = counted(base, cfg.sparsify.exclude_head)
        model = clone(base)
        run_path(model, fip_sparsify_phases(xtr, Anchor.from_model(base, xtr), p, cfg, seed, names),
                 record_every=10**9, checkpoint_every=10**9)
        accs.append(accuracy(model, xte, yte))
        sps.append(sparsity(model, names))
        report({"accuracy": float(np.mean(accs)), "sparsity": float(np.mean(sps)), "seed": seed})


def _ensemble(cfg: Config, report: Report, *, eps: float = 0.0, **_: float) -> None:
    from fipray.ensemble import Ensemble
    from fipray.eval.robustness import robustness_curve
    from fipray.experiments._common import (
        build_model,
        clone,
        device_of,
        load_bundle,
        model_spec,
        tensors,
        train_base,
    )
    from fipray.ops.undirected import select_members, undirected_phase
    from fipray.path import run_path

    dev = device_of(cfg)
    bundle = load_bundle(cfg)
    spec = model_spec(cfg, bundle)
    ec = cfg.ensemble
    e = eps or max(ec.eps)
    xtr, ytr = tensors(bundle.train, dev)
    xte, yte = tensors(bundle.test, dev)
    x_eval, y_eval = xte[: ec.eval_examples], yte[: ec.eval_examples]
    sel_idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:256].to(dev)
    got: dict[str, list[float]] = {"whitebox": [], "transfer": [], "clean": []}
    for seed in cfg.seeds:
        base = build_model(spec, seed, dev)
        train_base(base, xtr, ytr, cfg, seed)
        res = run_path(clone(base), [undirected_phase(xtr, ytr, cfg, seed)], record_every=10**9,
                       checkpoint_every=10**9)
        candidates = []
        for s in res.samples:
            m = clone(base)
            m.load_state_dict(s["state"])
            candidates.append(m.eval())
        keep, _h = select_members(candidates, xtr[sel_idx], ytr[sel_idx], members=ec.members,
                                 eps=ec.fgsm_eps, delta=ec.delta, distance=cfg.path.distance)
        curve = robustness_curve(Ensemble([candidates[i] for i in keep]), x_eval, y_eval, [e],
                                 surrogate=base.eval(), steps=ec.pgd_steps, seed=seed)
        for k in got:
            got[k].append(float(curve[0][k]))
        report({k: float(np.mean(v)) for k, v in got.items()} | {"seed": seed, "eps": e})
