"""An evaluation split read in batches: accuracy over any size of test/validation set in bounded memory.

    split = EvalSplit(bundle.test, device, batch_size=512, transform=eval_tf)
    split.accuracy(model)        # every example, one batch in memory at a time
    x, y = split.head(256)       # the first examples as tensors (held-out drift, attacks on eval_examples)

A split already in memory (a `TensorDataset`, 8-bit images, a `Subset` of them) is evaluated from its
tensors, exactly as `fipray.eval.predict.accuracy` always did (same batches, same numbers). Any other
dataset is streamed: its own `batches(batch_size)` when it has one (`ParquetRows`: record batches in file
order), else a DataLoader over index ranges; nothing holds more than one batch of inputs, and the count of
correct predictions is exact (an integer), so streamed and in-memory accuracies of the same predictions are
equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from fipray.data.core import _fast_tensors
from fipray.eval.predict import accuracy, check_batch_size, predictions

Transform = Callable[[Tensor], Tensor]


class EvalSplit:
    """A test or validation split, evaluated batch by batch (see the module docstring)."""

    def __init__(self, dataset: Dataset, device: torch.device, *, batch_size: int = 512,
                 transform: Transform | None = None) -> None:
        check_batch_size(batch_size)
        self.dataset, self.device, self.batch_size, self.transform = dataset, device, batch_size, transform
        self._tensors: tuple[Tensor, Tensor] | None = None
        self.streamed = _fast_tensors(dataset) is None

    @classmethod
    def of_tensors(cls, x: Tensor, y: Tensor, *, batch_size: int = 512) -> EvalSplit:
        """A split around tensors already on their device (trial validation parts, task splits)."""
        split = cls(torch.utils.data.TensorDataset(x, y), x.device, batch_size=batch_size)
        split._tensors = (x, y)
        return split

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split as tensors on the device (built once): only for splits held in memory anyway."""
        if self._tensors is None:
            if self.streamed:
                raise ValueError(f"the evaluation split ({len(self)} examples) is streamed, not held in memory: "
                                 "read it with batches() / accuracy()")
            fast = _fast_tensors(self.dataset)
            assert fast is not None
            x, y = fast[0].to(self.device), fast[1].long().to(self.device)
            self._tensors = (self._transformed(x), y)
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
            x = x.to(self.device)
            yield (self.transform(x) if self.transform is not None else x), y.long().to(self.device)

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
        for x, y in _raw_batches(self.dataset, self.batch_size):  # the first batches only, then stop reading
            xs.append(x[: n - got])
            ys.append(y[: n - got])
            got += len(ys[-1])
            if got >= n:
                break
        if not got:
            raise ValueError("cannot take examples from an empty split")
        x = torch.cat(xs).to(self.device)
        return (self._transformed(x) if self.transform is not None else x), torch.cat(ys).long().to(self.device)


def _raw_batches(ds: Any, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """A dataset's `(x, y)` in order, `batch_size` at a time: its own `batches` when it has them."""
    own = getattr(ds, "batches", None)
    if callable(own):
        yield from own(batch_size)
        return
    if isinstance(ds, Subset) and callable(getattr(ds.dataset, "gather", None)):
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        for part in idx.split(batch_size):
            yield ds.dataset.gather(part)  # type: ignore[attr-defined]
        return
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        yield torch.as_tensor(x), torch.as_tensor(y)
