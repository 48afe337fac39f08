"""Digests of cached files: raw sha256, and content digests that ignore the writer's encoding choices."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fipray.atomic import sha256_file


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_sha256(path: str | Path) -> str:
    """A digest of what a converted file holds, independent of the writer's version.

    ``.npy`` files are their bytes (the header is fixed by dtype and shape). A Parquet file's bytes carry
    the writing pyarrow's version and encoding choices, so its digest is over the decoded columns
    instead: each column's name and type, then its values (strings length-prefixed UTF-8, integers as
    little-endian int64). A ``.safetensors`` file's JSON header is the writer's choice (key order,
    padding, metadata), so its digest is over the tensors in name order: each name, dtype and shape, then
    its raw little-endian bytes.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_sha256(path)
    if path.suffix != ".parquet":
        return sha256_file(path)
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    h = hashlib.sha256()
    for name, column in zip(table.column_names, table.columns):
        h.update(f"{name}:{column.type};".encode())
        if column.type in ("string", "large_string"):
            for v in column.to_pylist():
                raw = v.encode("utf-8")
                h.update(len(raw).to_bytes(8, "little") + raw)
        else:
            h.update(np.asarray(column.to_numpy(), dtype="<i8").tobytes())
    return h.hexdigest()


def _safetensors_sha256(path: Path) -> str:
    """The tensors of a safetensors file (a little-endian uint64 header length, a JSON header mapping
    each name to dtype, shape and byte offsets into the data that follows), hashed in name order."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError:
        raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    data = memoryview(raw)[8 + n :]
    h = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        begin, end = entry["data_offsets"]
        h.update(f"{name}:{entry['dtype']}:{list(entry['shape'])};".encode())
        h.update((end - begin).to_bytes(8, "little"))
        h.update(data[begin:end])
    return h.hexdigest()
