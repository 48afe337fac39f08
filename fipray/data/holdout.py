"""Held-out validation data carved from a training split: what sweeps select on, so the test split is
only ever read to report the configs they chose.

    holdout_size(n, validation) -> k          # a fraction (0 < v < 1) or a count (v >= 1) of n examples
    split_holdout(ds, validation, seed)       # (rest, held): stratified by label, fixed by `seed`
    holdout_bundle(bundle, validation, seed)  # a DataBundle: train = rest, test = held
    holdout_stream(stream, validation, seed)  # the same per task of a continual task stream

The split depends only on the dataset, `validation` and `seed`, never on a trial's hyperparameters or
method, so every trial and every method of a sweep scores on the same held-out examples. Each held-out
example is removed from the split a trial trains on (and from the replay memories drawn from it).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from fipray.data.core import DataBundle, dataset_labels, select
from fipray.data.streams import TaskStream


def holdout_size(n: int, validation: float, what: str = "sweep.validation") -> int:
    """How many of `n` training examples `validation` holds out (a fraction below 1, else a count)."""
    if not validation > 0:
        raise ValueError(f"{what} = {validation}: must be a fraction in (0, 1) or a count >= 1")
    k = int(round(validation * n)) if validation < 1 else int(validation)
    if validation >= 1 and validation != int(validation):
        raise ValueError(f"{what} = {validation}: a count of examples must be a whole number")
    if not 0 < k < n:
        raise ValueError(f"{what} = {validation}: holds out {k} of the training split's {n} "
                          f"examples; it must leave at least one on each side")
    return k


def split_holdout(ds: Dataset, validation: float, seed: int = 0, what: str = "sweep.validation") -> tuple[Dataset, Dataset]:
    """(rest, held) of `ds`: `validation` of its examples, stratified by label where every class has two or
    more examples (else a plain seeded draw), both in the dataset's own order."""
    from sklearn.model_selection import train_test_split

    labels = dataset_labels(ds).numpy()
    n = len(labels)
    k = holdout_size(n, validation, what)
    idx = np.arange(n)
    _, counts = np.unique(labels, return_counts=True)
    strat = labels if counts.min() >= 2 and k >= len(counts) and n - k >= len(counts) else None
    rest, held = train_test_split(idx, test_size=k, stratify=strat, random_state=seed)
    return select(ds, torch.from_numpy(np.sort(rest))), select(ds, torch.from_numpy(np.sort(held)))


def holdout_bundle(bundle: DataBundle, validation: float, seed: int = 0,
                   what: str = "sweep.validation") -> DataBundle:
    """`bundle` with its training split cut in two: the rest to train on, the held-out part as its test split."""
    rest, held = split_holdout(bundle.train, validation, seed, what)
    return dataclasses.replace(bundle, train=rest, test=held)


def holdout_stream(stream: TaskStream, validation: float, seed: int = 0,
                   what: str = "sweep.validation") -> TaskStream:
    """Every task of `stream` with its training split cut in two (the held-out part as the task's test split).
    Tasks that share one training set (a domain stream) get the same cut."""
    tasks = []
    for i, t in enumerate(stream.tasks):
        try:
            rest, held = split_holdout(t.train, validation, seed, what)
        except ValueError as e:
            raise ValueError(f"{e} (task {i}: {t.name or i})") from None
        tasks.append(dataclasses.replace(t, train=rest, test=held))
    return dataclasses.replace(stream, tasks=tasks)
