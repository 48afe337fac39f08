"""Deterministic minibatches: batch t is a pure function of (seed, t).

Epoch e uses the permutation drawn from a generator seeded with (seed, e), so a run resumed at
step t sees exactly the batches the uninterrupted run would have seen, with no sampler state.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (order matters)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class BatchStream:
    """Indices of batch t over a dataset of n items, epoch-wise without replacement."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n <= 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.n, self.seed = n, seed
        self.batch_size = min(batch_size, n)
        self.per_epoch = max(1, n // self.batch_size)
        self._epoch = -1
        self._perm: Tensor | None = None

    def indices(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        assert self._perm is not None
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]
