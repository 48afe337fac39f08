"""Datasets from a Hugging Face ``save_to_disk`` folder (a local path or a URI, fetched once per node), and
the column conversions the Parquet loader shares (``table_tensors``).

The splits are materialised in memory (``TensorDataset``, or :class:`UInt8ImageDataset` for 8-bit images) so
the fast tensor paths apply; they suit datasets that fit in RAM (``parquet`` with ``in_memory: false`` for
splits that do not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset, TensorDataset

from fipray.data.core import DataBundle, UInt8ImageDataset, register_dataset
from fipray.uri import cached_folder, display, file_info, is_remote


def _is_numeric(t: pa.DataType) -> bool:
    """Arrow numbers, booleans, or (nested) lists of them."""
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _is_numeric(t.value_type)
    return False


def require_columns(wanted: Sequence[str], existing: Sequence[str], where: str) -> None:
    missing = [c for c in wanted if c not in existing]
    if missing:
        raise ValueError(
            f"column(s) {', '.join(map(repr, missing))} not in {where}; columns: {', '.join(existing)}"
        )


def labels_of(values, where: str) -> torch.Tensor:
    arr = np.asarray(values)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        raise ValueError(
            f"labels in {where} must be integers, got dtype {arr.dtype}; encode them as class ids first"
        )
    if arr.size and arr.min() < 0:
        raise ValueError(f"labels in {where} must be non-negative, found {arr.min()}")
    return torch.from_numpy(arr.astype(np.int64).reshape(-1))


def _num_classes(given: int | None, *labels: torch.Tensor) -> int:
    top = max((int(y.max()) + 1 for y in labels if y.numel()), default=0)
    if given is None:
        return top
    if top > given:
        raise ValueError(f"num_classes={given} but labels go up to {top - 1}")
    return given


def _features(columns: list[np.ndarray], names: Sequence[str], where: str) -> np.ndarray:
    """Stack numeric columns into ``(N, D)`` float32, flattening vector-valued columns."""
    parts = []
    for name, col in zip(names, columns):
        try:
            arr = np.asarray(col, dtype=np.float32)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"column {name!r} in {where} is not numeric with a fixed length per row: {err}"
            ) from None
        parts.append(arr.reshape(arr.shape[0], -1))
    return np.concatenate(parts, axis=1)


def _reshape(x: np.ndarray, input_shape: Sequence[int] | None, where: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if input_shape is None:
        return t
    shape = tuple(int(s) for s in input_shape)
    if math.prod(shape) != t.shape[1]:
        raise ValueError(f"{where}: {t.shape[1]} features per row cannot be reshaped to input_shape {shape}")
    return t.reshape(-1, *shape)


def _to_chw(img) -> np.ndarray:
    """One image (PIL or array; ``HW``, ``HWC`` or ``CHW``) as a ``CHW`` array, dtype unchanged."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise ValueError(f"images must be 2-D or 3-D, got shape {arr.shape}")
    # PIL and most array datasets are channels-last; treat as CHW only when that is unambiguous.
    if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        return arr
    return np.moveaxis(arr, -1, 0)


def _image_dataset(images, labels: torch.Tensor, where: str) -> Dataset:
    """Stack images into uint8 storage (8-bit sources) or float32 ``[0, 1]``."""
    chw = [_to_chw(im) for im in images]
    shapes = {a.shape for a in chw}
    if len(shapes) > 1:
        raise ValueError(
            f"images in {where} have different shapes {sorted(shapes)[:5]}; resize them to one size first"
        )
    if not chw:
        raise ValueError(f"no images in {where}")
    stacked = np.stack(chw)
    if stacked.dtype == np.uint8:
        return UInt8ImageDataset(torch.from_numpy(stacked), labels)
    if np.issubdtype(stacked.dtype, np.integer):
        if stacked.min() < 0 or stacked.max() > 255:
            raise ValueError(
                f"integer images in {where} must be 8-bit (0..255), found {stacked.min()}..{stacked.max()}"
            )
        return UInt8ImageDataset(torch.from_numpy(stacked.astype(np.uint8)), labels)
    x = stacked.astype(np.float32)
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"float images in {where} must lie in [0, 1], found {x.min()}..{x.max()}")
    return TensorDataset(torch.from_numpy(x), labels)


