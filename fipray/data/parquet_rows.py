"""A split of Parquet files that is never read whole into memory (`parquet` loader, `in_memory: false`).

- `batches(batch_size)`: the rows in file order, decoded one record batch at a time (what evaluation reads:
  memory stays one batch plus one row group's column chunks, whatever the split's size; no pre-buffering);
- `split[i]` / `split.gather(indices)`: items by index (what training and replay memories read), taken
  from an Arrow IPC copy of the feature and label columns, memory-mapped (written once per file into the
  node cache, streamed row group by row group; the OS pages it in and out, the process never holds it);
- `targets`: the labels (one int64 column: 8 bytes a row), read alone.

Items are `(x, y)` exactly as the in-memory loader makes them (`table_tensors`: columns, scale, shape).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fipray.uri import cache_root


def _ipc_copy(src: Path, columns: list[str], root: Path) -> Path:
    """The memory-mappable Arrow IPC copy of `columns` of `src` (built once per file version, atomically)."""
    import fcntl

    import pyarrow.parquet as pq

    st = src.stat()
    key = hashlib.sha256(repr((str(src.resolve()), st.st_size, st.st_mtime_ns, columns)).encode()).hexdigest()
    out = root / "ipc" / f"{key[:32]}.arrow"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not out.is_file():
            pf = pq.ParquetFile(src, pre_buffer=False)
            fd, tmp = tempfile.mkstemp(prefix=".fill-", dir=out.parent)
            os.close(fd)
            try:
                with pa.OSFile(tmp, "wb") as sink:
                    schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
                    with pa.ipc.new_file(sink, schema) as writer:
                        for rb in pf.iter_batches(batch_size=65536, columns=columns):
                            writer.write_batch(rb)
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return out


class ParquetRows(Dataset):
    """The rows of local Parquet files as `(x, y)` items, read as needed (see the module docstring)."""

    def __init__(self, files: Sequence[Path], where: str, feature_columns: list[str], label_column: str,
                 input_shape: Sequence[int] | None, scale: float) -> None:
        import pyarrow.parquet as pq

        self.files = [Path(f) for f in files]
        self.where, self.label_column, self.scale = where, label_column, scale
        self.feature_columns = list(feature_columns)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.sizes = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
        self.cache = cache_root()  # the run's node cache (data.cache_dir), where the mapped copies go
        self._table: pa.Table | None = None
        self._targets: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers, Ray: paths only, reopened there
        return {**self.__dict__, "_table": None}

    def __len__(self) -> int:
        return sum(self.sizes)

    @property
    def columns(self) -> list[str]:
        return [*self.feature_columns, self.label_column]

    def _tensors(self, table: pa.Table) -> tuple[Tensor, Tensor]:
        from fipray.data.files import table_tensors

        ds, y = table_tensors(table, self.where, self.feature_columns, self.label_column, self.input_shape,
                              self.scale)
        return ds.tensors[0], y

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """`(x, y)` batches of at most `batch_size` rows, in file order."""
        import pyarrow.parquet as pq

        for f in self.files:
            # pre_buffer (pyarrow's default) would read the whole file ahead: memory as large as the split
            for rb in pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=batch_size, columns=self.columns):
                yield self._tensors(pa.Table.from_batches([rb]))

    @property
    def targets(self) -> Tensor:
        """Every label, in row order (read alone: one column)."""
        if self._targets is None:
            import pyarrow.parquet as pq

            from fipray.data.files import labels_of

            ys = [labels_of(pq.read_table(f, columns=[self.label_column]).column(self.label_column).to_numpy(),
                            self.where) for f in self.files]
            self._targets = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
        return self._targets

    def _mapped(self) -> pa.Table:
        if self._table is None:
            parts = [pa.ipc.open_file(pa.memory_map(str(_ipc_copy(f, self.columns, self.cache)))).read_all()
                     for f in self.files]
            self._table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        return self._table

    def gather(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """`(x, y)` of the rows at `indices`, in that order."""
        idx = np.asarray(torch.as_tensor(indices, dtype=torch.long).reshape(-1))
        return self._tensors(self._mapped().take(pa.array(idx)))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.gather([int(i)])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        x, y = self.gather(list(indices))
        return list(zip(x, y))
