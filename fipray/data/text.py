"""Text classification from tables, tokenised to int64 ids: ``text_parquet``, ``text_csv``, ``text_disk``.

Every loader here reads raw text columns and tokenises them with :func:`fipray.data.tokenizer.tokenize`
(a Hugging Face tokenizer from a local folder or a shortcut name, ``"minilm-l6"``, see
:mod:`fipray.models.pretrained`), ``padding="max_length"`` and truncation. Splits are ``TensorDataset`` s
of ``x`` int64 ``(N, L)`` (``[CLS] text [SEP]`` then pad ids) and ``y`` int64 ``(N,)``, ``input_shape=(L,)``.
With a ``text_pair_column`` each ``x`` is ``(2, L)``: the ids of ``[CLS] a [SEP] b [SEP]`` in row 0 and the
``token_type_ids`` (0 for ``a``, 1 for ``b``, 0 on padding) in row 1, ``input_shape=(2, L)``, the layout
``hf_bert`` takes for pairs. Files and folders are local paths or ``s3://``, ``gs://``, ``file://`` URIs
(:mod:`fipray.data.sources`); a split may be a folder of files. The BBC News corpus is :mod:`fipray.data.bbc`.

Labels: integers are class ids as they stand (``class_names`` ``"0"``, ``"1"``, ... or a
``ClassLabel`` 's names); strings become ids in sorted order over both splits. Missing files raise
``FileNotFoundError``; a missing column or split, missing values or unusable labels raise
``ValueError``; both messages name the file and what exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import TensorDataset

from fipray.data.core import DataBundle, register_dataset
from fipray.data.files import load_splits, local_folder, require_columns
from fipray.data.sources import split_tables
from fipray.data.tokenizer import tokenize


@dataclass
class _Split:
    """One split's raw columns, before tokenising."""

    where: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any]


# ---------------------------------------------------------------- columns and labels


def _text_values(values: list[Any], column: str, where: str) -> list[str]:
    missing = sum(v is None for v in values)
    if missing:
        raise ValueError(f"text column {column!r} in {where} has {missing} missing values")
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"column {column!r} in {where} is not text (found {type(bad).__name__} {bad!r})")
    return values


def _split(
    get: Callable[[str], list[Any]],
    existing: Sequence[str],
    where: str,
    text_column: str,
    label_column: str,
    text_pair_column: str | None,
) -> _Split:
    """Read one split's text, pair and label columns through ``get(column) -> values``."""
    wanted = [text_column, *([text_pair_column] if text_pair_column else []), label_column]
    require_columns(wanted, list(existing), where)
    texts = _text_values(get(text_column), text_column, where)
    pairs = _text_values(get(text_pair_column), text_pair_column, where) if text_pair_column else None
    labels = get(label_column)
    missing = sum(v is None for v in labels)
    if missing:
        raise ValueError(f"label column {label_column!r} in {where} has {missing} missing values")
    if not texts:
        raise ValueError(f"no rows in {where}")
    return _Split(where, texts, pairs, labels)


def _label_ids(
    splits: Sequence[_Split], names: Sequence[str] | None = None
) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    """Each split's labels as int64 class ids, and the class names.

    Integers (or booleans) are ids as they stand (``names`` when given, e.g. a ``ClassLabel``'s, else
    ``"0"`` .. ``"K-1"``); strings become ids in sorted order over all splits.
    """
    values = [v for s in splits for v in s.labels]
    if all(isinstance(v, str) for v in values):
        classes = tuple(sorted(set(values)))
        index = {c: i for i, c in enumerate(classes)}
        return [torch.tensor([index[v] for v in s.labels], dtype=torch.long) for s in splits], classes
    if any(isinstance(v, str) for v in values):
        raise ValueError(f"labels in {', '.join(s.where for s in splits)} mix strings and numbers")
    for s in splits:
        bad = next((v for v in s.labels if not isinstance(v, int | np.integer)), None)
        if bad is not None:
            raise ValueError(
                f"labels in {s.where} must be integers or strings, found {type(bad).__name__} {bad!r}"
            )
    ys = [torch.tensor([int(v) for v in s.labels], dtype=torch.long) for s in splits]
    for s, y in zip(splits, ys):
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"labels in {s.where} must be non-negative, found {int(y.min())}")
    top = max(int(y.max()) + 1 for y in ys if y.numel())
    if names is not None:
        if top > len(names):
            raise ValueError(f"labels go up to {top - 1} but only {len(names)} class names: {list(names)}")
        return ys, tuple(names)
    return ys, tuple(str(i) for i in range(top))


def _bundle(
    name: str,
    splits: Sequence[_Split],
    tokenizer: str | Path,
    max_length: int,
    names: Sequence[str] | None = None,
) -> DataBundle:
    """Tokenise a train and a test split into a bundle."""
    ys, class_names = _label_ids(splits, names)
    pair = splits[0].pairs is not None
    xs = [tokenize(s.texts, s.pairs, tokenizer, max_length) for s in splits]
    input_shape = (2, max_length) if pair else (max_length,)
    return DataBundle(
        TensorDataset(xs[0], ys[0]),
        TensorDataset(xs[1], ys[1]),
        num_classes=len(class_names),
        input_shape=input_shape,
        name=name,
        class_names=class_names,
    )


# ---------------------------------------------------------------- file formats


