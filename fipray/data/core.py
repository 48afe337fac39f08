"""Dataset bundle, registry and tensor helpers shared by every data source.

Datasets yield ``(x, y)`` with ``x`` float32 in ``[0, 1]`` of shape ``input_shape`` (or int64 token
ids of shape ``(L,)``) and ``y`` an int64 scalar. Built-in sources return in-memory datasets
(:class:`torch.utils.data.TensorDataset` or :class:`UInt8ImageDataset`) so the helpers here can
take whole tensors instead of iterating; any other :class:`torch.utils.data.Dataset` works through
a slower generic path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fipray.registry import Registry


@dataclass
class DataBundle:
    """A train/test pair with what a model needs to know about it.

    Users can build one directly around their own datasets, e.g.
    ``DataBundle(my_train, my_test, num_classes=10, input_shape=(3, 32, 32))``, or let
    :meth:`from_datasets` infer the last two.

    Attributes:
        train: Training set; items ``(x, y)``, ``x`` of shape ``input_shape``, ``y`` int64 scalar.
        test: Test set, same item layout.
        num_classes: Number of classes; labels lie in ``[0, num_classes)``.
        input_shape: Per-example shape of ``x``, e.g. ``(1, 8, 8)`` or ``(L,)`` for token ids.
        name: Source name (``"digits"``, ``"cifar10"``, ...), ``"custom"`` for user bundles.
        class_names: Optional human-readable class names, ``num_classes`` of them.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str = "custom"
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.train = _as_dataset(self.train, "train")
        self.test = _as_dataset(self.test, "test")
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.num_classes = int(self.num_classes)

    @classmethod
    def from_datasets(
        cls,
        train: Dataset,
        test: Dataset,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        name: str = "custom",
    ) -> DataBundle:
        """Wrap user datasets, inferring ``num_classes`` (max label + 1) and ``input_shape`` (first item).

        Inferring ``num_classes`` reads every label (see :func:`dataset_labels`); pass it to skip that.
        """
        if num_classes is None:
            labels = torch.cat([dataset_labels(train), dataset_labels(test)])
            num_classes = int(labels.max()) + 1 if labels.numel() else 0
        if input_shape is None:
            input_shape = tuple(torch.as_tensor(train[0][0]).shape)
        return cls(train, test, num_classes, tuple(input_shape), name)


def _as_dataset(split: Any, field: str) -> Dataset:
    """A Dataset as it is; an `(x, y)` pair of numpy arrays or tensors converted to a TensorDataset (x float32, or
    int64 token ids when integer; y int64), with a warning saying so; anything else a TypeError naming the field."""
    import warnings

    import numpy as np

    if isinstance(split, Dataset):
        return split
    if isinstance(split, (tuple, list)) and len(split) == 2 and all(isinstance(a, (np.ndarray, torch.Tensor))
                                                                   for a in split):
        x, y = (torch.as_tensor(a) for a in split)
        if len(x) != len(y):
            raise ValueError(f"DataBundle.{field}: {len(x)} inputs but {len(y)} labels")
        x = x.long() if not x.is_floating_point() and x.dtype != torch.bool else x.float()
        warnings.warn(f"DataBundle.{field}: converted the (x, y) arrays to a TensorDataset (x {x.dtype}, y int64)",
                      stacklevel=3)
        return TensorDataset(x, y.long())
    kind = type(split).__name__
    raise TypeError(f"DataBundle.{field} must be a torch Dataset (e.g. TensorDataset(x, y)) or an (x, y) pair of "
                    f"arrays, got {kind}" + (": a bare array has no labels" if isinstance(split, np.ndarray) else ""))


DATASETS: Registry[Callable[..., DataBundle]] = Registry("dataset")


