"""Examples computed per batch: one dataset under a task's input transform, and unions of task sets.

A domain stream (permuted or rotated MNIST: 20 tasks over the same 60,000 images) would hold 20
transformed copies of its training set if every task were materialised (3.8 GB of float32 for
P-MNIST). `TransformedExamples` keeps one copy of the inputs and applies the task's transform to each
batch as it is drawn; `ConcatExamples` is the union of several tasks' examples (joint training over a
stream) without copying any of them. Both keep the `fipray.data.stream.Examples` contract: batch t is
a pure function of (seed, t).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fipray.data.batches import BatchStream
from fipray.data.stream import BatchSource, Examples


class _IndexedSource(BatchSource):
    def __init__(self, stream: BatchStream, examples: Examples):
        super().__init__(stream)
        self.examples = examples

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        return self.examples.take(self.stream.indices(t))


class TransformedExamples(Examples):
    """Inputs `x` (N, ...) and labels `y` (N,) on one device, `transform` applied to every batch taken
    (training batches, memory batches and evaluation alike: the transform is part of the task)."""

    def __init__(self, x: Tensor, y: Tensor, transform: Callable[[Tensor], Tensor]):
        self.x, self.y, self.transform = x, y, transform
        self.device = x.device

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.to(self.x.device)
        return self.transform(self.x[idx]), self.y[idx]

    def batches(self, batch_size: int, seed: int) -> BatchSource:
        return _IndexedSource(BatchStream(len(self), batch_size, seed), self)


class ConcatExamples(Examples):
    """The union of several `Examples` (in order), items read from the part that holds them."""

    def __init__(self, parts: Sequence[Examples]):
        if not parts:
            raise ValueError("ConcatExamples needs at least one part")
        self.parts = list(parts)
        self.device = self.parts[0].device
        sizes = torch.tensor([len(p) for p in self.parts])
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.total = int(sizes.sum())

    def __len__(self) -> int:
        return self.total

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.cpu()
        which = torch.searchsorted(self.starts, idx, right=True) - 1
        return gather(self.parts, which, idx - self.starts[which])

    def batches(self, batch_size: int, seed: int) -> BatchSource:
        return _IndexedSource(BatchStream(len(self), batch_size, seed), self)


def gather(parts: Sequence[Examples], which: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs and labels of (part, index) pairs, in the given order, each read from its part's `take` (one
    call per part): the items of a union of task sets, or of a replay buffer over a stream."""
    xs, ys, order = [], [], []
    for k in which.unique().tolist():
        sel = torch.nonzero(which == k).flatten()
        x, y = parts[k].take(index[sel])
        xs.append(x)
        ys.append(y)
        order.append(sel)
    back = torch.argsort(torch.cat(order))
    x, y = torch.cat(xs), torch.cat(ys)
    return x[back.to(x.device)], y[back.to(y.device)]
