"""`data.engine: ray`: a Ray-backed run's training split read and preprocessed by Ray Data.

    check_engine(cfg, backend)           # a refused combination: a ConfigError naming data.engine
    ds = train_dataset(cfg)              # driver side: a Ray Dataset of (row index, x, y)
    bundle = materialise(cfg, rows)      # worker side: the rows, in row-index order, as a DataBundle

Reading: the driver lists the training split's Parquet row groups from their footers (the file or every
`.parquet` file under a folder, in path order; `fipray.uri.open_uri` gives the pyarrow filesystem of an
`s3://`, `gs://`, `file://` URI or a local path). Ray Data reads the row groups in its workers, each row tagged
with its stable index (its position in the split: files in path order, rows in file order), and preprocesses
them there (`map_batches`: column selection, scaling, reshape to `input_shape`, with the `parquet` loader's own
`fipray.data.files.table_tensors`). `ray.data.read_parquet` is not used: its rows carry no position (only an
opaque `row_hash`), and the position is what makes the split's order the local engine's order.

Determinism: Ray Data streams rows in no guaranteed order, so the guarantee is kept on the path's side. Each
worker iterates its dataset once and scatters every row into a local on-disk array at its row index (a
missing or repeated index fails loudly), and the path's seeded index batches run over that array: batch t of
a path is the same pure function of (seed, t) as with the local engine, on the same examples in the same
order, so a resumed path stays bit-exact and the numbers equal the local engine's. Every DDP rank of a path
materialises the whole split and the operation takes its shard by the one rank rule
(`fipray.runtime.shard`: rows rank, rank + world, ...), exactly as with the local engine. The test split
(evaluation only) is read whole with pyarrow in the process that needs it.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fipray.config import Config, ConfigError

ENGINE_LOADERS = ("parquet",)
ROW = "__row"


def check_engine(cfg: Config, backend: str, key: str = "ray.backend") -> None:
    """Refuse `data.engine: ray` where it cannot run, in one line naming `data.engine` (`key`: the setting that
    must be `train`: `ray.backend` for `fipray paths`, `sweep.trainable` for sweeps)."""
    d = cfg.data
    if d.engine != "ray":
        return
    if backend != "train":
        raise ConfigError(f"config key 'data.engine': ray feeds the workers of a TorchTrainer; it needs "
                          f"{key}: train (got {key}: {backend})")
    if d.name not in ENGINE_LOADERS or not d.kwargs.get("train"):
        raise ConfigError(f"config key 'data.engine': ray reads the training split of a parquet dataset from its "
                          f"URI or path (data.name: parquet with data.kwargs.train); got data.name: {d.name}")


def _options(cfg: Config) -> dict:
    """The `parquet` loader's options that shape the tensors (its defaults where the config names none)."""
    kw = cfg.data.kwargs
    scale = float(kw.get("scale", 1.0))
    if scale <= 0:
        raise ConfigError(f"config section 'data': scale must be positive, got {scale}")
    return {"label_column": kw.get("label_column", "label"), "input_shape": kw.get("input_shape"), "scale": scale}


def _files(spec: str) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, the split's Parquet files in name order) of a file or folder URI: the files and the
    order the `parquet` loader reads (`fipray.data.sources.split_files`)."""
    from fipray.data.sources import split_files
    from fipray.uri import UriError, display, open_uri

    try:
        specs = split_files(spec, "parquet", "parquet file")
        fs, _ = open_uri(spec)
    except (UriError, FileNotFoundError) as e:
        raise ConfigError(f"config key 'data.engine': ray: {e}") from None
    except Exception as e:  # unreachable endpoint, no credentials
        raise ConfigError(f"config key 'data.engine': ray cannot read {display(spec)!r}: {e}") from None
    return fs, [open_uri(s)[1] for s in specs]


def _pieces(spec: str) -> tuple[list[dict], Any]:
    """Every row group of the split (uri, file, group, first row index) and the first file's schema."""
    import pyarrow.parquet as pq

    fs, files = _files(spec)
    pieces, start, schema = [], 0, None
    for f in files:
        with fs.open_input_file(f) as fh:
            meta = pq.ParquetFile(fh).metadata
            schema = schema if schema is not None else meta.schema.to_arrow_schema()
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            pieces.append({"uri": spec, "file": f, "group": g, "start": start, "rows": n})
            start += n
    return pieces, schema


