"""One sweep trial's FIP path(s) in stretches, without Ray: the unit population-based training moves.

    trial = PathTrial(cfg, work_dir, trial_id="a", params={"path.lam": 10.0}, validation=0.2)
    m = trial.advance(150)          # 150 more steps on every seed's path; metrics on the validation split
    trial.save(folder)              # what another trial may copy: the path checkpoint(s), trial.json, lineage.json
    other.restore(folder)           # exploit: continue the leader's path ...
    other.set_params({"path.lam": 12.0})   # ... explore: with new λ (the optimizer keeps its Adam moments)

A trial is the operation's FIP path from the base network w0 for each seed of `cfg.seeds` (the paths of
`fipray paths`: `Operation.path`), advanced in lock-step. Each stretch is `run_path` resumed from the seed's
`checkpoint.pt` and stopped at the target step right after the checkpoint it writes there, so a path run in
stretches, saved and restored in between, ends with the very weights of the path run in one go (batches and
randomness are functions of (seed, step)). New values of the knobs take effect at the next stretch: the phases
are rebuilt from the new config, and the running phase's optimizer takes the new hyperparameters (η) on top of
the state it resumes (Adam moments).

Scores come from a builder registered per operation (`PATH_TRIALS`), on the context of a sweep trial
(`fipray.units.trial_context`): the training split less a held-out validation part, which is scored; the test
split is never read. continual: the class-incremental ACC over the tasks seen so far (`metrics_so_far`, the
current task's row of R measured on the network now); ensemble: the sweep trial's white-box / clean / transfer
accuracy of the ensemble the δ rule picks from the walk's samples so far. Over seeds: the mean.

Lineage: `lineage.json` lists the segments of the path this trial holds, [{trial_id, parent, forked_at_step,
params}, ...]: segment k ran from its `forked_at_step` with `params`, on the path `parent` held then. It travels
with the checkpoint, so a trial that copies another's path inherits that path's history. `run_schedule` replays
a lineage (or any schedule of params) as one path: the check that an exploited path is exactly that path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fipray.atomic import atomic_write, atomic_write_json
from fipray.config import Config, ConfigError
from fipray.models import load_state_dict_file
from fipray.operation import get_operation
from fipray.path import Phase, load_checkpoint, run_path
from fipray.registry import Registry
from fipray.runtime import RunContext
from fipray.units import trial_context

TRIAL_FILE = "trial.json"
LINEAGE_FILE = "lineage.json"
BASE_FILE = "base.safetensors"


class PathTrialBuilder:
    """What one operation adds to a path trial: the information its scores need, and the scores."""

    metrics: tuple[str, ...] = ()

    def start(self, ctx: RunContext, base: nn.Module, seed: int) -> dict:
        """JSON information kept with the trial, taken from the trained base network (e.g. row 0 of R)."""
        return {}

    def score(self, ctx: RunContext, model: nn.Module, seed: int, folder: Path, ckpt: dict | None, info: dict,
              options: dict) -> dict[str, float]:
        """The seed's metrics for the network `model` now (its path checkpoint `ckpt` in `folder`)."""
        raise NotImplementedError


PATH_TRIALS: Registry[Callable[[], PathTrialBuilder]] = Registry("path trial operation")


def _continual_tasks(ctx: RunContext, seed: int) -> Any:
    from fipray.ops.continual import build_tasks

    stream, head, columns = ctx.memos["stream"]
    cache: dict = ctx.memo("test_inputs", dict)
    # The memo the operation's own path fills: one copy of the task tensors for phases and scores.
    return ctx.memo(f"tasks/{seed}", lambda: build_tasks(ctx.cfg, ctx.bundle, ctx.device, seed, stream=stream,
                                                         head=head, columns=columns, test_cache=cache))


@PATH_TRIALS.register("continual")
class ContinualPathTrial(PathTrialBuilder):
    """FIP phases of tasks 1..T−1 from the base network; ACC (class-incremental) over the tasks seen so far."""

    metrics = ("acc_mean", "task_acc_mean", "bwt_mean")

    def start(self, ctx: RunContext, base: nn.Module, seed: int) -> dict:
        from fipray.eval.continual import evaluate_row, random_rows

        tasks = _continual_tasks(ctx, seed)
        rand = random_rows(ctx.model(seed), tasks)["class"]  # the untrained network: the BWT reference
        return {"row0": evaluate_row(base, tasks, 0), "rand": rand}

    def score(self, ctx: RunContext, model: nn.Module, seed: int, folder: Path, ckpt: dict | None, info: dict,
              options: dict) -> dict[str, float]:
        from fipray.eval.continual import evaluate_row, metrics_so_far

        tasks = _continual_tasks(ctx, seed)
        # Phase p is task p + 1; a checkpoint at a phase boundary (phase_step 0) is after task `phase`.
        i = 0 if ckpt is None else ckpt["phase"] + (ckpt["phase_step"] > 0)
        rows = {0: info["row0"], **{int(k[len("task"):]): v for k, v in (ckpt or {}).get("phase_results", {}).items()
                                    if k.startswith("task")}}
        if i > 0:
            rows[i] = evaluate_row(model, tasks, i)
        cur = metrics_so_far(rows, info["rand"], i)
        return {"acc_mean": cur["class"], "task_acc_mean": cur["task"], "bwt_mean": cur["bwt"], "task": float(i)}


