"""Module modes that restore themselves: the one way fipray evaluates a network in the middle of training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode and afterwards restore every submodule's own ``training`` flag.

    ``model.train(was_training)`` would not do: it overwrites submodules that were deliberately in
    another mode (frozen BatchNorm, ensemble members that must stay in eval mode).
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag
