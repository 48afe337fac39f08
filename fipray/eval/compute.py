"""Counting the compute a sweep trial spends: optimizer steps (= gradient evaluations of one batch) and seconds.

    with StepCounter() as c:
        ...                    # any training: base network, FIP phases, baselines
    c.steps, c.seconds

The counter hooks every `torch.optim.Optimizer.step` of the process while it is open (torch's global
optimizer post-hook), so it counts what a method really ran, whichever optimizer or phase, without the
method declaring it. Gradients taken without an optimizer step (EWC's Fisher diagonal, attack steps of an
evaluation) are not counted: evaluation is not tuning compute, and EWC's Fisher pass is one pass over a task.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class StepCounter:
    """Optimizer steps and wall seconds since the counter was entered."""

    def __init__(self) -> None:
        self.steps = 0
        self._t0 = 0.0
        self._handle: Any = None

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1

    def __enter__(self) -> StepCounter:
        self.steps = 0
        self._t0 = time.perf_counter()
        self._handle = register_optimizer_step_post_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    def metrics(self) -> dict[str, float]:
        """What a trial adds to each report: `grad_evals` (optimizer steps so far) and `trial_seconds`."""
        return {"grad_evals": float(self.steps), "trial_seconds": self.seconds}
