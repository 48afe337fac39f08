"""Unit tests for fipray.data: loaders on tiny local files, tensor helpers, task splits, memories."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from fipray.data import (
    DataBundle,
    Task,
    UInt8ImageDataset,
    as_tensors,
    dataset_labels,
    get_data,
    list_datasets,
    memory_subset,
    split_tasks,
)


@pytest.fixture(scope="module")
def digits():
    return get_data("digits")


# ---------------------------------------------------------------- registry and digits


def test_registry_lists_and_rejects():
    assert {"digits", "cifar10", "cifar100", "hf_disk", "parquet"} <= set(list_datasets())
    with pytest.raises(KeyError, match="digits"):
        get_data("mnist_typo")
    with pytest.raises(TypeError, match="bogus"):
        get_data("digits", bogus=1)


def test_digits_shapes_and_range(digits):
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8) and digits.name == "digits"
    assert isinstance(digits.train, TensorDataset) and isinstance(digits.test, TensorDataset)
    xtr, ytr = digits.train.tensors
    xte, yte = digits.test.tensors
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.shape[1:] == (1, 8, 8)
    assert len(ytr) + len(yte) == 1797
    assert len(yte) == pytest.approx(0.25 * 1797, abs=1)
    assert 0.0 <= float(torch.cat([xtr, xte]).min()) and float(torch.cat([xtr, xte]).max()) == 1.0


def test_digits_split_is_stratified(digits):
    ytr, yte = digits.train.tensors[1], digits.test.tensors[1]
    total = torch.bincount(torch.cat([ytr, yte]), minlength=10).double()
    test_counts = torch.bincount(yte, minlength=10).double()
    assert torch.all((test_counts - 0.25 * total).abs() <= 1)


def test_digits_is_deterministic_by_seed(digits):
    again = get_data("digits", seed=0)
    assert torch.equal(again.train.tensors[0], digits.train.tensors[0])
    assert torch.equal(again.test.tensors[1], digits.test.tensors[1])
    other = get_data("digits", seed=1, test_fraction=0.5)
    assert len(other.test) == pytest.approx(1797 / 2, abs=1)
    assert not torch.equal(get_data("digits", seed=1).test.tensors[0], digits.test.tensors[0])


# ---------------------------------------------------------------- tensors helpers


def test_as_tensors_and_labels_fast_paths(digits):
    x, y = as_tensors(digits.train)
    assert x is digits.train.tensors[0]
    sub = Subset(digits.train, [5, 1, 3])
    xs, ys = as_tensors(sub)
    assert torch.equal(xs, x[[5, 1, 3]]) and torch.equal(ys, y[[5, 1, 3]])
    assert torch.equal(dataset_labels(sub), y[[5, 1, 3]])
    assert torch.equal(dataset_labels(Subset(sub, [2, 0])), y[[3, 5]])


# ---------------------------------------------------------------- tasks and memory


def test_split_tasks_digits_five_by_two(digits):
    tasks = split_tasks(digits, 5)
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert [t.index for t in tasks] == list(range(5))
    assert all(isinstance(t, Task) and isinstance(t.train, TensorDataset) for t in tasks)
    seen_train, seen_test = set(), set()
    for t in tasks:
        ytr, yte = dataset_labels(t.train), dataset_labels(t.test)
        # Labels stay global: no relabelling to 0..k-1.
        assert set(ytr.tolist()) == set(t.classes) == set(yte.tolist())
        assert not seen_train & set(t.classes)
        seen_train |= set(ytr.tolist())
        seen_test |= set(yte.tolist())
    assert seen_train == seen_test == set(range(10))
    assert sum(len(t.train) for t in tasks) == len(digits.train)
    assert sum(len(t.test) for t in tasks) == len(digits.test)
    # The default for digits is the same split.
    assert [t.classes for t in split_tasks(digits)] == [t.classes for t in tasks]


def test_split_tasks_order_and_errors(digits):
    order = [9, 3, 1, 7, 0, 2, 4, 5, 6, 8]
    tasks = split_tasks(digits, classes_per_task=5, class_order=order)
    assert [t.classes for t in tasks] == [(9, 3, 1, 7, 0), (2, 4, 5, 6, 8)]
    assert set(dataset_labels(tasks[0].train).tolist()) == {9, 3, 1, 7, 0}
    assert len(split_tasks(digits, 2, 3)) == 2  # uses the first 6 classes
    with pytest.raises(ValueError, match="divide"):
        split_tasks(digits, 3)
    with pytest.raises(ValueError, match="unknown classes"):
        split_tasks(digits, 1, class_order=[0, 10])
    with pytest.raises(ValueError, match="repeats"):
        split_tasks(digits, 1, class_order=[0, 0])
    with pytest.raises(ValueError, match="only 10"):
        split_tasks(digits, 6, 2)


def test_memory_subset_is_stratified_and_deterministic(digits):
    task = split_tasks(digits, 5)[1]
    mem = memory_subset(task.train, 20, seed=3)
    assert isinstance(mem, TensorDataset) and len(mem) == 20
    assert torch.bincount(dataset_labels(mem), minlength=4)[2:].tolist() == [10, 10]
    again = memory_subset(task.train, 20, seed=3)
    assert torch.equal(as_tensors(mem)[0], as_tensors(again)[0])
    other = memory_subset(task.train, 20, seed=4)
    assert not torch.equal(as_tensors(mem)[0], as_tensors(other)[0])
    odd = torch.bincount(dataset_labels(memory_subset(task.train, 21, seed=0)), minlength=4)[2:]
    assert sorted(odd.tolist()) == [10, 11]
    assert len(memory_subset(task.train, 10**6, seed=0)) == len(task.train)
    assert len(memory_subset(task.train, 0, seed=0)) == 0


def test_memory_subset_fills_from_larger_classes():
    y = torch.tensor([0] * 3 + [1] * 50)
    ds = TensorDataset(torch.arange(53).float()[:, None], y)
    counts = torch.bincount(dataset_labels(memory_subset(ds, 20, seed=0)))
    assert counts.tolist() == [3, 17]


# ---------------------------------------------------------------- user datasets


class SquaresDataset(Dataset):
    """A user dataset with no fast paths: items built on access, int labels."""

    def __init__(self, n: int, num_classes: int = 4):
        self.n, self.k = n, num_classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((2, 3), i / self.n), i % self.k


def test_user_dataset_through_helpers_and_tasks():
    train, test = SquaresDataset(40), SquaresDataset(12)
    x, y = as_tensors(train, batch_size=7)
    assert x.shape == (40, 2, 3) and y.dtype == torch.int64
    assert torch.equal(y, torch.arange(40) % 4)
    assert torch.equal(dataset_labels(test), torch.arange(12) % 4)

    bundle = DataBundle.from_datasets(train, test)
    assert bundle.num_classes == 4 and bundle.input_shape == (2, 3) and bundle.name == "custom"
    tasks = split_tasks(bundle, num_tasks=2)
    assert [t.classes for t in tasks] == [(0, 1), (2, 3)]
    assert isinstance(tasks[0].train, Subset)
    xt, yt = as_tensors(tasks[1].train)
    assert set(yt.tolist()) == {2, 3} and len(yt) == 20
    mem = memory_subset(tasks[1].train, 6, seed=0)
    # Subsets are re-pointed at the user's dataset instead of nesting.
    assert isinstance(mem, Subset) and mem.dataset is train
    assert torch.bincount(dataset_labels(mem)).tolist()[2:] == [3, 3]

    direct = DataBundle(train, test, num_classes=4, input_shape=(2, 3))
    assert [t.classes for t in split_tasks(direct, classes_per_task=1)] == [(0,), (1,), (2,), (3,)]
    with pytest.raises(ValueError, match="num_tasks"):
        split_tasks(direct)


# ---------------------------------------------------------------- CIFAR (fake files in the real format)


def _write_cifar(folder, files, label_key, names_key, num_classes, n=4):
    """Write tiny CIFAR pickles like the originals: bytes keys, (n, 3072) uint8 rows."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for i, name in enumerate(files):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(i + j) % num_classes for j in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), label_key: labels, b"data": data}, f)
        written[name] = (data, labels)
    return written


