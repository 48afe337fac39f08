"""The `parquet` dataset: numeric columns of Parquet files (local paths or URIs) as features and labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from fipray.data.core import DataBundle, register_dataset
from fipray.data.files import (
    _num_classes,
    _numeric_columns,
    _same_feature_size,
    require_columns,
    table_tensors,
)
from fipray.data.sources import local_files, rows_of_splits, split_specs, where


@register_dataset("parquet")
def parquet(
    train: str | Path | None = None,
    test: str | Path | None = None,
    feature_columns: Sequence[str] | None = None,
    label_column: str = "label",
    input_shape: Sequence[int] | None = None,
    scale: float = 1.0,
    num_classes: int | None = None,
    path: str | Path | None = None,
    split_column: str = "split",
    train_split: str = "train",
    test_split: str = "test",
    in_memory: bool = True,
) -> DataBundle:
    """Tabular (or flattened-image) data from Parquet files: local paths or `s3://`, `gs://`, `file://` URIs.

    Args:
        train: Parquet file (or folder / prefix of Parquet files) of the training split.
        test: The same for the test split.
        feature_columns: Numeric columns (scalars or fixed-length lists) forming ``x``; default: every
            numeric column except the label (and the split column), in file order.
        label_column: Integer label column.
        input_shape: Reshape each feature vector to this (e.g. ``(1, 28, 28)``); default ``(D,)``.
        scale: Features are divided by it (e.g. 255 for 8-bit pixels) to land in ``[0, 1]``.
        num_classes: Defaults to max label + 1 over both splits.
        path: Instead of ``train``/``test``: a folder or prefix with ``<split>.parquet`` /
            ``<split>-*.parquet`` files, or one file whose ``split_column`` names each row's split
            (see :mod:`fipray.data.sources`).
        split_column, train_split, test_split: Which split is which.
        in_memory: False reads neither split whole: :class:`fipray.data.parquet_rows.ParquetRows`
            (batches streamed by row group, items through a memory-mapped copy); needs per-split files.

    Returns:
        A bundle with ``x`` float32 ``(N, *input_shape)`` and ``y`` int64, ``name="parquet"``.

    Raises:
        FileNotFoundError: A file does not exist (named in the message).
        ValueError: A column is missing (the message lists those that exist) or not numeric.
        UriError: A URI cannot be opened or read (named).
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    specs = split_specs("parquet", train, test, path, (train_split, test_split))
    if isinstance(specs, str):
        if not in_memory:
            raise ValueError(f"in_memory: false needs one file (or folder) per split; {where(specs)} holds "
                             f"every split in one file")
        tables, names = _split_rows(specs, split_column, (train_split, test_split)), [where(specs)] * 2
        names = [f"{n} [{s}]" for n, s in zip(names, (train_split, test_split))]
    else:
        files = [local_files(s) for s in specs]
        names = [where(s) for s in specs]
        if not in_memory:
            return _lazy_parquet(files, names, feature_columns, label_column, input_shape, scale, num_classes)
        tables = [_read_table(f, n) for f, n in zip(files, names)]
    if feature_columns is None:
        feature_columns = [c for c in _numeric_columns(tables[0].schema, tables[0].column_names, label_column,
                                                       names[0]) if c != split_column]
    feature_columns = list(feature_columns)
    splits, ys = [], []
    for name, table in zip(names, tables):
        split, y = table_tensors(table, name, feature_columns, label_column, input_shape, scale)
        splits.append(split)
        ys.append(y)
    shape = tuple(splits[0].tensors[0].shape[1:])
    _same_feature_size(shape, tuple(splits[1].tensors[0].shape[1:]))
    return DataBundle(splits[0], splits[1], _num_classes(num_classes, *ys), shape, "parquet")


def _read_table(files: list[Path], name: str) -> pa.Table:
    """One split's Parquet files as one table."""
    import pyarrow.parquet as pq

    try:
        tables = [pq.read_table(f) for f in files]
    except pa.ArrowInvalid as e:
        raise ValueError(f"cannot read {name} as parquet: {e}") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _split_rows(spec: str, split_column: str, splits: Sequence[str]) -> list[pa.Table]:
    """The rows of each split of one file that holds them all, told apart by `split_column`."""
    return rows_of_splits(_read_table(local_files([spec]), where(spec)), split_column, splits, where(spec))


def _lazy_parquet(files: list[list[Path]], names: list[str], feature_columns: Sequence[str] | None,
                  label_column: str, input_shape: Sequence[int] | None, scale: float,
                  num_classes: int | None) -> DataBundle:
    """Both splits as `ParquetRows`: nothing but the labels read now."""
    import pyarrow.parquet as pq

    from fipray.data.parquet_rows import ParquetRows

    schema = pq.read_schema(files[0][0])
    if feature_columns is None:
        feature_columns = _numeric_columns(schema, schema.names, label_column, names[0])
    for f, n in zip(files, names):
        names_f = pq.read_schema(f[0]).names
        require_columns([*feature_columns, label_column], names_f, n)
    splits = [ParquetRows(f, n, list(feature_columns), label_column, input_shape, scale) for f, n in zip(files, names)]
    shapes = [tuple(next(s.batches(1))[0].shape[1:]) for s in splits]
    _same_feature_size(shapes[0], shapes[1])
    return DataBundle(splits[0], splits[1], _num_classes(num_classes, *(s.targets for s in splits)), shapes[0],
                      "parquet")
