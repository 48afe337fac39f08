"""Stratified index choices shared by the loaders: held-out parts, first-k subsets, per-class caps.

All take labels as an int array and return sorted int64 indices (a split is a set choice only;
shuffling is the data loader's job). Class sizes are allotted in proportion to the class counts,
rounded by largest remainder (ties to the lower class id), so the totals are exact.
"""

from __future__ import annotations

import numpy as np


def allot(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` split over classes in proportion to ``counts`` (largest remainder; exact sum)."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = counts * total / counts.sum()
    share = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - share), kind="stable")
    share[order[: total - int(share.sum())]] += 1
    return share


def _check_size(size: int, n: int, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 0 <= size < n:
        raise ValueError(f"{what} must be an integer in [0, {n}) (the number of examples), got {size!r}")


def stratified_holdout(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random held-out part of ``size`` examples, stratified by class and fixed by ``seed``.

    Returns:
        ``(kept, held_out)``: disjoint sorted indices covering ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    _check_size(size, len(labels), "the held-out size")
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, allot(counts, size))]
    held_out = np.sort(np.concatenate(held)).astype(np.int64)
    kept = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_out)
    return kept, held_out


def stratified_first(labels: np.ndarray, k: int) -> np.ndarray:
    """The first examples of each class (in dataset order), ``k`` in all, classes in proportion."""
    labels = np.asarray(labels)
    if k >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    _check_size(k, len(labels), "limit")
    classes, counts = np.unique(labels, return_counts=True)
    first = [np.flatnonzero(labels == c)[:n] for c, n in zip(classes, allot(counts, k))]
    return np.sort(np.concatenate(first)).astype(np.int64)


def cap_per_class(idx: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """At most ``per_class`` of ``idx`` from each class, a random choice fixed by ``seed`` (0: all of them)."""
    if per_class <= 0:
        return idx
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(idx[labels[idx] == k])[:per_class] for k in np.unique(labels[idx])]
    return np.concatenate(keep)
