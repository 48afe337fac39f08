"""Continual task streams: what a continual run learns, task after task.

Three settings (Avalanche and Mammoth users know them):

- **class** — class-incremental splits of one dataset (`class_split`): each task a disjoint group of its
  classes, labels kept global (today's split digits);
- **datasets** — a sequence of different datasets, each with its own label space (`datasets_stream`):
  BBC topics 0-2 then a second corpus with 2 classes, the shape of the paper's Yelp -> IMDb experiment;
- **domain** — the same classes under a per-task input transform (`domain_stream`): fixed pixel
  permutations (`permutations`), rotations (`rotations`) or any callable on a batch of inputs.

A stream only says which examples and labels each task has. How the labels map to the network's output
columns (one shared head, one head per task, a head that grows) is the continual operation's `head`.

Build one in Python from your own `DataBundle`s and run it with
``run_experiment(cfg, out, tasks=stream)`` (see README).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fipray.data.core import DataBundle

InputTransform = Callable[[Tensor], Tensor]

SETTINGS = ("class", "datasets", "domain")


@dataclass
class StreamTask:
    """One task of a stream.

    Attributes:
        train, test: the task's examples; items ``(x, y)`` with ``y`` one of ``classes``.
        classes: the labels this task's examples carry (global labels in a class split, ``0..C-1`` of the
            task's own label space otherwise).
        name: shown in reports (e.g. the dataset and its classes).
        transform: for domain streams, applied to a batch of inputs ``(B, *input_shape)`` -> same shape
            (deterministic: it is part of the task, not an augmentation); None = the inputs as they are.
    """

    train: Dataset
    test: Dataset
    classes: tuple[int, ...]
    name: str = ""
    transform: InputTransform | None = None


@dataclass
class TaskStream:
    """A sequence of tasks with the facts a continual run needs.

    Attributes:
        setting: "class", "datasets" or "domain" (see the module docstring).
        tasks: the tasks in order; task 0 is what the base network learns (or already knows).
        input_shape: per-example input shape, the same for every task.
        shared_labels: whether a label means the same class in every task (class splits and domain
            streams); datasets streams have one label space per task.
        num_labels: the size of the shared label space (shared_labels), else the largest task's.
        name: the source, for reports.
    """

    setting: str
    tasks: list[StreamTask]
    input_shape: tuple[int, ...]
    shared_labels: bool
    num_labels: int
    name: str = "custom"
    class_names: list[tuple[str, ...] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"stream setting {self.setting!r} is not one of {', '.join(SETTINGS)}")
        if not self.tasks:
            raise ValueError("a task stream needs at least one task")
        for i, t in enumerate(self.tasks):
            if not t.classes:
                raise ValueError(f"task {i} of the stream has no classes")
            if len(set(t.classes)) != len(t.classes):
                raise ValueError(f"task {i} of the stream repeats classes: {t.classes}")

    def __len__(self) -> int:
        return len(self.tasks)


def class_split(bundle: DataBundle, num_tasks: int | None = None, classes_per_task: int | None = None,
                class_order: Sequence[int] | None = None) -> TaskStream:
    """Class-incremental splits of one dataset (`fipray.data.split_tasks`), labels kept global."""
    from fipray.data.tasks import split_tasks

    split = split_tasks(bundle, num_tasks, classes_per_task=classes_per_task, class_order=class_order)
    names = bundle.class_names
    tasks = [StreamTask(t.train, t.test, tuple(int(c) for c in t.classes),
                        name="classes " + ", ".join(names[c] if names else str(c) for c in t.classes))
             for t in split]
    return TaskStream("class", tasks, tuple(bundle.input_shape), True, int(bundle.num_classes), bundle.name)


def datasets_stream(bundles: Sequence[DataBundle], names: Sequence[str] | None = None) -> TaskStream:
    """One task per dataset, each with its own label space ``0..num_classes-1``.

    Raises:
        ValueError: no bundles, or their input shapes differ (one network reads them all; for text give
            every dataset the same `max_length`).
    """
    if not bundles:
        raise ValueError("a datasets stream needs at least one DataBundle")
    shapes = {tuple(b.input_shape) for b in bundles}
    if len(shapes) > 1:
        raise ValueError(f"the datasets of a stream must share one input shape, got {sorted(shapes)}")
    labels = [n for n in (names or [])]
    tasks = []
    for i, b in enumerate(bundles):
        cn = b.class_names
        name = labels[i] if i < len(labels) else (
            f"{b.name}: " + ", ".join(cn) if cn else f"{b.name} ({b.num_classes} classes)")
        tasks.append(StreamTask(b.train, b.test, tuple(range(int(b.num_classes))), name=name))
    return TaskStream("datasets", tasks, tuple(bundles[0].input_shape), False,
                      max(int(b.num_classes) for b in bundles), "+".join(dict.fromkeys(b.name for b in bundles)))


def domain_stream(bundle: DataBundle, transforms: Sequence[InputTransform | None],
                  names: Sequence[str] | None = None) -> TaskStream:
    """The same classes under one input transform per task (None: the inputs as they are)."""
    if not transforms:
        raise ValueError("a domain stream needs at least one task (one transform per task)")
    for i, tf in enumerate(transforms):
        if tf is not None and not callable(tf):
            raise ValueError(f"domain transform {i} is not callable: {tf!r}")
    classes = tuple(range(int(bundle.num_classes)))
    tasks = [StreamTask(bundle.train, bundle.test, classes,
                        name=(names[i] if names and i < len(names) else f"domain {i}"), transform=tf)
             for i, tf in enumerate(transforms)]
    return TaskStream("domain", tasks, tuple(bundle.input_shape), True, int(bundle.num_classes), bundle.name)


class _Permute:
    """A fixed permutation of every example's flattened features (permuted MNIST)."""

    def __init__(self, perm: Tensor, shape: tuple[int, ...]):
        self.perm, self.shape = perm, shape

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return flat[:, self.perm.to(x.device)].reshape(x.shape)


