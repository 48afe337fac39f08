"""Class-incremental task splits and the one stratified replay-memory sampler.

Labels stay global: task ``t`` of digits holds labels ``{2t, 2t+1}`` and the model keeps one head
over all classes, which is the setting functionally invariant paths are evaluated in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from fipray.data.core import DataBundle, dataset_labels, select

#: Task counts used when neither ``num_tasks`` nor ``classes_per_task`` is given.
DEFAULT_NUM_TASKS = {"digits": 5, "cifar10": 5, "cifar100": 10}


@dataclass
class Task:
    """One task of a class-incremental sequence.

    Attributes:
        index: Position in the sequence, from 0.
        classes: Global labels of the task, in ``class_order`` order.
        train: Training examples of those classes (labels unchanged).
        test: Test examples of those classes (labels unchanged).
    """

    index: int
    classes: tuple[int, ...]
    train: Dataset
    test: Dataset


def _filter(ds: Dataset, labels: torch.Tensor, classes: Sequence[int]) -> Dataset:
    mask = torch.isin(labels, torch.as_tensor(list(classes), dtype=torch.long))
    return select(ds, torch.nonzero(mask).flatten())


def split_tasks(
    bundle: DataBundle,
    num_tasks: int | None = None,
    classes_per_task: int | None = None,
    class_order: Sequence[int] | None = None,
) -> list[Task]:
    """Split a bundle into class-disjoint tasks.

    Classes are taken in ``class_order`` (default ``0..num_classes-1``) and cut into consecutive
    groups of ``classes_per_task``. With only one of ``num_tasks``/``classes_per_task`` the other is
    derived; with neither, ``DEFAULT_NUM_TASKS[bundle.name]`` is used (digits and CIFAR-10: 5 tasks ×
    2 classes, CIFAR-100: 10 × 10). When both are given and use fewer classes than ``class_order``
    holds, the trailing classes are left out.

    For user data wrap the datasets first:
    ``split_tasks(DataBundle(train, test, num_classes, input_shape), num_tasks)``.

    Args:
        bundle: The data to split.
        num_tasks: Number of tasks.
        classes_per_task: Classes in each task.
        class_order: Global labels in task order, e.g. a seeded permutation; may be a subset.

    Returns:
        ``num_tasks`` :class:`Task` objects. In-memory sources (``TensorDataset``) give in-memory task
        datasets; others give ``Subset`` views.

    Raises:
        ValueError: The classes do not divide into the tasks, ``class_order`` repeats a class or names
            one outside ``[0, num_classes)``, or the task count cannot be inferred.
    """
    order = list(range(bundle.num_classes)) if class_order is None else [int(c) for c in class_order]
    unknown = sorted({c for c in order if not 0 <= c < bundle.num_classes})
    if unknown:
        raise ValueError(
            f"class_order names unknown classes {unknown}; the bundle has {bundle.num_classes} classes"
        )
    if len(set(order)) != len(order):
        raise ValueError(f"class_order repeats classes: {order}")

    if num_tasks is None and classes_per_task is None:
        if bundle.name not in DEFAULT_NUM_TASKS:
            raise ValueError(f"give num_tasks or classes_per_task (no default for dataset {bundle.name!r})")
        num_tasks = DEFAULT_NUM_TASKS[bundle.name]
    for label, v in (("num_tasks", num_tasks), ("classes_per_task", classes_per_task)):
        if v is not None and v < 1:
            raise ValueError(f"{label} must be positive, got {v}")
    if classes_per_task is None:
        assert num_tasks is not None
        if len(order) % num_tasks:
            raise ValueError(f"{len(order)} classes do not divide into {num_tasks} tasks")
        classes_per_task = len(order) // num_tasks
    elif num_tasks is None:
        if len(order) % classes_per_task:
            raise ValueError(f"{len(order)} classes do not divide into tasks of {classes_per_task}")
        num_tasks = len(order) // classes_per_task
    elif num_tasks * classes_per_task > len(order):
        raise ValueError(
            f"{num_tasks} tasks × {classes_per_task} classes need {num_tasks * classes_per_task} classes; "
            f"only {len(order)} available"
        )

    assert num_tasks is not None and classes_per_task is not None
    # Labels are read once per split, not once per task.
    train_labels, test_labels = dataset_labels(bundle.train), dataset_labels(bundle.test)
    tasks = []
    for t in range(num_tasks):
        classes = tuple(order[t * classes_per_task : (t + 1) * classes_per_task])
        tasks.append(
            Task(
                index=t,
                classes=classes,
                train=_filter(bundle.train, train_labels, classes),
                test=_filter(bundle.test, test_labels, classes),
            )
        )
    return tasks


def stratified_indices(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` indices into ``y`` spread as evenly as possible over the classes present (the replay sampler).

    Class ``k`` (in ascending label order) gets ``n // C`` indices, one more for the first ``n % C``
    classes; a class with fewer examples gives all it has and what it lacks is shared out the same way
    over the classes that still have examples. Within a class the indices are the first ones of a seeded
    permutation of its members, drawn class by class from one generator. Deterministic given ``seed``
    (its own generator; global RNG state is untouched).

    Args:
        y: Labels ``(N,)``, on any device.
        n: How many indices; ``n >= N`` gives every index.
        seed: Seed of the sampling.

    Returns:
        ``min(n, N)`` indices on ``y``'s device, grouped by class (ascending labels).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    labels = y.cpu()
    classes = torch.unique(labels).tolist()
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    quota = [0] * len(classes)
    remaining = min(n, len(labels))
    # Water-filling: share what is left equally among the classes that still have examples. With every
    # class large enough this is one round: n // C each, the remainder to the first classes.
    while remaining > 0:
        open_ = [k for k in range(len(classes)) if quota[k] < len(members[k])]
        share, extra = divmod(remaining, len(open_))
        for rank, k in enumerate(open_):
            add = min(share + (1 if rank < extra else 0), len(members[k]) - quota[k])
            quota[k] += add
            remaining -= add
    g = torch.Generator().manual_seed(seed)
    picked = [idx[torch.randperm(len(idx), generator=g)[:k]] for idx, k in zip(members, quota)]
    return (torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)).to(y.device)


def memory_subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """A stratified random sample of ``n`` examples of ``ds`` (e.g. a replay memory for one task).

    The examples are those of :func:`stratified_indices` over the dataset's labels (the sampler the
    continual operation draws its replay memories with): ``n`` split as evenly as possible over the
    classes present, a class with too few examples giving all it has and the rest going to the others.
    Deterministic given ``seed``.

    Args:
        ds: The dataset to sample (typically ``Task.train``).
        n: Total number of examples; ``n >= len(ds)`` returns every example.
        seed: Seed of the sampling.

    Returns:
        A dataset of ``min(n, len(ds))`` items in their original order, same in-memory type as ``ds``
        when it has one.
    """
    idx = stratified_indices(dataset_labels(ds), n, int(seed))
    return select(ds, torch.sort(idx).values)
