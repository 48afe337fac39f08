"""The path loop: advance a network through a sequence of phases, recording and checkpointing.

Every operation (continual, sparsify, undirected) and every baseline is a list of `Phase`s run
by `run_path`. A phase owns its objective (a step function), the state it computes when it
starts (e.g. the anchor's outputs on the memory) and what it reports when it ends (e.g. a row of
the accuracy matrix). The loop reads top to bottom:

    for each phase: prepare state -> for each step: step, path length, sample, record, checkpoint -> finish

The path length (`fip_length` in the records) adds ‖w_k − w_{k−1}‖ after every step, so it does not
depend on how often the path records. A checkpoint (weights, optimizer, phase state, RNG, step,
records, sample list, the length so far) is written atomically with a checksum, the last few kept
(`fipray.checkpoints`), so a killed run resumes where it stopped and finishes with the same weights and the
same length: batches are a pure function of (seed, step) (`BatchStream`), so nothing else needs saving. A
damaged checkpoint or sample is moved aside and the path resumes from the one before (or starts over).

A path whose loss, invariance term or weights turn non-finite stops at once with `PathDiverged`, naming
the phase, seed, step and λ/β/η; what it wrote so far stays. The check costs nothing the loop does not
already compute: the step's outputs, and the path length, which turns non-finite with any weight.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fipray import checkpoints
from fipray.checkpoints import CHECKPOINT, SAMPLES, load_checkpoint
from fipray.config import ConfigError
from fipray.core.modes import eval_mode
from fipray.core.step import StepOutput

__all__ = ["CHECKPOINT", "SAMPLES", "PathDiverged", "PathResult", "Phase", "load_checkpoint", "run_path"]

PhaseState = dict[str, Any]
StepFn = Callable[[nn.Module, torch.optim.Optimizer, int, PhaseState], StepOutput]


@dataclass
class Phase:
    """One stretch of a path with a fixed objective.

    Attributes:
        name: unique within the path (used in records and checkpoints).
        steps: optimizer steps in this phase.
        step: (model, optimizer, phase_step, state) -> StepOutput; performs one update.
        optimizer: model -> a fresh optimizer for this phase.
        prepare: model -> state computed once at the phase start (tensors/floats/lists; it is
            checkpointed so a resumed phase sees the same anchor).
        finish: (model, state) -> results kept in `PathResult.phase_results[name]`.
        sample_every: save the weights every k steps of this phase (0: never).
        after_step: (model, state) -> None, run after each update (e.g. re-apply a mask).
        train_mode: the module mode of this phase's updates (True: dropout on, BatchNorm batch
            statistics updated); None takes `run_path`'s `train_mode`. Records, anchors and the
            held-out drift are always measured on the eval-mode network.
    """

    name: str
    steps: int
    step: StepFn
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    prepare: Callable[[nn.Module], PhaseState] | None = None
    finish: Callable[[nn.Module, PhaseState], dict] | None = None
    sample_every: int = 0
    after_step: Callable[[nn.Module, PhaseState], None] | None = None
    train_mode: bool | None = None


@dataclass
class PathResult:
    """What a path produced: per-step records, sampled networks, per-phase results."""

    model: nn.Module
    records: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # {"phase", "step", "global_step", "file" or "state"}
    phase_results: dict[str, dict] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    out_dir: Path | None = None

    def sample_state(self, i: int, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """The weights of sample i: read from its safetensors file (a run with `out_dir`) or from memory."""
        s = self.samples[i]
        if "state" in s:
            return s["state"]
        from safetensors.torch import load_file

        assert self.out_dir is not None
        return load_file(str(self.out_dir / s["file"]), device=str(device))


class PathDiverged(ConfigError):
    """A path's loss, invariance term or weights became non-finite (NaN/inf): usually too large a learning rate
    η or strength λ. A user error (the CLI prints `fipray: error: <message>`); the message names the phase,
    seed, step and λ/β/η.

    Attributes:
        result: the partial `PathResult` (records and samples so far); the checkpoints on disk are kept.
    """

    def __init__(self, message: str, result: PathResult | None = None):
        super().__init__(message)
        self.result = result


def trainable_params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_trainable(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable_params(model)])


class _Tracker:
    """Path geometry: ‖w − w0‖ and the output drift to w0 at each record, and the path length.

    The length is Σ_k ‖w_k − w_{k−1}‖ over every optimizer step (`advance` runs after each), not over the
    records: a run that records rarely still measures its path, not its chord. Any change made between
    steps (a phase's `prepare`) counts as one straight segment, caught by the next `advance`. The default
    geometry keeps the previous weights per parameter tensor (no flat copy, no sync with the device per
    step: the sum stays a float64 tensor until a record reads it), the tensors looked up once per phase
    (`begin`); a `weights` view (LoRA's merged weights) is called once per step and compared flat.
    """

    def __init__(self, model: nn.Module, heldout: Tensor | None, distance: Callable | None,
                 weights: Callable[[nn.Module], Tensor] | None = None):
        self.view = weights
        self.flat = flat_trainable if weights is None else weights
        self.w0 = self.flat(model).clone()
        self.prev = [t.clone() for t in self._now(model)]
        self.params: list[Tensor] | None = None  # the trainable tensors of the running phase (`begin`)
        self.length = torch.zeros((), dtype=torch.float64, device=self.w0.device)
        self.heldout, self.distance = heldout, distance
        self.logits0 = self._logits(model) if heldout is not None else None

    def _now(self, model: nn.Module) -> list[Tensor]:
        """The weights as `prev` holds them: the trainable tensors, or the view's one flat vector."""
        return [p.detach() for p in trainable_params(model)] if self.view is None else [self.view(model)]

    @torch.no_grad()
    def _logits(self, model: nn.Module) -> Tensor:
        with eval_mode(model):
            return model(self.heldout)

    @torch.no_grad()
    def begin(self, model: nn.Module) -> None:
        """At a phase start: look the trainable tensors up again, and count what changed since the last step."""
        self.params = self._now(model) if self.view is None else None
        if self.params is not None and [t.shape for t in self.params] != [t.shape for t in self.prev]:
            raise RuntimeError("the trainable weights changed shape or number along the path; pass run_path a "
                               "`weights` view that stays one vector")
        self.advance(model)

    @torch.no_grad()
    def advance(self, model: nn.Module) -> None:
        """Add ‖w − w_prev‖ to the length and make w the previous point (after every step)."""
        now = self.params if self.params is not None else self._now(model)
        torch._foreach_sub_(self.prev, now)  # prev <- w_prev − w, in place: no new model-sized tensor
        norms = torch._foreach_norm(self.prev)
        if norms:
            self.length += torch.linalg.vector_norm(torch.stack([n.to(self.length.device) for n in norms]),
                                                    dtype=torch.float64)
        torch._foreach_copy_(self.prev, now)

    @torch.no_grad()
    def row(self, model: nn.Module) -> dict:
        self.begin(model)
        w = self.prev[0] if self.view is not None else self.flat(model)
        row = {"weight_distance": float((w - self.w0).norm()), "fip_length": float(self.length)}
        if self.logits0 is not None and self.distance is not None:
            row["heldout_distance"] = float(self.distance(self._logits(model), self.logits0))
        return row

    def state_dict(self) -> dict:
        return {"w0": self.w0, "prev": self.prev, "length": self.length, "logits0": self.logits0}

    def load_state_dict(self, s: dict) -> None:
        self.w0, self.logits0 = s["w0"], s["logits0"]
        prev, length = s["prev"], s["length"]
        if isinstance(prev, Tensor):  # a checkpoint from before the per-step length: one flat vector
            parts = prev.split([t.numel() for t in self.prev]) if self.view is None else [prev]
            prev = [a.view_as(b).clone() for a, b in zip(parts, self.prev)]
        self.prev = list(prev)
        self.length = torch.as_tensor(length, dtype=torch.float64, device=self.w0.device)


@dataclass
class _Run:
    """The state of one `run_path` call: the loop's pieces as methods, the loop itself in `run_path`."""

    model: nn.Module
    phases: list[Phase]
    out: Path | None
    record_every: int
    checkpoint_every: int
    tracker: _Tracker
    evaluate: Callable[[nn.Module], dict] | None
    callback: Callable[[str, dict], None] | None
    progress: Any
    train_mode: bool
    keep: int = 2
    result: PathResult = field(init=False)
    global_step: int = 0

    def __post_init__(self) -> None:
        self.result = PathResult(model=self.model, out_dir=self.out)
        self.names = [p.name for p in self.phases]
        self.total = sum(p.steps for p in self.phases)
        self.mode = self.train_mode  # the module mode of the phase running now
        self.sample_sha: dict[str, str] = {}  # sample file -> SHA-256, listed by every checkpoint
        # On the CPU reading a scalar is free: every step is checked. Elsewhere it waits for the device, so the
        # check runs where the loop reads values anyway (records, checkpoints, phase ends).
        self.check_each_step = self.tracker.length.device.type == "cpu"
        self.checked_step = 0  # the last global step known finite

    def say(self, line: str) -> None:
        """One line to stderr (through the progress bar's `write` when there is one, so the bar stays whole)."""
        write = getattr(self.progress, "write", None)
        if callable(write):
            write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def enter(self, phase: Phase) -> None:
        """Put the model in `phase`'s mode (its own, else run_path's)."""
        self.mode = self.train_mode if phase.train_mode is None else phase.train_mode
        self.model.train(self.mode)

    def resume(self) -> tuple[int, int, PhaseState | None, dict | None]:
        """Load `out`'s newest good checkpoint if there is one: (phase, phase step, phase state, optimizer state).
        Damaged checkpoints and samples are moved aside (`resume_checkpoint`), each told in one line."""
        if self.out is None or not self.out.is_dir():
            return 0, 0, None, None
        ckpt, damaged = checkpoints.resume_checkpoint(self.out, self.say)
        if ckpt is None:
            return 0, 0, None, None
        if ckpt["phase_names"] != self.names:
            raise RuntimeError(
                f"checkpoint in {self.out} belongs to a path with phases {ckpt['phase_names']}, not {self.names}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.global_step = ckpt["global_step"]
        # Checkpoints load on the CPU; the phase state (anchors, masks) must follow the model.
        dev = next(self.model.parameters()).device
        r = self.result
        r.records, r.samples = list(ckpt["records"]), list(ckpt["samples"])
        r.phase_results = dict(ckpt["phase_results"])
        r.resumed_from = self.checked_step = self.global_step
        self.sample_sha = dict(ckpt.get("sample_sha256", {}))
        self.tracker.load_state_dict(checkpoints.to_device(ckpt["tracker"], dev))
        checkpoints.set_rng_state(ckpt["rng"])
        if self.progress is not None:
            self.progress.update(self.global_step)
        if damaged or (self.progress is not None and not getattr(self.progress, "disable", False)):
            done = self.global_step >= self.total and ckpt["phase"] >= len(self.phases)
            self.say(f"{'fipray: warning: ' if damaged else ''}"
                     + (f"path {self.out} already finished ({self.total} steps): loaded" if done else
                        f"resuming path {self.out} from step {self.global_step} of {self.total}"))
        return ckpt["phase"], ckpt["phase_step"], checkpoints.to_device(ckpt["phase_state"], dev), ckpt["optimizer"]

    def checkpoint(self, pi: int, step: int, state: PhaseState | None, optim: torch.optim.Optimizer | None) -> None:
        if self.out is None:
            return
        r = self.result
        checkpoints.save_checkpoint(self.out, {
            "phase_names": self.names, "phase": pi, "phase_step": step,
            "global_step": self.global_step, "model": self.model.state_dict(),
            "optimizer": optim.state_dict() if optim is not None else None,
            "phase_state": state, "rng": checkpoints.rng_state(), "records": r.records,
            "samples": r.samples, "phase_results": r.phase_results,
            "tracker": self.tracker.state_dict(), "sample_sha256": dict(self.sample_sha),
        }, self.keep)
        if self.callback is not None:
            self.callback("checkpoint", {"path": str(self.out / CHECKPOINT), "global_step": self.global_step})

    def record(self, phase: Phase, step: int, so: StepOutput | None) -> None:
        row: dict[str, Any] = {"phase": phase.name, "phase_step": step, "step": self.global_step}
        if so is not None:
            row.update(objective=float(so.objective), distance=float(so.distance),
                       secondary=float(so.secondary))
        row.update(self.tracker.row(self.model))
        if self.evaluate is not None:
            row.update(self.evaluate(self.model))
            self.model.train(self.mode)
        self.result.records.append(row)
        if self.progress is not None:
            self.progress.set_postfix({k: round(v, 4) for k, v in row.items()
                                       if k in ("distance", "secondary") and isinstance(v, float)})
        if self.callback is not None:
            self.callback("record", row)

    def sample(self, phase: Phase, done: int) -> None:
        """Keep the weights now: a safetensors file under `out/samples/` as soon as they are made (the
        checkpoint lists the file, so memory and checkpoints stay one model in size), in memory without
        an output folder."""
        rec: dict[str, Any] = {"phase": phase.name, "step": done, "global_step": self.global_step}
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.out is None:
            rec["state"] = state
        else:
            rec["file"] = f"{SAMPLES}/{phase.name}-{done}.safetensors"
            self.sample_sha[rec["file"]] = checkpoints.save_sample(self.out / rec["file"], state)
        self.result.samples.append(rec)

    def guard(self, phase: Phase, done: int, so: StepOutput | None, optim: torch.optim.Optimizer) -> None:
        """PathDiverged if this step's loss, invariance term or secondary loss, or any weight, is not finite."""
        values = (("the loss S", so.objective), ("the invariance term d", so.distance),
                  ("the secondary loss L", so.secondary)) if so is not None else ()
        bad = next((f"{what} is {float(v)}" for what, v in values if not math.isfinite(float(v))), None)
        if bad is None and not math.isfinite(float(self.tracker.length)):  # any non-finite weight makes it so
            bad = "a weight is not finite"
        if bad is None:
            self.checked_step = self.global_step
            return
        step = getattr(phase.step, "__self__", phase.step)  # a FIP step knows its λ, β and seed
        knobs = [f"{k}={getattr(step, a):g}" for k, a in (("λ", "lam"), ("β", "beta")) if isinstance(
            getattr(step, a, None), (int, float))]
        knobs += [f"η={g['lr']:g}" for g in optim.param_groups[:1] if isinstance(g.get("lr"), (int, float))]
        seed = getattr(step, "seed", None)
        when = (f"step {self.global_step}" if self.checked_step + 1 >= self.global_step else
                f"between steps {self.checked_step + 1} and {self.global_step}")
        kept = f"; checkpoints in {self.out} kept" if self.out is not None else ""
        raise PathDiverged(
            f"path{' ' + str(self.out) if self.out is not None else ''} diverged at {when} (phase {phase.name!r} "
            f"step {done} of {phase.steps}{'' if seed is None else f', seed {seed}'}): {bad} "
            f"with {', '.join(knobs) or 'its settings'}{kept}; lower the learning rate η (path.lr / train.lr) or λ",
            self.result)

    def steps(self, pi: int, first: int, state: PhaseState, optim: torch.optim.Optimizer) -> StepOutput | None:
        """Steps first..steps−1 of phase pi, with samples, records and checkpoints on the way."""
        phase, model, so = self.phases[pi], self.model, None
        for step in range(first, phase.steps):
            so = phase.step(model, optim, step, state)
            if phase.after_step is not None:
                phase.after_step(model, state)
            self.tracker.advance(model)
            self.global_step += 1
            done = step + 1
            if self.progress is not None:
                self.progress.update(1)
            reads = self.global_step % self.record_every == 0 or self.global_step % self.checkpoint_every == 0
            if self.check_each_step or reads or done == phase.steps:
                self.guard(phase, done, so, optim)
            if phase.sample_every and done % phase.sample_every == 0:
                self.sample(phase, done)
            if self.global_step % self.record_every == 0 and done < phase.steps:
                self.record(phase, done, so)
            if self.global_step % self.checkpoint_every == 0 and done < phase.steps:
                self.checkpoint(pi, done, state, optim)
        return so

    def end_phase(self, pi: int, state: PhaseState, so: StepOutput | None) -> None:
        """The phase's last record, its results, and the boundary checkpoint."""
        phase, r = self.phases[pi], self.result
        self.record(phase, phase.steps, so)
        if phase.finish is not None:
            r.phase_results[phase.name] = phase.finish(self.model, state)
            self.model.train(self.mode)
            if self.callback is not None:
                self.callback("phase_end", {"phase": phase.name, **r.phase_results[phase.name]})
        # Phase boundary: a resumed run starts phase pi+1 afresh (its prepare runs again).
        self.checkpoint(pi + 1, 0, None, None)


def run_path(
    model: nn.Module,
    phases: list[Phase],
    *,
    out_dir: str | Path | None = None,
    record_every: int = 25,
    checkpoint_every: int = 100,
    heldout: Tensor | None = None,
    distance: Callable[[Tensor, Tensor], Tensor] | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    callback: Callable[[str, dict], None] | None = None,
    progress: Any = None,
    train_mode: bool = False,
    weights: Callable[[nn.Module], Tensor] | None = None,
    keep_checkpoints: int = 2,
) -> PathResult:
    """Run `phases` in order on `model` (updated in place), resuming from `out_dir` if it holds a checkpoint.

    Args:
        model: the network at the path's start (w0), or any network when resuming.
        phases: what to do; names must be unique.
        out_dir: where checkpoints go; None disables checkpointing (and resuming).
        record_every: write a record row every k global steps (and at each phase end). The rows'
            `fip_length` sums ‖w_k − w_{k−1}‖ over every step, whatever k is.
        checkpoint_every: checkpoint every k global steps (and at each phase end).
        heldout: (N, ...) inputs on which the output drift to w0 is recorded.
        distance: output distance for that drift.
        evaluate: model -> extra metrics for each record row (accuracies, sparsity).
        callback: (event, payload) with event in {"record", "checkpoint", "phase_end"}; the Ray
            layer reports through it.
        progress: a tqdm-like object with update(n) and set_postfix(dict), or None.
        train_mode: the default module mode of the phases' updates (each `Phase.train_mode` may
            override it): False keeps the deterministic eval-mode network whose invariance is measured.
        weights: model -> the flat weight vector the path geometry is measured on; default the
            trainable parameters (compared tensor by tensor, never flattened per step). A phase that
            changes the module structure (LoRA adapters) passes the effective weights of the network it
            trains. It is called after every step, since the path length sums every step: keep it cheap
            (LoRA's view, a merged deep copy, costs about a third of a LoRA step on MiniLM on the CPU).
        keep_checkpoints: how many checkpoints `out_dir` keeps (`checkpoint.pt` the newest): a damaged one is
            moved aside as `*.corrupt` and the path resumes from the one before.

    Raises:
        PathDiverged: the loss, invariance term or weights became non-finite (the checkpoints so far stay).
    """
    names = [p.name for p in phases]
    if keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must be unique, got {names}")
    t0 = time.perf_counter()
    model.train(train_mode)
    run = _Run(model, phases, Path(out_dir) if out_dir is not None else None, record_every, checkpoint_every,
               _Tracker(model, heldout, distance, weights), evaluate, callback, progress, train_mode,
               keep_checkpoints)
    start_phase, start_step, resume_state, resume_optim = run.resume()
    for pi in range(start_phase, len(phases)):
        phase = phases[pi]
        if pi == start_phase and resume_state is not None:
            state, first = resume_state, start_step
        else:
            state, first = (phase.prepare(model) if phase.prepare else {}), 0
        run.enter(phase)
        run.tracker.begin(model)  # what `prepare` changed is one segment of the path (nothing on a resume)
        optim = phase.optimizer(model)
        if pi == start_phase and resume_optim is not None:
            optim.load_state_dict(resume_optim)
        try:
            so = run.steps(pi, first, state, optim)
        except KeyboardInterrupt:  # the command line names where it stopped (`checkpoints.interrupted`)
            checkpoints.INTERRUPTED.append(f"{out_dir or 'a path'} at step {run.global_step} of {run.total}")
            raise
        run.end_phase(pi, state, so)
        resume_state, resume_optim = None, None
    run.result.steps = run.global_step
    run.result.seconds = time.perf_counter() - t0
    model.eval()
    return run.result
