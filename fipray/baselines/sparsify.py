"""Sparsification baselines: one-shot magnitude pruning, with masked fine-tuning, and iterative (IMP).

All prune globally by magnitude over the same counted tensors as FIP and end exactly p-sparse.
Fine-tuning baselines get as many optimizer steps as the FIP path uses in all.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from fipray._registry import Registry
from fipray.config import Config, TrainConfig
from fipray.ops.sparsify import apply_masks, counted_tensors, magnitude_masks
from fipray.path import run_path
from fipray.phases import supervised_phase

# name -> (model, names, p, x, y, cfg, seed, progress) -> None: prunes `model` in place to exactly p.
# `sparsify.baselines` names them; fine-tuning ones get path.steps + sparsify.invariance_steps steps.
SPARSIFY_BASELINES: Registry = Registry("sparsify baseline")


def finetune_steps(cfg: Config) -> int:
    """Steps a fine-tuning baseline gets: as many as the FIP path takes in all."""
    return cfg.path.steps + cfg.sparsify.invariance_steps


def one_shot(model: nn.Module, names: list[str], p: float) -> list[Tensor]:
    """Prune `model` in place to exactly p; returns the keep-masks."""
    masks = magnitude_masks(counted_tensors(model, names), p)
    apply_masks(counted_tensors(model, names), masks)
    return masks


def _masked_finetune(model: nn.Module, names: list[str], masks: list[Tensor], x: Tensor, y: Tensor,
                     train: TrainConfig, seed: int, steps: int, name: str, progress=None) -> None:
    def remask(m: nn.Module, state: dict) -> None:
        apply_masks(counted_tensors(m, names), masks)

    phase = supervised_phase(name, x, y, train, seed, steps=steps, after_step=remask)
    run_path(model, [phase], record_every=10**9, checkpoint_every=10**9, progress=progress)


def magnitude_finetune(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor,
                       train: TrainConfig, seed: int, steps: int, progress=None) -> None:
    """One-shot prune to p, then masked cross-entropy fine-tuning for `steps` steps."""
    masks = one_shot(model, names, p)
    _masked_finetune(model, names, masks, x, y, train, seed, steps, "finetune", progress)


def imp_schedule(p: float, rate: float = 0.2) -> list[float]:
    """Sparsities of the IMP rounds: prune `rate` of the remaining weights per round, last round = p."""
    rounds = max(1, math.ceil(math.log(1 - p) / math.log(1 - rate)))
    return [1 - (1 - p) ** (k / rounds) for k in range(1, rounds + 1)]


def iterative_magnitude(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor,
                        train: TrainConfig, seed: int, steps: int, progress=None) -> None:
    """IMP (Frankle & Carbin 2019, without rewinding): prune 20% of the remaining weights, fine-tune,
    repeat until p; the fine-tuning steps are split evenly over the rounds (equal total steps)."""
    schedule = imp_schedule(p)
    per_round = max(1, steps // len(schedule))
    for k, q in enumerate(schedule):
        masks = one_shot(model, names, q)  # magnitudes of the survivors: earlier zeros stay zero
        _masked_finetune(model, names, masks, x, y, train, seed + k, per_round, f"imp{k}", progress)


@SPARSIFY_BASELINES.register("magnitude")
def _magnitude(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor, cfg: Config, seed: int,
               progress: Any = None) -> None:
    one_shot(model, names, p)


@SPARSIFY_BASELINES.register("magnitude_ft")
def _magnitude_ft(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor, cfg: Config, seed: int,
                  progress: Any = None) -> None:
    magnitude_finetune(model, names, p, x, y, cfg.train, seed, finetune_steps(cfg), progress=progress)


@SPARSIFY_BASELINES.register("imp")
def _imp(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor, cfg: Config, seed: int,
         progress: Any = None) -> None:
    iterative_magnitude(model, names, p, x, y, cfg.train, seed, finetune_steps(cfg), progress=progress)