def _feature_columns(cfg: Config, schema: Any, where: str) -> list[str]:
    from fipray.data.files import _numeric_columns

    given = cfg.data.kwargs.get("feature_columns")
    if given is not None:
        return list(given)
    try:
        return _numeric_columns(schema, schema.names, _options(cfg)["label_column"], where)
    except ValueError as e:
        raise ConfigError(f"config section 'data': {e}") from None


def _read_pieces(batch: dict, columns: list[str]) -> Any:
    """Ray Data worker: the row groups named in `batch`, each row with its index in column `ROW`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fipray.uri import open_uri

    tables = []
    for uri, f, g, start in zip(batch["uri"], batch["file"], batch["group"], batch["start"]):
        fs, _ = open_uri(str(uri))
        with fs.open_input_file(str(f)) as fh:
            t = pq.ParquetFile(fh).read_row_group(int(g), columns=columns)
        tables.append(t.append_column(ROW, pa.array(np.arange(int(start), int(start) + t.num_rows))))
    return pa.concat_tables(tables)


def _preprocess(table: Any, where: str, features: list[str], options: dict) -> dict:
    """Ray Data worker: the `parquet` loader's tensors of a batch of rows (scaled, reshaped), by row index."""
    from fipray.data.files import table_tensors

    ds, y = table_tensors(table, where, features, options["label_column"], options["input_shape"],
                          options["scale"])
    return {ROW: table.column(ROW).to_numpy(), "x": ds.tensors[0].numpy(), "y": y.numpy()}


def train_dataset(cfg: Config) -> Any:
    """The training split as a Ray Dataset with columns `__row` (int64), `x` (float32, input_shape), `y` (int64).

    Only the Parquet footers are read here; the rows are read and preprocessed by Ray Data's workers.
    """
    import ray.data

    spec = str(cfg.data.kwargs["train"])
    pieces, schema = _pieces(spec)
    from fipray.uri import display

    where = display(spec)
    features = _feature_columns(cfg, schema, where)
    options = _options(cfg)
    columns = [*features, options["label_column"]]
    ds: Any = ray.data.from_items(pieces, override_num_blocks=max(1, len(pieces)))
    ds = ds.map_batches(_read_pieces, fn_kwargs={"columns": columns}, batch_size=1, batch_format="numpy",
                        num_cpus=DATA_CPUS, concurrency=DATA_TASKS)
    return ds.map_batches(_preprocess, fn_kwargs={"where": where, "features": features, "options": options},
                          batch_format="pyarrow", num_cpus=DATA_CPUS, concurrency=DATA_TASKS)


# Ray Data's tasks ask for no CPU: they run once, at a path's start, while the path's own workers hold the CPUs
# the run reserved (with a CPU each, they would wait behind those workers for ever on a full cluster).
DATA_CPUS = 0
DATA_TASKS = 4  # at most this many Ray Data tasks of one read at once (each a process importing torch)