def test_cifar10_loads_fake_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = _write_cifar(base, names, b"labels", None, 10)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f)

    bundle = get_data("cifar10", root=tmp_path)
    assert bundle.num_classes == 10 and bundle.input_shape == (3, 32, 32)
    assert len(bundle.train) == 20 and len(bundle.test) == 4
    assert isinstance(bundle.train, UInt8ImageDataset)
    assert bundle.class_names == tuple(f"c{i}" for i in range(10))
    x, y = bundle.test[1]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y.dtype == torch.int64
    data, labels = written["test_batch"]
    # Row layout: channel planes of 32x32 row-major pixels.
    assert x[2, 5, 7] == pytest.approx(data[1, 2 * 1024 + 5 * 32 + 7] / 255)
    assert int(y) == labels[1]
    xs, ys = as_tensors(bundle.train)
    assert xs.shape == (20, 3, 32, 32) and 0 <= xs.min() and xs.max() <= 1
    assert torch.equal(ys, torch.tensor([lab for n in names[:5] for lab in written[n][1]]))
    # Splitting keeps the compact uint8 storage.
    tasks = split_tasks(bundle)
    assert len(tasks) == 5 and isinstance(tasks[0].train, UInt8ImageDataset)
    # The extracted folder itself is accepted as root too.
    assert len(get_data("cifar10", root=base).test) == 4


def test_cifar100_loads_fake_files(tmp_path):
    base = tmp_path / "cifar-100-python"
    _write_cifar(base, ["train", "test"], b"fine_labels", None, 100, n=6)
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f)
    bundle = get_data("cifar100", root=tmp_path)
    assert bundle.num_classes == 100 and len(bundle.train) == 6
    assert bundle.class_names[:2] == ("f0", "f1")
    assert [len(t.classes) for t in split_tasks(bundle)] == [10] * 10


