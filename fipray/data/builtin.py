"""Built-in datasets: sklearn digits (bundled, no files needed) and CIFAR-10/100 from a local folder."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fipray.data.core import DataBundle, UInt8ImageDataset, register_dataset


@register_dataset("digits")
def digits(seed: int = 0, test_fraction: float = 0.25) -> DataBundle:
    """sklearn's 8×8 handwritten digits (1797 images, 10 classes).

    Pixel values 0..16 are divided by 16. The train/test split is stratified by class and fixed by
    ``seed``.

    Args:
        seed: ``random_state`` of the split.
        test_fraction: Fraction of examples in the test set.

    Returns:
        A bundle of ``TensorDataset`` s with ``x`` float32 ``(N, 1, 8, 8)`` in ``[0, 1]`` and ``y`` int64
        ``(N,)``; ``input_shape=(1, 8, 8)``, ``num_classes=10``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x = torch.from_numpy((raw.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(raw.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=raw.target, random_state=seed
    )
    # Sorted so the split is a set choice only; shuffling is the data loader's job.
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    return DataBundle(
        train=TensorDataset(x[idx_train], y[idx_train]),
        test=TensorDataset(x[idx_test], y[idx_test]),
        num_classes=10,
        input_shape=(1, 8, 8),
        name="digits",
        class_names=tuple(str(c) for c in raw.target_names),
    )


def _unpickle(path: Path) -> dict[str, object]:
    # The CIFAR files are Python 2 pickles; latin1 decodes their byte strings losslessly.
    # They are trusted local data (the same format torchvision reads).
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _load_cifar(
    root: str | Path, folder: str, train_files, test_files, meta_file, label_key, names_key, title
):
    root = Path(root)
    # Accept torchvision's root (the folder's parent) or the extracted folder itself.
    base = root if root.name == folder else root / folder
    needed = [*train_files, *test_files, meta_file]
    missing = [f for f in needed if not (base / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{title} not found under {root}: expected the folder {base} holding {', '.join(needed)} "
            f"(torchvision's python-pickle layout; missing: {', '.join(missing)}). "
            f"Fetch it once on a connected machine, e.g. torchvision.datasets.{title.replace('-', '')}"
            f"({str(root)!r}, download=True)."
        )

    def load(files):
        parts = [_unpickle(base / f) for f in files]
        data = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts])
        labels = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
        # Rows are 3072 bytes: the red plane, then green, then blue, each 32×32 row-major.
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        return UInt8ImageDataset(images, torch.from_numpy(labels))

    meta = _unpickle(base / meta_file)
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])  # type: ignore[attr-defined]
    return load(train_files), load(test_files), class_names


@register_dataset("cifar10")
def cifar10(root: str | Path) -> DataBundle:
    """CIFAR-10 from torchvision's extracted ``cifar-10-batches-py`` folder (never downloaded).

    The pickles are read directly rather than through ``torchvision.datasets.CIFAR10`` because that
    class insists on the archive's md5 sums, which rejects re-packed or test copies of the same format.

    Args:
        root: The folder containing ``cifar-10-batches-py`` (torchvision's ``root``), or that folder.

    Returns:
        A bundle of :class:`UInt8ImageDataset` s (items float32 ``(3, 32, 32)`` in ``[0, 1]``):
        50000 train, 10000 test, ``num_classes=10``.

    Raises:
        FileNotFoundError: The batch files are missing; the message names the path and expected files.
    """
    train, test, names = _load_cifar(
        root,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
        "CIFAR-10",
    )
    return DataBundle(train, test, 10, (3, 32, 32), "cifar10", names)


@register_dataset("cifar100")
def cifar100(root: str | Path) -> DataBundle:
    """CIFAR-100 (fine labels) from torchvision's extracted ``cifar-100-python`` folder (never downloaded).

    Args:
        root: The folder containing ``cifar-100-python`` (torchvision's ``root``), or that folder.

    Returns:
        A bundle of :class:`UInt8ImageDataset` s (items float32 ``(3, 32, 32)`` in ``[0, 1]``):
        50000 train, 10000 test, ``num_classes=100``.

    Raises:
        FileNotFoundError: The files ``train``, ``test``, ``meta`` are missing; the message names the path.
    """
    train, test, names = _load_cifar(
        root, "cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names", "CIFAR-100"
    )
    return DataBundle(train, test, 100, (3, 32, 32), "cifar100", names)
