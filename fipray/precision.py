"""Mixed precision for the training phases: autocast (bf16, fp16) and a gradient scaler for fp16.

`train.precision` / `path.precision` name one of `fp32`, `bf16`, `fp16`. Forward passes run under
`torch.autocast` on the model's device; losses and output distances are taken in float32 (the
logits are cast up before any softmax/log), so the invariance term keeps its resolution. fp16 adds a
`torch.amp.GradScaler` whose state lives in the phase state, so a resumed phase continues with the
scale it had. fp32 changes nothing (no autocast, no scaler): numbers are bit-identical to code
without this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast to the precision's dtype on `device` (nothing for fp32)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield


class Scaler:
    """A GradScaler for fp16 that keeps its state in the phase state (a no-op otherwise)."""

    def __init__(self, precision: str, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def load(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Bring the gradients to their true scale (before a hook edits or reads them)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)
        self.scaler.update()
        state["grad_scaler"] = self.scaler.state_dict()