def _scatter(batches: Iterable[dict], folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Spool the batches to `folder`, then place every row at its index in on-disk arrays (memory-mapped)."""
    chunks, total = [], 0
    for i, b in enumerate(batches):
        if len(b[ROW]):
            np.savez(folder / f"chunk{i}.npz", row=b[ROW], x=b["x"], y=b["y"])
            chunks.append(folder / f"chunk{i}.npz")
            total += len(b[ROW])
    if not chunks:
        raise ValueError("data.engine: ray: the training split has no rows")
    first = np.load(chunks[0])
    x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float32, shape=(total, *first["x"].shape[1:]))
    y = np.lib.format.open_memmap(folder / "y.npy", mode="w+", dtype=np.int64, shape=(total,))
    seen = np.zeros(total, dtype=bool)
    for c in chunks:
        b = np.load(c)
        rows = b["row"]
        if rows.min() < 0 or rows.max() >= total or seen[rows].any():
            raise RuntimeError("data.engine: ray: Ray Data delivered a row index twice or out of range")
        seen[rows] = True
        x[rows], y[rows] = b["x"], b["y"]
        c.unlink()
    if not seen.all():
        raise RuntimeError(f"data.engine: ray: {int((~seen).sum())} rows of the training split never arrived")
    x.flush()
    y.flush()
    del x, y
    # Copy-on-write maps: the tensors are backed by the files, pages read as batches need them.
    return np.load(folder / "x.npy", mmap_mode="c"), np.load(folder / "y.npy", mmap_mode="c")


def _test_split(cfg: Config, features: list[str]) -> Any:
    """The test split (evaluation) with the same columns and preprocessing, read whole with pyarrow."""
    import pyarrow.parquet as pq

    from fipray.data.files import table_tensors
    from fipray.uri import display

    spec = str(cfg.data.kwargs["test"])
    fs, files = _files(spec)
    opts = _options(cfg)
    table = pq.ParquetDataset(files, filesystem=fs).read(columns=[*features, opts["label_column"]])
    try:
        ds, _ = table_tensors(table, display(spec), features, opts["label_column"], opts["input_shape"], opts["scale"])
    except ValueError as e:
        raise ConfigError(f"config section 'data': {e}") from None
    return ds


class Materialised:
    """A path worker's copy of the training split: on-disk arrays in a private folder, removed by `close`."""

    def __init__(self, cfg: Config, batches: Iterable[dict], where: str | Path | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="fipray-raydata-", dir=where))
        try:
            self.x, self.y = _scatter(batches, self.folder)
        except BaseException:
            self.close()
            raise
        self.cfg = cfg

    def bundle(self) -> Any:
        """A DataBundle: this training split, the test split, classes and shape as the `parquet` loader has them."""
        import torch
        from torch.utils.data import TensorDataset

        from fipray.data.core import DataBundle

        _, schema = _pieces(str(self.cfg.data.kwargs["train"]))
        test = _test_split(self.cfg, _feature_columns(self.cfg, schema, "train"))
        x, y = torch.from_numpy(self.x), torch.from_numpy(self.y)
        given = self.cfg.data.kwargs.get("num_classes")
        top = max(int(y.max()) + 1, int(test.tensors[1].max()) + 1 if len(test) else 0)
        if given is not None and top > int(given):
            raise ConfigError(f"config section 'data': num_classes={given} but labels go up to {top - 1}")
        shape = tuple(x.shape[1:])
        if tuple(test.tensors[0].shape[1:]) != shape:
            raise ConfigError(f"config section 'data': train and test feature sizes differ: {shape} vs "
                              f"{tuple(test.tensors[0].shape[1:])}")
        return DataBundle(TensorDataset(x, y), test, int(given) if given is not None else top, shape, "parquet")

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def worker_bundle(cfg: Config) -> Iterator[Any]:
    """In a Train worker of a `data.engine: ray` run: its copy of the training split, read once from its dataset
    shard "train" (the whole split; a DDP path takes the rank's rows by the local engine's rule) into a private
    on-disk folder ordered by row index, as a DataBundle, removed at the end. Otherwise None (the config's own
    loader)."""
    if cfg.data.engine != "ray":
        yield None
        return
    import ray.train

    mat = Materialised(cfg, iter_rows(ray.train.get_dataset_shard("train")))
    try:
        yield mat.bundle()
    finally:
        mat.close()


def iter_rows(ds: Any) -> Iterable[dict]:
    """A Ray Dataset (or a Train worker's shard of one) as numpy batches."""
    return ds.iter_batches(batch_size=4096, batch_format="numpy")  # type: ignore[no-any-return]