def _tokens(rows, max_length: int, pad_token_id: int) -> torch.Tensor:
    """Pad (with ``pad_token_id``) or truncate token lists to ``(N, max_length)`` int64."""
    out = torch.full((len(rows), max_length), pad_token_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        ids = list(ids)[:max_length]
        out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return out


@register_dataset("hf_disk")
def hf_disk(
    path: str | Path,
    image_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    label_column: str = "label",
    train_split: str = "train",
    test_split: str = "test",
    input_ids_column: str | None = None,
    max_length: int | None = None,
    pad_token_id: int = 0,
    num_classes: int | None = None,
) -> DataBundle:
    """A ``datasets.DatasetDict`` saved with ``save_to_disk``, as image, feature or token data.

    The kind of ``x`` is picked by which of ``image_column`` / ``feature_columns`` /
    ``input_ids_column`` is given (at most one). With none, it is inferred: an ``Image``-typed (or
    ``"image"``/``"img"``) column, else an ``"input_ids"`` column, else all numeric columns but the label.

    * images (PIL or arrays, ``HW``/``HWC``/``CHW``) → float32 ``(C, H, W)`` in ``[0, 1]`` (8-bit
      values are divided by 255, float images must already lie in ``[0, 1]``);
    * numeric feature columns (scalars or fixed-length lists) → one float32 vector ``(D,)``;
    * token ids → int64 ``(max_length,)`` padded with ``pad_token_id`` or truncated
      (``max_length`` defaults to the longest sequence over both splits).

    Args:
        path: The ``save_to_disk`` folder.
        image_column: Column holding images.
        feature_columns: Numeric columns concatenated into the feature vector.
        label_column: Integer (or ``ClassLabel``) label column.
        train_split: Split used for training.
        test_split: Split used for testing.
        input_ids_column: Column of token-id lists.
        max_length: Token sequence length.
        pad_token_id: Padding id for token sequences (BERT uses 0).
        num_classes: Defaults to the label feature's ``ClassLabel`` size, else max label + 1.

    Returns:
        The bundle, ``name="hf_disk"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A named split or column is missing (the message lists those that exist), or
            the data cannot be converted.
    """
    path = local_folder(path)
    train_ds, test_ds = load_splits(path, train_split, test_split)
    named = [(train_split, train_ds), (test_split, test_ds)]
    image_column, feature_list, input_ids_column = _x_columns(
        train_ds, image_column, feature_columns, input_ids_column, label_column, f"{path} [{train_split}]"
    )
    used = [image_column] if image_column else [input_ids_column] if input_ids_column else feature_list
    for split_name, split in named:
        require_columns([*used, label_column], split.column_names, f"{path} [{split_name}]")
    ys, num_classes, class_names = _hf_labels(path, named, label_column, num_classes)

    splits: list[Dataset]
    if image_column:
        splits = [_image_dataset(s[image_column], y, f"{path} [{n}]") for (n, s), y in zip(named, ys)]
        input_shape = tuple(splits[0][0][0].shape)
    elif input_ids_column:
        splits, input_shape = _token_splits(named, ys, input_ids_column, max_length, pad_token_id)
    else:
        splits, input_shape = _feature_splits(path, named, ys, feature_list)

    return DataBundle(
        splits[0], splits[1], _num_classes(num_classes, *ys), input_shape, "hf_disk", class_names
    )


def local_folder(path: str | Path) -> Path:
    """A ``save_to_disk`` folder as a local path: a URI's folder fetched once per node (``fipray.uri``)."""
    if not is_remote(path):
        return Path(str(path).removeprefix("file://"))
    kind, _ = file_info(path)
    if kind == "missing":
        raise FileNotFoundError(f"no dataset saved at {display(str(path))} (expected a datasets.DatasetDict."
                                "save_to_disk folder)")
    return cached_folder(path)


def load_splits(path: Path, train_split: str, test_split: str) -> tuple[Any, Any]:
    """The train and test ``datasets.Dataset`` of the ``DatasetDict`` saved at ``path``."""
    if not path.exists():
        raise FileNotFoundError(
            f"no dataset saved at {path} (expected a datasets.DatasetDict.save_to_disk folder)"
        )
    import datasets

    dd = datasets.load_from_disk(str(path))
    if not isinstance(dd, datasets.DatasetDict):
        raise ValueError(
            f"{path} holds a single Dataset; save a DatasetDict with {train_split!r}/{test_split!r} splits"
        )
    require_columns([train_split, test_split], list(dd.keys()), f"{path} (splits)")
    return dd[train_split], dd[test_split]


def _x_columns(
    train_ds: Any,
    image_column: str | None,
    feature_columns: Sequence[str] | None,
    input_ids_column: str | None,
    label_column: str,
    where: str,
) -> tuple[str | None, list[str], str | None]:
    """``(image_column, feature_columns, input_ids_column)`` with exactly one kind set.

    A kind the caller named wins; otherwise images, then token ids, then numeric columns are looked
    for in ``train_ds`` (see :func:`hf_disk`).
    """
    import datasets

    given = [c for c in (image_column, feature_columns, input_ids_column) if c is not None]
    if len(given) > 1:
        raise ValueError("give at most one of image_column, feature_columns, input_ids_column")
    if not given:
        columns = train_ds.column_names
        image_like = [c for c in columns if isinstance(train_ds.features[c], datasets.Image)]
        image_like += [c for c in ("image", "img") if c in columns and c not in image_like]
        if image_like:
            image_column = image_like[0]
        elif "input_ids" in columns:
            input_ids_column = "input_ids"
        else:
            feature_columns = _numeric_columns(train_ds.data.schema, columns, label_column, where)
    return image_column, list(feature_columns or []), input_ids_column


def _numeric_columns(schema: pa.Schema, columns: Sequence[str], label_column: str, where: str) -> list[str]:
    """The numeric columns other than the label, in order; an error when there are none."""
    found = [c for c in columns if c != label_column and _is_numeric(schema.field(c).type)]
    if not found:
        raise ValueError(f"no numeric feature columns in {where}; columns: {', '.join(columns)}")
    return found


def _hf_labels(
    path: Path, named: list[tuple[str, Any]], label_column: str, num_classes: int | None
) -> tuple[list[torch.Tensor], int | None, tuple[str, ...] | None]:
    """Both splits' labels, plus the class count and names a ``ClassLabel`` feature supplies."""
    import datasets

    label_feature = named[0][1].features[label_column]
    if num_classes is None and isinstance(label_feature, datasets.ClassLabel):
        num_classes = label_feature.num_classes
    class_names = tuple(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    ys = [
        labels_of(s.with_format("numpy")[label_column], f"{path} [{n}]")
        for n, s in named
    ]
    return ys, num_classes, class_names


def _token_splits(
    named: list[tuple[str, Any]],
    ys: list[torch.Tensor],
    input_ids_column: str,
    max_length: int | None,
    pad_token_id: int,
) -> tuple[list[Dataset], tuple[int, ...]]:
    """Token-id splits padded or truncated to one length (default: the longest over both splits)."""
    rows = [list(s[input_ids_column]) for _, s in named]
    if max_length is None:
        max_length = max((len(r) for split_rows in rows for r in split_rows), default=0)
    if max_length < 1:
        raise ValueError("max_length must be positive (or the sequences non-empty)")
    splits: list[Dataset] = [
        TensorDataset(_tokens(r, max_length, pad_token_id), y) for r, y in zip(rows, ys)
    ]
    return splits, (max_length,)


def _feature_splits(
    path: Path, named: list[tuple[str, Any]], ys: list[torch.Tensor], feature_list: list[str]
) -> tuple[list[Dataset], tuple[int, ...]]:
    """Numeric-column splits as float32 vectors; train and test must have the same width."""
    splits: list[Dataset] = []
    xs = []
    for (n, s), y in zip(named, ys):
        f = s.with_format("numpy")
        xs.append(
            torch.from_numpy(_features([f[c] for c in feature_list], feature_list, f"{path} [{n}]"))
        )
        splits.append(TensorDataset(xs[-1], y))
    input_shape = tuple(xs[0].shape[1:])
    _same_feature_size(input_shape, tuple(xs[1].shape[1:]))
    return splits, input_shape


def _same_feature_size(train_shape: tuple[int, ...], test_shape: tuple[int, ...]) -> None:
    """A model sized on the train split could not take test inputs of another size; fail up front."""
    if train_shape != test_shape:
        raise ValueError(f"train and test feature sizes differ: {train_shape} vs {test_shape}")


def _arrow_column(col: pa.ChunkedArray, name: str, where: str) -> np.ndarray:
    """A numeric arrow column as ``(N,)`` or, for list columns, ``(N, *item_shape)``."""
    if col.null_count:
        raise ValueError(f"column {name!r} in {where} has {col.null_count} missing values")
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        rows = [np.asarray(v, dtype=np.float32) for v in col.to_pylist()]
        if len({r.shape for r in rows}) > 1:
            raise ValueError(f"column {name!r} in {where} has rows of different lengths")
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)
    return col.to_numpy()


def table_tensors(
    table: pa.Table,
    where: str,
    feature_columns: list[str],
    label_column: str,
    input_shape: Sequence[int] | None,
    scale: float,
) -> tuple[TensorDataset, torch.Tensor]:
    """One file's ``TensorDataset`` (scaled, reshaped features) and its labels."""
    require_columns([*feature_columns, label_column], table.column_names, where)
    bad = [c for c in feature_columns if not _is_numeric(table.schema.field(c).type)]
    if bad:
        raise ValueError(f"feature column(s) {bad} in {where} are not numeric")
    y = labels_of(table.column(label_column).to_numpy(), where)
    arrays = [_arrow_column(table.column(c), c, where) for c in feature_columns]
    x = _features(arrays, feature_columns, where) / np.float32(scale)
    return TensorDataset(_reshape(x, input_shape, where), y), y
