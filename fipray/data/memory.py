"""Task tensors and replay memories: a task stream materialised on the run's device.

`materialise` turns a `fipray.data.streams.TaskStream` into one `TaskTensors` per task: its training
split (tensors, or `Examples` streamed as needed), its test split, its output columns under the
stream's head (`fipray.heads`) and its replay memory, a stratified sample of its training examples
(`fipray.data.tasks.stratified_indices`). The continual operation, its baselines (ER and DER++ replay
the same memory FIP keeps invariant on) and the compose operation all read tasks through this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fipray.data.batches import mix_seed
from fipray.data.core import as_tensors, dataset_labels
from fipray.data.stream import Examples, TensorExamples
from fipray.data.streams import MappedDataset, TaskStream
from fipray.data.tasks import stratified_indices
from fipray.data.transformed import TransformedExamples
from fipray.heads import Head


@dataclass(frozen=True)
class TaskTensors:
    """One task of a stream, materialised on the run's device.

    x_* are (N, *input_shape), y_* are (N,) output columns (labels mapped by the head; a shared head keeps
    labels as they are); mem_* is the replay memory (taken from the training examples at `mem_idx`).
    With streamed data (`data.stream`) the training split is `train` (Examples loaded as needed) and
    x_train, y_train are None; the memory stays in memory, and so does the test split unless it is not in
    memory to begin with (e.g. `parquet` with `in_memory: false`): then it is `test_split`, read in batches
    (labels mapped, the domain transform applied per batch) and x_test, y_test are None. `classes` are the task's
    output columns; `head` is the stream's head layout.
    """

    index: int
    classes: tuple[int, ...]
    x_train: Tensor | None
    y_train: Tensor | None
    x_test: Tensor | None  # None when the test split is streamed (`test_split`)
    y_test: Tensor | None
    x_mem: Tensor
    y_mem: Tensor
    train: Examples | None = None
    mem_idx: Tensor | None = None
    head: Head | None = None
    name: str = ""
    dataset: Dataset | None = None  # streamed: the task's training set as the network sees it
    test_split: Any = None  # streamed test split (`fipray.eval.split.EvalSplit`), read in batches when evaluated

    def test_tensors(self) -> tuple[Tensor, Tensor]:
        """The test split as tensors (held in memory); ValueError when it is streamed."""
        if self.x_test is None or self.y_test is None:
            raise ValueError(f"task {self.index}'s test split is streamed (read in batches), not held in memory")
        return self.x_test, self.y_test

    @property
    def train_data(self) -> Examples:
        """The training split as batches: the streamed Examples, or the in-memory tensors."""
        if self.train is not None:
            return self.train
        assert self.x_train is not None and self.y_train is not None
        return TensorExamples(self.x_train, self.y_train)

    def __len__(self) -> int:
        return len(self.train_data)


def head_of(tasks: list[TaskTensors]) -> Head:
    """The head of a stream's tasks (a shared head over their classes when none was recorded)."""
    h = tasks[0].head
    if h is not None:
        return h
    width = 1 + max(c for t in tasks for c in t.classes)
    return Head("shared", tuple(t.classes for t in tasks), width)


def memory_upto(tasks: list[TaskTensors], i: int) -> tuple[Tensor, Tensor]:
    """Replay memory of tasks 0..i−1: (M, ...) inputs and (M,) labels."""
    return torch.cat([t.x_mem for t in tasks[:i]]), torch.cat([t.y_mem for t in tasks[:i]])


def _relabel(y: Tensor, column: dict[int, int]) -> Tensor:
    """Labels mapped to output columns by `column` (label -> column).

    Raises:
        ValueError: a label is not among the keys of `column` (not one of the task's classes).
    """
    lookup = torch.full((max(column) + 1,), -1, dtype=torch.long, device=y.device)
    lookup[torch.tensor(list(column), device=y.device)] = torch.tensor(list(column.values()), device=y.device)
    out = lookup[y]
    if (out < 0).any():
        raise ValueError(f"labels {sorted(set(y[out < 0].tolist()))[:10]} are not among the task's classes")
    return out


