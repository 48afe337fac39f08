"""Examples as batches: in-memory tensors (the fast path) or a dataset streamed through a DataLoader.

Every phase draws batch t from `Examples.batches(batch_size, seed).batch(t)`. Both kinds give the
same contract: batch t is a pure function of (seed, t) — the indices come from `BatchStream`, and a
streamed item's random augmentation is seeded by (seed, t, index) inside whichever worker loads it —
so a run killed and resumed at step t sees exactly the batches the uninterrupted run saw, workers or
not.

- `TensorExamples(x, y)`: whole tensors on the device; `batch(t)` is `x[idx], y[idx]` (what fipray
  always did, bit for bit).
- `StreamedExamples(dataset, device, workers=..., train_transform=..., eval_transform=...)`: items
  are loaded when needed: training batches by a DataLoader whose batch sampler yields the steps'
  indices in order (workers prefetch, memory pinned on CUDA); memory batches and evaluation read
  items by index. Training items get `train_transform` (e.g. crop/flip augmentation), everything
  else `eval_transform` (e.g. a resize for a ViT).

Transforms are given in the config as torchvision v2 transforms (`build_transform`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fipray.data.batches import BatchStream, mix_seed

Transform = Callable[[Tensor], Tensor]


def build_transform(specs: Sequence[dict]) -> Transform | None:
    """torchvision v2 transforms from `[{Name: {kwarg: value}}, ...]` (None for an empty list).

    Raises:
        ValueError: an unknown transform name or bad arguments, naming them.
    """
    if not specs:
        return None
    from torchvision.transforms import v2

    out = []
    for spec in specs:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(f"a transform is one mapping {{Name: {{args}}}}, got {spec!r}")
        name, kwargs = next(iter(spec.items()))
        cls = getattr(v2, str(name), None)
        if not isinstance(cls, type):
            raise ValueError(f"unknown transform {name!r} (torchvision.transforms.v2), e.g. RandomCrop, "
                             "RandomHorizontalFlip, Resize")
        try:
            out.append(cls(**(kwargs or {})))
        except TypeError as e:
            raise ValueError(f"transform {name}: {e}") from None
    return v2.Compose(out)


class Examples:
    """A labelled set the phases draw batches from (see the module docstring)."""

    device: torch.device

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Items at `idx` (eval transform), on the device: ((k, ...), (k,))."""
        raise NotImplementedError

    def batches(self, batch_size: int, seed: int) -> BatchSource:
        """Training batches: `batch(t)` is the t-th minibatch of an epoch-wise shuffle seeded by `seed`."""
        raise NotImplementedError

    def iterate(self, batch_size: int = 512) -> Iterator[tuple[Tensor, Tensor]]:
        """All items in order (eval transform), in batches on the device."""
        for i in range(0, len(self), batch_size):
            yield self.take(torch.arange(i, min(i + batch_size, len(self))))


class BatchSource:
    """Batch t of a phase (a pure function of (seed, t))."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class _TensorSource(BatchSource):
    def __init__(self, stream: BatchStream, x: Tensor, y: Tensor):
        super().__init__(stream)
        self.x, self.y = x, y

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        idx = self.stream.indices(t)
        return self.x[idx], self.y[idx]


class TensorExamples(Examples):
    """Whole tensors on the device: x (N, ...), y (N,)."""

    def __init__(self, x: Tensor, y: Tensor):
        self.x, self.y = x, y
        self.device = x.device

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]

    def batches(self, batch_size: int, seed: int) -> BatchSource:
        return _TensorSource(BatchStream(len(self.x), batch_size, seed), self.x, self.y)


class _Seeded(Dataset):
    """Items keyed by (index, step): the transform's randomness is seeded by (seed, step, index)."""

    def __init__(self, dataset: Dataset, transform: Transform | None, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        i, t = key
        x, y = self.dataset[i]
        x = torch.as_tensor(x)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.seed, t, i))
                x = self.transform(x)
        return x, torch.as_tensor(y).long()


class _Steps:
    """Batch sampler yielding the (index, step) keys of steps start, start + 1, ... in order."""

    def __init__(self, stream: BatchStream, start: int):
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        t = self.start
        while True:
            yield [(int(i), t) for i in self.stream.indices(t)]
            t += 1


class _StreamSource(BatchSource):
    """A DataLoader over the steps from the one asked for; rebuilt when a step is skipped (a resume)."""

    def __init__(self, stream: BatchStream, examples: StreamedExamples, seed: int):
        super().__init__(stream)
        self.ex = examples
        self.data = _Seeded(examples.dataset, examples.train_transform, seed)
        self._it: Iterator[Any] | None = None
        self._next = -1

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        if self._it is None or t != self._next:
            ex = self.ex
            loader = DataLoader(self.data, batch_sampler=_Steps(self.stream, t),  # type: ignore[arg-type]
                                num_workers=ex.workers, pin_memory=ex.device.type == "cuda",
                                prefetch_factor=2 if ex.workers else None)
            self._it, self._next = iter(loader), t
        x, y = next(self._it)
        self._next += 1
        return x.to(self.ex.device, non_blocking=True), y.to(self.ex.device, non_blocking=True)


class StreamedExamples(Examples):
    """A map-style dataset loaded as needed (see the module docstring).

    Args:
        dataset: items `(x, y)`; `x` a tensor (or array) of the bundle's input shape, `y` an int.
        device: where batches go.
        workers: DataLoader worker processes for training batches (0: the main process).
        train_transform: applied to training batches' items (augmentation), seeded per (step, item).
        eval_transform: applied to every other item (memory batches, evaluation).
    """

    def __init__(self, dataset: Dataset, device: torch.device, *, workers: int = 0,
                 train_transform: Transform | None = None, eval_transform: Transform | None = None):
        self.dataset, self.device, self.workers = dataset, device, workers
        self.train_transform = train_transform if train_transform is not None else eval_transform
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for i in idx.tolist():
            x, y = self.dataset[i]
            x = torch.as_tensor(x)
            xs.append(self.eval_transform(x) if self.eval_transform is not None else x)
            ys.append(int(y))
        return torch.stack(xs).to(self.device), torch.tensor(ys, dtype=torch.long, device=self.device)

    def batches(self, batch_size: int, seed: int) -> BatchSource:
        return _StreamSource(BatchStream(len(self), batch_size, seed), self, seed)


def as_examples(data: Examples | tuple[Tensor, Tensor]) -> Examples:
    """An `Examples` from itself or from an (x, y) pair of tensors."""
    return data if isinstance(data, Examples) else TensorExamples(*data)