@PATH_TRIALS.register("ensemble")
class EnsemblePathTrial(PathTrialBuilder):
    """The undirected walk from the base network; the ensemble the δ rule picks from the samples so far,
    attacked as the sweep trial attacks it (white-box PGD at `sweep.eps`, transfer from w0, clean)."""

    metrics = ("whitebox", "clean", "transfer")

    def score(self, ctx: RunContext, model: nn.Module, seed: int, folder: Path, ckpt: dict | None, info: dict,
              options: dict) -> dict[str, float]:
        from fipray.deployment import select_members, selection_inputs
        from fipray.ensemble import Ensemble
        from fipray.eval.robustness import robustness_curve

        cfg, ec = ctx.cfg, ctx.cfg.ensemble
        candidates = []
        for s in (ckpt or {}).get("samples", []):
            m = ctx.model(seed)
            m.load_state_dict(load_state_dict_file(folder / s["file"]))
            candidates.append(m.eval())
        candidates = candidates or [model.eval()]  # nothing sampled yet: the walk's network alone
        xs, ys = selection_inputs(ctx.train_data())
        e = float(options.get("eps") or max(ec.eps))
        try:
            keep, _ = select_members(candidates, xs, ys, members=min(ec.members, len(candidates)), eps=ec.fgsm_eps,
                                     delta=ec.delta, distance=cfg.path.distance)
        except ValueError:  # too few samples pass δ yet: no ensemble to score at this step
            return {k: math.nan for k in self.metrics} | {"eps": e}
        base = _load_base(ctx, seed, folder)
        xte, yte = ctx.test_split().head(ec.eval_examples)  # the validation part (trial_context)
        curve = robustness_curve(Ensemble([candidates[i] for i in keep]), xte, yte, [e], surrogate=base.eval(),
                                 steps=ec.pgd_steps, seed=seed)
        return {k: float(curve[0][k]) for k in self.metrics} | {"eps": e}


def path_trial_operations() -> list[str]:
    """The operations a path trial (and so PBT) runs."""
    return PATH_TRIALS.names()


def _load_base(ctx: RunContext, seed: int, folder: Path) -> nn.Module:
    m = ctx.model(seed)
    m.load_state_dict(load_state_dict_file(folder / BASE_FILE))
    return m