def permutations(num_tasks: int, input_shape: Sequence[int], seed: int = 0,
                 identity_first: bool = True) -> list[InputTransform | None]:
    """`num_tasks` fixed feature permutations, seeded; task 0 sees the original inputs by default."""
    n = 1
    for s in input_shape:
        n *= int(s)
    g = torch.Generator().manual_seed(seed)
    out: list[InputTransform | None] = []
    for i in range(num_tasks):
        perm = torch.randperm(n, generator=g)
        out.append(None if (i == 0 and identity_first) else _Permute(perm, tuple(input_shape)))
    return out


class _Rotate:
    """Images rotated by a fixed angle about their centre (nearest neighbour, zero fill: what PIL's rotate
    does to an MNIST digit)."""

    def __init__(self, degrees: float):
        self.degrees = degrees

    def __call__(self, x: Tensor) -> Tensor:
        from torchvision.transforms.functional import rotate

        return rotate(x, self.degrees)


def rotations(num_tasks: int, step_degrees: float) -> list[InputTransform | None]:
    """Task i sees its images rotated by i·step_degrees (task 0 unrotated)."""
    return [None if i == 0 else _Rotate(i * step_degrees) for i in range(num_tasks)]


def random_rotations(num_tasks: int, low: float, high: float, seed: int = 0,
                     identity_first: bool = False) -> list[InputTransform | None]:
    """One fixed angle per task drawn uniformly from [low, high) degrees, seeded (rotated MNIST as the DER
    paper builds it: every task rotated, task 0 included, unless `identity_first`)."""
    if not high > low:
        raise ValueError(f"a rotation range needs low < high, got [{low}, {high}]")
    g = torch.Generator().manual_seed(seed)
    angles = (low + (high - low) * torch.rand(num_tasks, generator=g, dtype=torch.float64)).tolist()
    return [None if (i == 0 and identity_first) else _Rotate(a) for i, a in enumerate(angles)]


class MappedDataset(Dataset):
    """A task's dataset as the network sees it: labels mapped to output columns, the domain transform
    applied (per example, for streamed data)."""

    def __init__(self, ds: Dataset, column: dict[int, int], transform: InputTransform | None = None):
        self.ds, self.column, self.transform = ds, column, transform

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        if self.transform is not None:
            x = self.transform(torch.as_tensor(x).unsqueeze(0))[0]
        return x, torch.tensor(self.column[int(y)], dtype=torch.long)
