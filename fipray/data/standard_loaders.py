"""Loaders of the cached standard sets: ``mnist``, ``fashion_mnist``, ``imdb``, ``rotten_tomatoes``.

They read what ``fipray data fetch NAME`` converted (:mod:`fipray.data.standard`), checking each file's
sha256 against the cache manifest, and never download: a set that is not cached raises
:class:`fipray.data.cache.MissingDataError` naming the command to run.

``validation=V`` (every loader) holds out V examples of the *training* split, stratified by class and
drawn with ``seed``; they become the bundle's test split and leave its training split. That is the split
to choose hyperparameters on: the real test split is not even read. Registered when :mod:`fipray.data`
is imported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import TensorDataset

from fipray.data.cache import cached_set, read_cached
from fipray.data.core import DataBundle, register_dataset
from fipray.data.splits import cap_per_class, stratified_first, stratified_holdout
from fipray.data.standard import FASHION_CLASSES, MNIST_CLASSES, SENTIMENT_CLASSES, load_npy
from fipray.data.tokenizer import tokenize


def _check_options(validation: int, limit: int, limit_name: str) -> None:
    for value, name in ((validation, "validation"), (limit, limit_name)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: off), got {value!r}")


def _train_and_eval(name: str, validation: int, seed: int, read):
    """``(train, evaluation)`` as ``(x, y)`` arrays: the test split, or a held-out part of train.

    With ``validation`` the test files are not even read. ``read(raw, split)`` decodes one split from
    the cached files' bytes (``raw``: file name -> bytes).
    """
    splits = ("train",) if validation else ("train", "test")
    raw = read_cached(name, [f for f in cached_set(name).files if f.startswith(splits)])
    train = read(raw, "train")
    if not validation:
        return train, read(raw, "test")
    kept, held = stratified_holdout(train[1], validation, seed)
    return (train[0][kept], train[1][kept]), (train[0][held], train[1][held])


def _read_images(raw: dict[str, bytes], split: str) -> tuple[np.ndarray, np.ndarray]:
    return load_npy(raw[f"{split}_x.npy"]), load_npy(raw[f"{split}_y.npy"])


def _image_tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    images = torch.from_numpy(x).unsqueeze(1).float().div_(255.0)
    return TensorDataset(images, torch.from_numpy(y.astype(np.int64)))


def _images(name: str, classes: tuple[str, ...], validation: int, seed: int, limit: int) -> DataBundle:
    _check_options(validation, limit, "limit")
    train, evaluation = _train_and_eval(name, validation, seed, _read_images)
    if limit:
        keep = stratified_first(train[1], limit)
        train = (train[0][keep], train[1][keep])
    return DataBundle(_image_tensors(*train), _image_tensors(*evaluation), num_classes=len(classes),
                      input_shape=(1, 28, 28), name=name, class_names=classes)


@register_dataset("mnist")
def mnist(validation: int = 0, seed: int = 0, limit: int = 0) -> DataBundle:
    """MNIST (60,000 train / 10,000 test 28×28 digits) from the cache (``fipray data fetch mnist``).

    Pixels are ``uint8 / 255`` in ``[0, 1]``, not normalised (the setting of the published benchmarks;
    normalise in the model if wanted).

    Args:
        validation: When positive, this many training images (stratified, drawn with ``seed``) become
            the test split and leave the training split; the real test split is not read. For choosing
            hyperparameters.
        seed: Seed of the ``validation`` draw.
        limit: When positive, keep only the first ``limit`` training images (in file order, classes in
            proportion) for quick runs; the test split is unchanged.

    Returns:
        A bundle of ``TensorDataset`` s, ``x`` float32 ``(N, 1, 28, 28)``, ``y`` int64,
        ``num_classes=10``, ``class_names`` ``"0"`` .. ``"9"``.

    Raises:
        MissingDataError: The set is not cached (the message says what to run).
        DataCacheError: A cached file is corrupted or truncated (the message names it).
    """
    return _images("mnist", MNIST_CLASSES, validation, seed, limit)


@register_dataset("fashion_mnist")
def fashion_mnist(validation: int = 0, seed: int = 0, limit: int = 0) -> DataBundle:
    """Fashion-MNIST (60,000 / 10,000 28×28 clothing images) from the cache (``fipray data fetch fashion_mnist``).

    Arguments, returns and errors as :func:`mnist`; ``class_names`` are Zalando's ten (``T-shirt/top``
    .. ``Ankle boot``).
    """
    return _images("fashion_mnist", FASHION_CLASSES, validation, seed, limit)


def _read_reviews(raw: dict[str, bytes], split: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(pa.BufferReader(raw[f"{split}.parquet"]))
    return np.asarray(table["text"].to_pylist(), dtype=object), table["label"].to_numpy().astype(np.int64)


def _reviews(name: str, validation: int, seed: int, per_class: int, max_length: int,
             tokenizer: str | Path, test_per_class: int) -> DataBundle:
    _check_options(validation, per_class, "per_class")
    _check_options(validation, test_per_class, "test_per_class")
    train, evaluation = _train_and_eval(name, validation, seed, _read_reviews)
    # Chosen before tokenising: only the kept texts are tokenised.
    keep = np.sort(cap_per_class(np.arange(len(train[1])), train[1], per_class, seed))
    keep_eval = np.sort(cap_per_class(np.arange(len(evaluation[1])), evaluation[1], test_per_class, seed))
    splits = [(train[0][keep], train[1][keep]), (evaluation[0][keep_eval], evaluation[1][keep_eval])]
    xs = [tokenize(list(texts), None, tokenizer, max_length) for texts, _ in splits]
    return DataBundle(
        TensorDataset(xs[0], torch.from_numpy(splits[0][1])),
        TensorDataset(xs[1], torch.from_numpy(splits[1][1])),
        num_classes=2, input_shape=(max_length,), name=name, class_names=SENTIMENT_CLASSES,
    )


@register_dataset("imdb")
def imdb(validation: int = 0, seed: int = 0, per_class: int = 0, max_length: int = 128,
         tokenizer: str | Path = "minilm-l6", test_per_class: int = 0) -> DataBundle:
    """IMDb movie reviews (binary sentiment), tokenised, from the cache (``fipray data fetch imdb``).

    The cached set is IMDb's 25,000 training reviews split once at conversion into 20,000 train and a
    5,000 test split held out with seed 0 (IMDb's official test split is not available offline), see
    :mod:`fipray.data.standard`. Texts are kept as they are (``<br />`` tags included). Tokenised like
    ``bbc_news``: :func:`fipray.data.tokenizer.tokenize`, ``[CLS] text [SEP]`` padded/truncated.

    Args:
        validation: When positive, this many training reviews (stratified, drawn with ``seed``) become
            the test split and leave the training split; the test split is not read.
        seed: Seed of the ``validation`` draw and of the ``per_class`` and ``test_per_class`` choices.
        per_class: When positive, keep at most this many training reviews per class (a random choice
            fixed by ``seed``); the test split is unchanged.
        max_length: ``L``; reviews are truncated (most are longer than 128 tokens).
        tokenizer: Tokenizer folder or shortcut name (default ``"minilm-l6"``, uncased WordPiece).
        test_per_class: When positive, keep at most this many reviews per class of the test split
            (the held-out part with ``validation``): a stratified random subset fixed by ``seed``, for
            cheaper evaluation. 0 (default) keeps the whole split.

    Returns:
        A bundle of ``TensorDataset`` s, ``x`` int64 ``(N, L)``, ``y`` int64 (0 negative, 1 positive),
        ``input_shape=(L,)``, ``class_names=("negative", "positive")``.

    Raises:
        MissingDataError: The set is not cached (the message says what to run).
        DataCacheError: A cached file is corrupted or truncated (the message names it).
        FileNotFoundError: The tokenizer is not installed.
    """
    return _reviews("imdb", validation, seed, per_class, max_length, tokenizer, test_per_class)


@register_dataset("rotten_tomatoes")
def rotten_tomatoes(validation: int = 0, seed: int = 0, per_class: int = 0, max_length: int = 64,
                    tokenizer: str | Path = "minilm-l6", test_per_class: int = 0) -> DataBundle:
    """Rotten Tomatoes sentences (Pang & Lee; binary sentiment), tokenised, from the cache.

    8,530 sentences split once at conversion into 6,824 train and a 1,706 test split held out with
    seed 0. Sentences are short (lower-cased, tokens space-separated), hence ``max_length=64``. Other
    arguments (``test_per_class`` included), returns and errors as :func:`imdb`
    (``fipray data fetch rotten_tomatoes``).
    """
    return _reviews("rotten_tomatoes", validation, seed, per_class, max_length, tokenizer, test_per_class)
