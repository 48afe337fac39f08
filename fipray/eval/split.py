"""An evaluation split read in batches: accuracy over any size of test/validation set in bounded memory.

    split = EvalSplit(bundle.test, device, batch_size=512, transform=eval_tf)
    split.accuracy(model)        # every example, one batch in memory at a time
    x, y = split.head(256)       # the first examples as tensors (held-out drift, attacks on eval_examples)

A split already in memory (a `TensorDataset`, 8-bit images, a `Subset` of them) is evaluated from its
tensors, exactly as `fipray.eval.predict.accuracy` always did (same batches, same numbers); so is any
other split that is not streamed (read whole once). Streamed: a split that reads its rows in batches by
design (`ParquetRows`, the `parquet` loader's `in_memory: false`), or any split not in memory when the run
streams its data (`stream=True`, `data.stream`). It is read through its own `batches(batch_size)` (record
batches in file order; a `Subset` of it through `gather`), else a DataLoader over index ranges; nothing
holds more than one batch of inputs, and the count of correct predictions is exact (an integer), so
streamed and in-memory accuracies of the same predictions are equal. `transform` maps inputs and `relabel`
labels, batch by batch (a continual task's domain transform and output columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from fipray.data.core import _fast_tensors, as_tensors
from fipray.eval.predict import accuracy, check_batch_size, predictions

Transform = Callable[[Tensor], Tensor]


class EvalSplit:
    """A test or validation split, evaluated batch by batch (see the module docstring)."""

    def __init__(self, dataset: Dataset, device: torch.device, *, batch_size: int = 512,
                 transform: Transform | None = None, relabel: Transform | None = None,
                 stream: bool = False) -> None:
        check_batch_size(batch_size)
        self.dataset, self.device, self.batch_size, self.transform = dataset, device, batch_size, transform
        self.relabel = relabel
        self._tensors: tuple[Tensor, Tensor] | None = None
        # streamed: not in memory, and either read as needed by design (a split with its own batches, e.g.
        # ParquetRows) or the run streams its data (`stream`, data.stream); any other split is read whole once
        self.streamed = _fast_tensors(dataset) is None and (stream or _reads_batches(dataset))

    @classmethod
    def of_tensors(cls, x: Tensor, y: Tensor, *, batch_size: int = 512) -> EvalSplit:
        """A split around tensors already on their device (trial validation parts, task splits)."""
        split = cls(torch.utils.data.TensorDataset(x, y), x.device, batch_size=batch_size)
        split._tensors = (x, y)
        return split

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split as tensors on the device (built once): only for splits not streamed."""
        if self._tensors is None:
            if self.streamed:
                raise ValueError(f"the evaluation split ({len(self)} examples) is streamed, not held in memory: "
                                 "read it with batches() / accuracy()")
            x, y = as_tensors(self.dataset)
            x, y = x.to(self.device), y.long().to(self.device)
            self._tensors = (self._transformed(x), self.relabel(y) if self.relabel is not None else y)
        return self._tensors

    def _transformed(self, x: Tensor) -> Tensor:
        if self.transform is None:
            return x
        return torch.cat([self.transform(x[i:i + 256]) for i in range(0, len(x), 256)])

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """`(x, y)` batches of the split in order, on the device."""
        if not self.streamed:
            x, y = self.tensors()
            yield from zip(x.split(self.batch_size), y.split(self.batch_size))
            return
        for x, y in _raw_batches(self.dataset, self.batch_size):
            yield self._batch(x, y)

    def _batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x, y = x.to(self.device), y.long().to(self.device)
        return (self.transform(x) if self.transform is not None else x), (self.relabel(y) if self.relabel else y)

    def accuracy(self, model: nn.Module) -> float:
        """Fraction of the split `model` classifies correctly (an exact count over every example)."""
        if not self.streamed:
            x, y = self.tensors()
            return accuracy(model, x, y, batch_size=self.batch_size)
        correct = total = 0
        for x, y in self.batches():
            pred = predictions(model, x, batch_size=self.batch_size)
            correct += int((pred == y.to(pred.device)).sum())
            total += len(y)
        if total == 0:
            raise ValueError("cannot evaluate on an empty split")
        return correct / total

    def head(self, n: int) -> tuple[Tensor, Tensor]:
        """The first `n` examples (all, if fewer) as tensors on the device."""
        if not self.streamed:
            x, y = self.tensors()
            return x[:n], y[:n]
        xs, ys, got = [], [], 0
        for x, y in self.batches():  # the first batches only, then stop reading
            xs.append(x[: n - got])
            ys.append(y[: n - got])
            got += len(ys[-1])
            if got >= n:
                break
        if not got:
            raise ValueError("cannot take examples from an empty split")
        return torch.cat(xs), torch.cat(ys)


def _reads_batches(ds: Any) -> bool:
    """Whether `ds` (or the dataset under its Subset views) reads its rows in batches by design."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return callable(getattr(ds, "batches", None)) and callable(getattr(ds, "gather", None))


def _raw_batches(ds: Any, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """A dataset's `(x, y)` in order, `batch_size` at a time: its own `batches` when it has them."""
    own = getattr(ds, "batches", None)
    if callable(own):
        yield from own(batch_size)
        return
    base, idx = ds, None
    while isinstance(base, Subset):  # a chain of views (held-out part, a task's classes): one index map
        inner = torch.as_tensor(list(base.indices), dtype=torch.long)
        idx = inner if idx is None else inner[idx]
        base = base.dataset
    if idx is not None and callable(getattr(base, "gather", None)):
        for part in idx.split(batch_size):
            yield base.gather(part)
        return
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        yield torch.as_tensor(x), torch.as_tensor(y)
