"""Where a table-backed dataset's splits live: local paths or URIs (`s3://`, `gs://`, `file://`), made local.

A loader names its splits either one file (or folder of files) each — `train=..., test=...` — or one place
for all of them — `path=...`:

- a folder or object-store prefix holding, for each split, `<split>.<ext>`, `<split>-*.<ext>` /
  `<split>_*.<ext>` (sharded, e.g. `train-00000-of-00004.parquet`), or every `*.<ext>` under `<split>/` —
  also under a `data/` subfolder, the Hugging Face Hub's layout;
- one file whose `split_column` says which split each row belongs to (`path=s3://bucket/digits.parquet`).

Remote files are fetched once per node into the cache of `fipray.uri` (keyed by URI, size and mtime, safe
against concurrent fills); local ones are read where they are.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fipray.uri import UriError, cached_file, child, display, file_info, is_remote, open_uri


def _files_under(spec: str, ext: str) -> list[str]:
    """Relative names of every `*.<ext>` file under the folder `spec` (sorted)."""
    import pyarrow.fs as pafs

    fs, root = open_uri(spec)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except Exception as e:
        raise UriError(f"cannot list {display(spec)!r}: {' '.join(str(e).split())}") from None
    return sorted(i.path[len(root) + 1:] for i in infos
                  if i.type == pafs.FileType.File and i.path.endswith(f".{ext}"))


def _split_names(names: list[str], split: str, ext: str) -> list[str]:
    for prefix in ("", "data/"):
        patterns = (f"{prefix}{split}.{ext}", f"{prefix}{split}-*.{ext}", f"{prefix}{split}_*.{ext}",
                    f"{prefix}{split}/*.{ext}")
        found = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if found:
            return found
    return []


def split_files(spec: str, ext: str, what: str) -> list[str]:
    """A file, or every `*.<ext>` file of a folder/prefix (in name order), as specs (paths or URIs): one split's
    files, for the loaders here and Ray Data's reads (`fipray.ray.data`), so both engines see one order.

    Raises:
        FileNotFoundError: nothing there, or a folder without `.<ext>` files (`what` names the kind of file).
        UriError: a URI that cannot be opened or listed.
    """
    kind, _ = file_info(spec)
    if kind == "file":
        return [spec]
    if kind == "folder":
        names = _files_under(spec, ext)
        if not names:
            raise FileNotFoundError(f"{what}: no .{ext} files under {display(spec)}")
        return [child(spec, n) for n in names]
    raise FileNotFoundError(f"{what} not found: {display(spec)}")


def split_specs(
    ext: str,
    train: str | Path | None,
    test: str | Path | None,
    path: str | Path | None,
    splits: Sequence[str] = ("train", "test"),
) -> list[list[str]] | str:
    """For each split, the file specs (paths or URIs) holding it; or the one file of `path` that holds every
    split (returned as a str: the caller selects rows by its split column).

    Raises:
        ValueError: both `path` and `train`/`test`, or neither, are given.
        FileNotFoundError: a file, folder or split's files do not exist (named).
        UriError: a URI that cannot be opened.
    """
    what = f"{ext} file"
    if path is None:
        if train is None or test is None:
            raise ValueError("give train= and test= (a file or folder each) or path= (one folder or file)")
        return [split_files(str(train), ext, what), split_files(str(test), ext, what)]
    if train is not None or test is not None:
        raise ValueError("give either path= or train= and test=, not both")
    spec = str(path)
    kind, _ = file_info(spec)
    if kind == "file":
        return spec
    if kind == "missing":
        raise FileNotFoundError(f"{what} or folder not found: {display(spec)}")
    names = _files_under(spec, ext)
    out = []
    for split in splits:
        found = _split_names(names, split, ext)
        if not found:
            raise FileNotFoundError(
                f"no {split!r} split under {display(spec)}: expected {split}.{ext}, {split}-*.{ext} or "
                f"{split}/*.{ext} (also under data/); .{ext} files there: {', '.join(names[:6]) or 'none'}")
        out.append([child(spec, n) for n in found])
    return out


def local_files(specs: Sequence[str]) -> list[Path]:
    """Local paths of `specs`: local files as they are, remote ones through the node cache."""
    return [cached_file(s) for s in specs]


def where(specs: Sequence[str] | str) -> str:
    """How error messages name a split's files."""
    if isinstance(specs, str):
        return display(specs)
    return display(specs[0]) + (f" (+{len(specs) - 1} more)" if len(specs) > 1 else "")


def rows_of_splits(table: Any, split_column: str, splits: Sequence[str], name: str) -> list[Any]:
    """The rows of each split of a pyarrow table that holds them all, told apart by `split_column`.

    Raises:
        ValueError: the column is missing, or a split has no rows (the message lists the values there are).
    """
    import pyarrow.compute as pc

    if split_column not in table.column_names:
        raise ValueError(f"{name} holds every split in one file but has no split column {split_column!r}; "
                         f"columns: {', '.join(table.column_names)}")
    col = table.column(split_column)
    out = [table.filter(pc.equal(col, s)) for s in splits]
    for s, t in zip(splits, out):
        if t.num_rows == 0:
            values = sorted({str(v) for v in pc.unique(col).to_pylist()})
            raise ValueError(f"no rows with {split_column} == {s!r} in {name}; values: {', '.join(values)}")
    return out


def split_tables(
    ext: str,
    read: Callable[[list[Path], str, Sequence[str]], Any],
    train: str | Path | None,
    test: str | Path | None,
    path: str | Path | None,
    split_column: str = "split",
    splits: Sequence[str] = ("train", "test"),
) -> list[tuple[Any, str]]:
    """`(table, name)` of each split: `read(local files, name, extra columns)` of its files, or the rows of the
    one file of `path` whose `split_column` names their split (`read` is then asked for that column too)."""
    specs = split_specs(ext, train, test, path, splits)
    if isinstance(specs, str):
        table = read(local_files([specs]), where(specs), [split_column])
        parts = rows_of_splits(table, split_column, splits, where(specs))
        return [(t, f"{where(specs)} [{s}]") for t, s in zip(parts, splits)]
    return [(read(local_files(s), where(s), []), where(s)) for s in specs]


__all__ = ["split_specs", "split_files", "split_tables", "rows_of_splits", "local_files", "where", "is_remote"]