def _save_base(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


class _Stop(Exception):
    """Raised from `run_path`'s callback right after the checkpoint at the stretch's last step."""


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _new_hyperparameters(make: Callable[[nn.Module], torch.optim.Optimizer]) -> Callable[[nn.Module],
                                                                                        torch.optim.Optimizer]:
    """An optimizer factory whose optimizer keeps its fresh hyperparameters (lr, betas, weight decay: the new
    config's) when a checkpoint's state is loaded into it; the state itself (Adam moments, step) is loaded."""

    def build(model: nn.Module) -> torch.optim.Optimizer:
        opt = make(model)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

        def keep(o: torch.optim.Optimizer) -> None:
            for g, f in zip(o.param_groups, fresh):
                g.update(f)

        opt.register_load_state_dict_post_hook(keep)
        return opt

    return build


class PathTrial:
    """A trial's FIP paths (one per seed of `cfg.seeds`) in `work_dir`, advanced in stretches.

    Args:
        cfg: the trial's config (its `params` already applied).
        work_dir: the trial's folder: `seed<s>/` (path checkpoint, samples, base network), trial.json, lineage.json.
        trial_id: this trial's name in the lineage.
        params: the knobs a scheduler may change (dotted config keys -> values), as in `cfg`.
        method, validation, validation_seed, eps, target: the sweep's trial options (`SweepConfig.options()`);
            the method must be "fip".
        bundle, device: the data (None: `cfg.data`) and the device (None: `cfg.device`).
    """

    def __init__(self, cfg: Config, work_dir: str | Path, *, trial_id: str = "trial", params: dict | None = None,
                 method: str = "fip", validation: float = 0.2, validation_seed: int = 0, bundle: Any = None,
                 device: Any = None, **options: Any):
        if method != "fip":
            raise ConfigError(f"config key 'sweep.method': a path trial follows FIP paths, not {method!r}")
        try:
            self.builder = PATH_TRIALS.get(cfg.operation)()
        except KeyError:
            raise ConfigError(f"config key 'operation': {cfg.operation!r} has no path trial; path trials run "
                              f"{', '.join(path_trial_operations())}") from None
        get_operation(cfg.operation).check_sweep(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.work, self.trial_id = cfg, Path(work_dir), trial_id
        self.params = {k: _plain(v) for k, v in (params or {}).items()}
        self.options = dict(options)
        self.ctx = trial_context(cfg, validation=validation, validation_seed=validation_seed, bundle=bundle,
                                 device=device)
        self.seeds = [int(s) for s in cfg.seeds]
        self.step, self.seconds, self.evals, self.retuned = 0, 0.0, 0, False
        self.last: dict[str, float] = {}
        self.info: dict[str, dict] = {}
        self.lineage = [{"trial_id": trial_id, "parent": None, "forked_at_step": 0, "params": dict(self.params)}]
        self._models: dict[int, nn.Module] = {}
        self.shape = {s: [(p.name, p.steps) for p in self._build(s, self.ctx.model(s))] for s in self.seeds}
        self.total_steps = max(sum(n for _, n in sh) for sh in self.shape.values())

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.builder.metrics

    def _folder(self, seed: int) -> Path:
        return self.work / f"seed{seed}"

    def _build(self, seed: int, model: nn.Module) -> list[Phase]:
        return get_operation(self.cfg.operation).path(self.ctx, model, seed)[0]

    def _phases(self, seed: int, model: nn.Module) -> list[Phase]:
        phases = self._build(seed, model)
        if [(p.name, p.steps) for p in phases] != self.shape[seed]:
            raise ConfigError(f"the new values {self.params} change the phases of the path "
                              f"({self.shape[seed]}); a trial can only continue a path of the same schedule")
        if self.retuned:
            phases = [dataclasses.replace(p, optimizer=_new_hyperparameters(p.optimizer)) for p in phases]
        return phases

    def _model(self, seed: int) -> nn.Module:
        """The seed's network now: the base network (trained into `seed<s>/base.safetensors` the first time) with
        the weights of the path's checkpoint, once there is one."""
        if seed not in self._models:
            d = self._folder(seed)
            d.mkdir(parents=True, exist_ok=True)
            if not (d / BASE_FILE).is_file():
                base = self.ctx.model(seed)
                get_operation(self.cfg.operation).train_base(self.ctx, base, seed)
                self.info[str(seed)] = self.builder.start(self.ctx, base, seed)
                _save_base(base, d / BASE_FILE)
                self._write_state()
            model = _load_base(self.ctx, seed, d)
            ckpt = load_checkpoint(d)
            if ckpt is not None:
                model.load_state_dict(ckpt["model"])
            self._models[seed] = model
        return self._models[seed]

    def _run_seed(self, seed: int, target: int) -> None:
        model = self._model(seed)
        ckpt = load_checkpoint(self._folder(seed))
        if target <= (ckpt["global_step"] if ckpt else 0):
            return

        def stop(event: str, payload: dict) -> None:
            if event == "checkpoint" and payload["global_step"] >= target:
                raise _Stop

        from fipray.core.distances import get_distance

        try:
            # Checkpoints every `target` steps: the first one after the resumed step is the stretch's end.
            run_path(model, self._phases(seed, model), out_dir=self._folder(seed), record_every=10**9,
                     checkpoint_every=target, distance=get_distance(self.cfg.path.distance), callback=stop)
        except _Stop:
            pass

    def advance(self, steps: int) -> dict[str, float]:
        """Run `steps` more path steps (fewer at the path's end) on every seed's path; the metrics after them
        (each the mean over seeds), with `path_step`, the compute of the path held (`grad_evals`: optimizer steps
        of every seed, base networks included; `trial_seconds`, scoring included; both inherited with a copied
        path) and `stretch_grad_evals`, the optimizer steps this call ran."""
        from fipray.eval.compute import StepCounter

        t0 = time.perf_counter()
        target = min(self.step + int(steps), self.total_steps)
        with StepCounter() as counter:
            for seed in self.seeds:
                self._run_seed(seed, target)
        self.step, self.retuned, self.evals = target, False, self.evals + counter.steps
        per_seed = []
        for seed in self.seeds:
            d = self._folder(seed)
            ckpt = load_checkpoint(d)
            per_seed.append(self.builder.score(self.ctx, self._models[seed], seed, d, ckpt, self.info[str(seed)],
                                               self.options))
        self.seconds += time.perf_counter() - t0
        self.last = {k: float(np.mean([m[k] for m in per_seed])) for k in per_seed[0]}
        self.last.update(path_step=float(self.step), trial_seconds=self.seconds, grad_evals=float(self.evals),
                         stretch_grad_evals=float(counter.steps))
        self._write_state()
        return dict(self.last)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def _write_state(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.work / TRIAL_FILE, {
            "trial_id": self.trial_id, "operation": self.cfg.operation, "seeds": self.seeds, "step": self.step,
            "total_steps": self.total_steps, "params": self.params, "retuned": self.retuned, "seconds": self.seconds,
            "grad_evals": self.evals,
            "info": self.info, "last": self.last})
        atomic_write_json(self.work / LINEAGE_FILE, self.lineage)

    def save(self, folder: str | Path) -> Path:
        """Copy the trial (every seed's checkpoint, samples and base network, trial.json, lineage.json) to `folder`."""
        self._write_state()
        folder = Path(folder)
        shutil.copytree(self.work, folder, dirs_exist_ok=True)
        return folder

    def restore(self, folder: str | Path) -> None:
        """Continue the path saved in `folder`: this trial's own (a restart) or another trial's (an exploit:
        a lineage segment with that trial as parent starts here, with its params until `set_params`)."""
        folder = Path(folder)
        state = json.loads((folder / TRIAL_FILE).read_text())
        if state["operation"] != self.cfg.operation or state["seeds"] != self.seeds:
            raise ValueError(f"{folder} holds a {state['operation']} trial of seeds {state['seeds']}, not a "
                             f"{self.cfg.operation} trial of seeds {self.seeds}")
        if self.work.resolve() != folder.resolve():
            shutil.rmtree(self.work, ignore_errors=True)
            shutil.copytree(folder, self.work)
        self._models = {}
        self.step, self.seconds, self.retuned = int(state["step"]), float(state["seconds"]), bool(state["retuned"])
        self.evals = int(state["grad_evals"])
        self.info, self.last = state["info"], state["last"]
        self.lineage = json.loads((folder / LINEAGE_FILE).read_text())
        self._set(state["params"])
        if self.lineage[-1]["trial_id"] != self.trial_id:
            self.lineage.append({"trial_id": self.trial_id, "parent": self.lineage[-1]["trial_id"],
                                 "forked_at_step": self.step, "params": dict(self.params)})
        self._write_state()

    def _set(self, params: dict) -> bool:
        changed = {k: _plain(v) for k, v in params.items() if self.params.get(k) != _plain(v)}
        if changed:
            self.params.update(changed)
            self.cfg = self.cfg.replace(**changed)
            self.ctx = dataclasses.replace(self.ctx, cfg=self.cfg)  # the memos (task tensors) stay
        return bool(changed)

    def set_params(self, params: dict) -> None:
        """New values of knobs (dotted config keys) from the next step on, on the same path: the phases are
        rebuilt from them and the running phase's optimizer takes the new hyperparameters, keeping its state."""
        if not self._set(params):
            return
        self.retuned = True
        last = self.lineage[-1]
        if last["trial_id"] == self.trial_id and last["forked_at_step"] == self.step:
            last["params"] = dict(self.params)
        else:
            self.lineage.append({"trial_id": self.trial_id, "parent": self.trial_id, "forked_at_step": self.step,
                                 "params": dict(self.params)})
        self._write_state()

    def state_dicts(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every seed's network now (what a test compares)."""
        return {s: {k: v.detach().clone() for k, v in self._model(s).state_dict().items()} for s in self.seeds}


def lineage_summary(lineage: list[dict]) -> dict:
    """`parent`: the trial whose path the last exploit along this path copied ("" if none); `forked_at`: that
    exploit's path step (-1 if none); `forks`: the exploits along the path (segments starting on another
    trial's path, the copied trials' own exploits included)."""
    forks = [s for s in lineage if s["parent"] is not None and s["parent"] != s["trial_id"]]
    last = forks[-1] if forks else None
    return {"parent": str(last["parent"]) if last else "", "forked_at": int(last["forked_at_step"]) if last else -1,
            "forks": len(forks)}


def run_schedule(cfg: Config, schedule: list[dict], work_dir: str | Path, *, every: int = 0,
                 **options: Any) -> tuple[list[dict], PathTrial]:
    """One path trial from scratch through a schedule of params: `schedule` is a lineage (or any list of
    {"forked_at_step", "params"} in step order); segment k runs from its step with its params. Reports every
    `every` steps (0: at segment ends only) and at the end; returns (the reports, the finished trial).
    A lineage replayed here gives the exact path of the trial that holds it."""
    first = schedule[0]
    trial = PathTrial(cfg.replace(**first["params"]), work_dir, params=first["params"], **options)
    ends = [int(s["forked_at_step"]) for s in schedule[1:]] + [trial.total_steps]
    reports = []
    for seg, end in zip(schedule, ends):
        trial.set_params(seg["params"])
        while trial.step < end:
            reports.append(trial.advance(min(every or end, end - trial.step)))
    return reports, trial