def _table_split(
    table: pa.Table, where: str, text_column: str, label_column: str, text_pair_column: str | None
) -> _Split:
    return _split(
        lambda c: table.column(c).to_pylist(),
        table.column_names,
        where,
        text_column,
        label_column,
        text_pair_column,
    )


@register_dataset("text_parquet")
def text_parquet(
    train: str | Path | None = None,
    test: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    tokenizer: str | Path = "minilm-l6",
    max_length: int = 128,
    path: str | Path | None = None,
    split_column: str = "split",
    train_split: str = "train",
    test_split: str = "test",
) -> DataBundle:
    """Text classification from parquet files, tokenised.

    Args:
        train: Parquet file (or folder / prefix of parquet files) of the training split.
        test: The same for the test split.
        text_column: String column holding the text.
        label_column: Integer (class id) or string (class name) column.
        text_pair_column: String column of second texts; items become ``(2, L)`` sentence pairs.
        tokenizer: Tokenizer folder or shortcut name (default ``"minilm-l6"``).
        max_length: ``L``, the padded/truncated length.
        path: Instead of ``train``/``test``: a folder or prefix with ``<split>.parquet`` /
            ``<split>-*.parquet`` files, or one file whose ``split_column`` names each row's split
            (:mod:`fipray.data.sources`).
        split_column, train_split, test_split: Which split is which.

    Returns:
        A bundle of ``TensorDataset`` s, ``x`` int64 ``(N, L)`` (or ``(N, 2, L)``), ``y`` int64,
        ``class_names`` set, ``name="text_parquet"``.

    Raises:
        FileNotFoundError: A file or the tokenizer does not exist.
        ValueError: A column is missing (the message lists those that exist), holds missing values
            or non-text, or the labels are neither integers nor strings.
    """
    import pyarrow.parquet as pq

    def read(files: list[Path], name: str, extra: Sequence[str]) -> pa.Table:
        wanted = [text_column, *([text_pair_column] if text_pair_column else []), label_column, *extra]
        try:
            tables = []
            for f in files:
                require_columns(wanted, pq.read_schema(f).names, name)
                tables.append(pq.read_table(f, columns=wanted))
        except pa.ArrowInvalid as e:
            raise ValueError(f"cannot read {name} as parquet: {e}") from None
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    tables = split_tables("parquet", read, train, test, path, split_column, (train_split, test_split))
    splits = [_table_split(t, name, text_column, label_column, text_pair_column) for t, name in tables]
    return _bundle("text_parquet", splits, tokenizer, max_length)


@register_dataset("text_csv")
def text_csv(
    train: str | Path | None = None,
    test: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    tokenizer: str | Path = "minilm-l6",
    max_length: int = 128,
    path: str | Path | None = None,
    split_column: str = "split",
    train_split: str = "train",
    test_split: str = "test",
) -> DataBundle:
    """Text classification from CSV files (header row), tokenised.

    Text columns are read as strings whatever they hold (an empty field is the empty text); a label
    column of whole numbers is class ids, anything else class names. Arguments (``path=``: a folder of
    ``<split>.csv`` files or one CSV with a split column), returns and errors as :func:`text_parquet`
    (``name="text_csv"``).
    """
    import pyarrow.csv as pcsv

    text_types = {c: pa.string() for c in (text_column, text_pair_column) if c}

    def read(files: list[Path], name: str, extra: Sequence[str]) -> pa.Table:
        types = {**text_types, **{c: pa.string() for c in extra}}
        try:
            tables = [pcsv.read_csv(f, convert_options=pcsv.ConvertOptions(column_types=types)) for f in files]
        except pa.ArrowInvalid as e:
            raise ValueError(f"cannot read {name} as CSV: {e}") from None
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    tables = split_tables("csv", read, train, test, path, split_column, (train_split, test_split))
    splits = [_table_split(t, name, text_column, label_column, text_pair_column) for t, name in tables]
    return _bundle("text_csv", splits, tokenizer, max_length)


def _columns_of(ds: Any) -> Callable[[str], list[Any]]:
    """``column -> values`` of a ``datasets.Dataset``."""
    return lambda column: list(ds[column])


@register_dataset("text_disk")
def text_disk(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    tokenizer: str | Path = "minilm-l6",
    max_length: int = 128,
) -> DataBundle:
    """Text classification from a ``datasets.DatasetDict`` saved with ``save_to_disk``, tokenised.

    A ``ClassLabel`` label column keeps its names as ``class_names`` (and its size as
    ``num_classes``). Other arguments and returns as :func:`text_parquet` (``name="text_disk"``).

    Args:
        path: The ``save_to_disk`` folder.
        train_split: Split used for training.
        test_split: Split used for testing.

    Raises:
        FileNotFoundError: ``path`` or the tokenizer does not exist.
        ValueError: A split or column is missing (the message lists those that exist), the folder
            holds a single ``Dataset``, or the values are unusable (see :func:`text_parquet`).
    """
    import datasets

    path = local_folder(path)
    train_ds, test_ds = load_splits(path, train_split, test_split)
    splits = [
        _split(_columns_of(ds), ds.column_names, f"{path} [{n}]", text_column, label_column, text_pair_column)
        for n, ds in ((train_split, train_ds), (test_split, test_ds))
    ]
    feature = train_ds.features[label_column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return _bundle("text_disk", splits, tokenizer, max_length, names)
