"""The optimizers configs may name (`train.optimizer`, `path.optimizer`): a registry of factories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fipray.registry import Registry

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("adam")
def _adam(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("sgd")
def _sgd(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


@OPTIMIZERS.register("plain_sgd")
def _plain_sgd(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # SGD without momentum: the optimizer of the DER paper's benchmarks (mammoth's `torch.optim.SGD(lr)`).
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A fresh optimizer by registry name; an unknown name raises listing the valid ones."""
    try:
        factory = OPTIMIZERS.get(name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    return factory(params, lr=lr, weight_decay=weight_decay)