def _transformed(x: Tensor, tf: Callable[[Tensor], Tensor] | None) -> Tensor:
    """A domain task's inputs: `tf` applied in batches of 512 (None: `x` as it is)."""
    if tf is None:
        return x
    return torch.cat([tf(x[i:i + 512]) for i in range(0, len(x), 512)])


def _split(ds: Dataset, device: torch.device) -> tuple[Tensor, Tensor]:
    x, y = as_tensors(ds)
    return x.to(device), y.to(device).long()


def _streamed_test(ds: Dataset, transform: Callable[[Tensor], Tensor] | None, column: dict[int, int],
                   device: torch.device, stream: bool) -> Any:
    """A task's test split as a streamed `EvalSplit` (labels mapped, the transform per batch), or None when
    it is to be held in memory (see `fipray.eval.split`: in memory already, or not streamed)."""
    import functools

    from fipray.eval.split import EvalSplit

    split = EvalSplit(ds, device, transform=transform, relabel=functools.partial(_relabel, column=column),
                      stream=stream)
    return split if split.streamed else None


def materialise(stream: TaskStream, head: Head, columns: list[dict[int, int]], device: torch.device, seed: int,
                memory_per_task: int, *, streamed: Callable[[Dataset], Examples] | None = None,
                test_cache: dict | None = None) -> list[TaskTensors]:
    """The tasks of `stream` on `device` with their replay memories, labels mapped to the head's columns.

    Args:
        head, columns: the stream's head and, per task, its label -> output column map (`Head.build`).
        seed: the run's seed; task i's memory is `stratified_indices` with seed `mix_seed(seed, 5, i)`.
        memory_per_task: replay examples drawn from each task's training split.
        streamed: with streamed data, makes a task's training `Examples` from its dataset as the network
            sees it (labels mapped, domain transform applied); None: training splits as tensors (a domain
            task's as `TransformedExamples`: the untransformed tensors, its transform applied per batch).
        test_cache: kept across calls (e.g. seeds) so each task's transformed test inputs are made once.

    Raises:
        ValueError: `memory_per_task` exceeds a task's training examples, or a label is not one of its task's classes.
    """
    tasks = []
    for i, t in enumerate(stream.tasks):
        train: Examples
        dataset = None
        if streamed is not None:
            dataset = MappedDataset(t.train, columns[i], t.transform)
            train = streamed(dataset)
            ytr = _relabel(dataset_labels(t.train).to(device), columns[i])
        else:
            xtr, ytr = _split(t.train, device)
            ytr = _relabel(ytr, columns[i])
            # A domain task's training inputs are transformed per batch: one copy of the data for all tasks.
            train = TensorExamples(xtr, ytr) if t.transform is None else TransformedExamples(xtr, ytr, t.transform)
        test_split = _streamed_test(t.test, t.transform, columns[i], device, streamed is not None)
        xte = yte = None
        if test_split is None:
            xte, yte = _split(t.test, device)
            key = (i, id(t.test), str(device))
            if test_cache is not None and key in test_cache:
                xte = test_cache[key]
            else:
                xte = _transformed(xte, t.transform)
                if test_cache is not None:
                    test_cache[key] = xte
            yte = _relabel(yte, columns[i])
        if memory_per_task > len(ytr):
            raise ValueError(f"memory_per_task {memory_per_task} exceeds the {len(ytr)} training examples "
                             f"of task {i}")
        mem = stratified_indices(ytr, memory_per_task, mix_seed(seed, 5, i))
        x_mem, y_mem = train.take(mem)  # the replay memory: training examples by index
        common: dict[str, Any] = dict(mem_idx=mem, head=head, name=t.name, dataset=dataset, test_split=test_split)
        if isinstance(train, TensorExamples):
            tasks.append(TaskTensors(i, head.blocks[i], train.x, train.y, xte, yte, x_mem, y_mem, None, **common))
        else:
            tasks.append(TaskTensors(i, head.blocks[i], None, None, xte, yte, x_mem, y_mem, train, **common))
    return tasks