class UInt8ImageDataset(Dataset):
    """Images kept as uint8 and scaled to float32 ``[0, 1]`` per item.

    Storing bytes keeps CIFAR-sized sets at a quarter of the float32 footprint; :func:`as_tensors`
    converts in one vectorised step.

    Args:
        images: ``(N, C, H, W)`` uint8.
        targets: ``(N,)`` integer labels.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if images.shape[0] != targets.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
        self.images = images
        self.targets = targets.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i].float().div_(255.0), self.targets[i]

    def float_images(self) -> torch.Tensor:
        """All images as float32 ``(N, C, H, W)`` in ``[0, 1]``."""
        return self.images.float().div_(255.0)


def register_dataset(name: str | None = None):
    """Decorator registering a ``factory(**kwargs) -> DataBundle`` under ``name`` (default: function name)."""
    return DATASETS.register(name)


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a glob ``pattern``."""
    return DATASETS.names(pattern)


def get_data(name: str, **kwargs: Any) -> DataBundle:
    """Load a registered dataset.

    Args:
        name: A name from :func:`list_datasets`.
        **kwargs: The dataset's options (see each loader).

    Returns:
        The :class:`DataBundle`.

    Raises:
        KeyError: Unknown ``name``; the message lists the available ones.
        TypeError: Options the loader does not take; the message names them.
    """
    factory = DATASETS.get(name)
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"dataset {name!r} got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(params)}"
        )
    return factory(**kwargs)


def _fast_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x, y)`` without iterating when ``ds`` is (a Subset chain over) an in-memory dataset, else None."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1]
    if isinstance(ds, UInt8ImageDataset):
        return ds.float_images(), ds.targets
    if isinstance(ds, Subset):
        parent = _fast_tensors(ds.dataset)
        if parent is not None:
            idx = torch.as_tensor(ds.indices, dtype=torch.long)
            return parent[0][idx], parent[1][idx]
    return None


def as_tensors(ds: Dataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise a dataset as two tensors.

    Args:
        ds: Any map-style dataset yielding ``(x, y)``.
        batch_size: Batch size for the generic (iterating) path.

    Returns:
        ``x`` of shape ``(N, *input_shape)`` (float32 images/features, int64 token ids) and ``y`` int64
        ``(N,)``. For a ``TensorDataset`` these are its own tensors (no copy).
    """
    fast = _fast_tensors(ds)
    if fast is not None:
        return fast[0], fast[1].long()
    xs, ys = [], []
    # num_workers=0: the data is usually small and worker start-up would dominate.
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    if not xs:
        raise ValueError("cannot materialise an empty dataset")
    return torch.cat(xs), torch.cat(ys).long()


def _fast_labels(ds: Dataset) -> torch.Tensor | None:
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    if isinstance(ds, Subset):
        parent = _fast_labels(ds.dataset)
        if parent is not None:
            return parent[torch.as_tensor(ds.indices, dtype=torch.long)]
        return None
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).long()
    return None


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """All labels of ``ds`` as an int64 tensor ``(N,)``, in dataset order.

    Reads ``TensorDataset`` tensors, a ``.targets`` attribute (torchvision style) or Subset indices
    directly; otherwise loads each item, which is slow for large datasets with costly ``x``.
    """
    fast = _fast_labels(ds)
    if fast is not None:
        return fast
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)  # type: ignore[arg-type]


def select(ds: Dataset, indices: torch.Tensor | Sequence[int]) -> Dataset:
    """The items of ``ds`` at ``indices``, keeping the in-memory type when there is one.

    ``TensorDataset``/``UInt8ImageDataset`` are indexed into new datasets of the same type (so the
    fast paths survive splitting); a ``Subset`` is re-pointed at its parent (no nesting); anything
    else becomes a ``Subset``.
    """
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    if isinstance(ds, UInt8ImageDataset):
        return UInt8ImageDataset(ds.images[idx], ds.targets[idx])
    if isinstance(ds, Subset):
        parent_idx = torch.as_tensor(ds.indices, dtype=torch.long)[idx]
        return select(ds.dataset, parent_idx)
    return Subset(ds, idx.tolist())
