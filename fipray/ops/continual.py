"""Continual learning along a FIP (paper Algorithm 1).

Task 0 trains the base network. Each later task i is one FIP phase from the network after task
i−1 (the anchor): its secondary objective is the new task's cross-entropy, and invariance is
measured on a replay memory of `memory_per_task` examples of every earlier task. One output
head covers all classes (class-incremental); labels are never remapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fipray.config import Config
from fipray.eval.continual import task_accuracy
from fipray.ops._common import cross_entropy_secondary, fip_phase
from fipray.path import Phase


@dataclass(frozen=True)
class TaskTensors:
    """One task of a split dataset, materialised on the run's device.

    x_* are (N, *input_shape), y_* are (N,) global class labels; mem_* is the replay memory.
    """

    index: int
    classes: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_mem: Tensor
    y_mem: Tensor


def seen_classes(tasks: list[TaskTensors], upto: int) -> list[int]:
    return [c for t in tasks[: upto + 1] for c in t.classes]


def evaluate_row(model: nn.Module, tasks: list[TaskTensors], trained_upto: int) -> dict[str, list[float]]:
    """Row `trained_upto` of the accuracy matrix R in both settings.

    Class-incremental: argmax over all classes seen so far (tasks ≤ max(trained_upto, j) for
    task j, so forward-transfer entries j > trained_upto are defined). Task-incremental:
    argmax over task j's own classes.
    """
    cls, tsk = [], []
    for j, t in enumerate(tasks):
        cls.append(task_accuracy(model, t.x_test, t.y_test, seen_classes(tasks, max(trained_upto, j))))
        tsk.append(task_accuracy(model, t.x_test, t.y_test, list(t.classes)))
    return {"class": cls, "task": tsk}


def memory_upto(tasks: list[TaskTensors], i: int) -> tuple[Tensor, Tensor]:
    """Replay memory of tasks 0..i−1: (M, ...) inputs and (M,) labels."""
    return torch.cat([t.x_mem for t in tasks[:i]]), torch.cat([t.y_mem for t in tasks[:i]])


def fip_continual_phases(tasks: list[TaskTensors], cfg: Config, seed: int) -> list[Phase]:
    """FIP phases for tasks 1..T−1 (the path starts at the network trained on task 0)."""
    phases = []
    for i in range(1, len(tasks)):
        x_mem, _ = memory_upto(tasks, i)
        phases.append(fip_phase(
            f"task{i}", cfg.path, seed, memory=x_mem, secondary=cross_entropy_secondary,
            new_data=(tasks[i].x_train, tasks[i].y_train),
            finish=lambda m, s, i=i: evaluate_row(m, tasks, i),
        ))
    return phases


def accuracy_along_path(tasks: list[TaskTensors]):
    """Record-row metrics: class-incremental accuracy on every task's test set (over all classes)."""
    every = [c for t in tasks for c in t.classes]

    def evaluate(model: nn.Module) -> dict:
        return {f"acc_task{j}": task_accuracy(model, t.x_test, t.y_test, every) for j, t in enumerate(tasks)}

    return evaluate