def test_cifar_missing_root_names_path(tmp_path):
    missing = tmp_path / "no_cifar_here"
    with pytest.raises(FileNotFoundError, match="no_cifar_here") as info:
        get_data("cifar10", root=missing)
    assert "cifar-10-batches-py" in str(info.value) and "data_batch_1" in str(info.value)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        get_data("cifar100", root=missing)


# ---------------------------------------------------------------- hf_disk


def test_hf_disk_images_features_tokens(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        return {
            "img": [Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)) for _ in range(n)],
            "a": rng.random(n).tolist(),
            "v": rng.random((n, 3)).tolist(),
            "input_ids": [list(range(1, 2 + i)) for i in range(n)],
            "label": [i % 3 for i in range(n)],
        }

    features = datasets.Features(
        {
            "img": datasets.Image(),
            "a": datasets.Value("float64"),
            "v": datasets.List(datasets.Value("float64")),
            "input_ids": datasets.List(datasets.Value("int64")),
            "label": datasets.ClassLabel(names=["x", "y", "z", "w"]),
        }
    )
    raw = {"train": split(6), "test": split(4)}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in raw.items()})
    dd.save_to_disk(str(tmp_path / "dd"))

    images = get_data("hf_disk", path=tmp_path / "dd")  # image column found from its feature type
    assert images.input_shape == (3, 6, 5) and images.num_classes == 4
    x, y = images.train[2]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    expected = np.asarray(raw["train"]["img"][2]).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6)
    assert int(y) == 2

    feats = get_data("hf_disk", path=tmp_path / "dd", feature_columns=["a", "v"])
    assert feats.input_shape == (4,)
    fx, _ = as_tensors(feats.test)
    np.testing.assert_allclose(fx[:, 0].numpy(), raw["test"]["a"], rtol=1e-6)
    np.testing.assert_allclose(fx[:, 1:].numpy(), raw["test"]["v"], rtol=1e-6)

    toks = get_data("hf_disk", path=tmp_path / "dd", input_ids_column="input_ids", max_length=4)
    tx, _ = as_tensors(toks.train)
    assert toks.input_shape == (4,) and tx.dtype == torch.int64
    assert tx[0].tolist() == [1, 0, 0, 0] and tx[5].tolist() == [1, 2, 3, 4]
    longest = get_data("hf_disk", path=tmp_path / "dd", input_ids_column="input_ids")
    assert longest.input_shape == (6,)  # longest row: range(1, 7)

    with pytest.raises(ValueError, match="input_ids") as info:
        get_data("hf_disk", path=tmp_path / "dd", image_column="picture")
    assert "picture" in str(info.value)
    with pytest.raises(ValueError, match="validation"):
        get_data("hf_disk", path=tmp_path / "dd", test_split="validation", feature_columns=["a"])
    with pytest.raises(FileNotFoundError, match="not_saved"):
        get_data("hf_disk", path=tmp_path / "not_saved")


# ---------------------------------------------------------------- parquet


def test_parquet_features_reshape_and_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for name, n in (("train", 8), ("test", 4)):
        pixels = rng.integers(0, 256, (n, 4))
        table = pa.table(
            {
                "label": np.arange(n) % 3,
                **{f"p{i}": pixels[:, i] for i in range(4)},
                "note": [f"row{i}" for i in range(n)],  # non-numeric: skipped by default
            }
        )
        pq.write_table(table, tmp_path / f"{name}.parquet")

    bundle = get_data(
        "parquet",
        train=tmp_path / "train.parquet",
        test=tmp_path / "test.parquet",
        input_shape=(1, 2, 2),
        scale=255,
    )
    assert bundle.input_shape == (1, 2, 2) and bundle.num_classes == 3 and len(bundle.train) == 8
    x, y = as_tensors(bundle.train)
    table = pq.read_table(tmp_path / "train.parquet")
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert x[3, 0, 1, 0].item() == pytest.approx(table.column("p2")[3].as_py() / 255)
    assert torch.equal(y, torch.arange(8) % 3)

    flat = get_data(
        "parquet",
        train=tmp_path / "train.parquet",
        test=tmp_path / "test.parquet",
        feature_columns=["p0", "p3"],
    )
    assert flat.input_shape == (2,)

    with pytest.raises(ValueError, match="p0, p1, p2, p3|'p0'") as info:
        get_data(
            "parquet",
            train=tmp_path / "train.parquet",
            test=tmp_path / "test.parquet",
            feature_columns=["px"],
        )
    assert "px" in str(info.value)
    with pytest.raises(ValueError, match="not numeric"):
        get_data(
            "parquet",
            train=tmp_path / "train.parquet",
            test=tmp_path / "test.parquet",
            feature_columns=["note"],
        )
    with pytest.raises(ValueError, match="reshaped"):
        get_data(
            "parquet", train=tmp_path / "train.parquet", test=tmp_path / "test.parquet", input_shape=(3,)
        )
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        get_data("parquet", train=tmp_path / "absent.parquet", test=tmp_path / "test.parquet")
