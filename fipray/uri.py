"""Files and folders named by a URI (`s3://`, `gs://`, `file://`) or a local path, and a per-node cache of them.

    fs, path = open_uri("s3://bucket/data/train.parquet?endpoint_override=127.0.0.1:9000&scheme=http")
    local = cached_file("s3://bucket/data/train.parquet?...")    # a local copy, filled once per node
    folder = cached_folder("s3://bucket/run/merged/ensemble")      # every file under the prefix

The same `pyarrow.fs` layer as run storage (`fipray.ray.storage`) and Ray Train: the query string holds the
filesystem's options (`endpoint_override`, `scheme`, `region`, `anonymous`, ...), credentials come from the
environment only (AWS_*, AWS_PROFILE, instance roles; GOOGLE_APPLICATION_CREDENTIALS). A local path or
`file://` URI is read where it is (never copied).

The cache (`FIPRAY_CACHE_DIR`, default `~/.cache/fipray/uri`, or the `cache_dir` argument) keys an object by
its URI (credentials removed) and its size and modification time as the store reports them (pyarrow.fs does not
expose S3's ETag; a rewritten object changes its mtime), so a changed object is fetched again and an unchanged
one never twice. Filling is safe against other processes filling the same entry: one holds an exclusive
`flock` on the entry's lock file while it downloads into a private temporary name and renames it into place;
the others wait on the lock and then find the entry complete. An interrupted download leaves only a temporary
file, removed by the next fill. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SCHEMES = ("s3", "gs", "gcs", "file")
CHUNK = 8 << 20
_CACHE_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("fipray_cache_dir", default=None)


class UriError(ValueError):
    """A URI that cannot be opened or read: the message is one line and names the URI (credentials removed)."""


def redact(uri: str) -> str:
    """The URI without user:password (credentials inside a URI must never reach a log or an error)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        return uri.replace(parts.netloc, parts.hostname or "", 1)
    return uri


def display(uri: str) -> str:
    """The URI as a user would read it: no credentials, no query options."""
    return redact(str(uri)).split("?", 1)[0]


def is_uri(spec: str | Path) -> bool:
    """True for `scheme://...` (any scheme; `open_uri` refuses the ones it cannot read)."""
    return "://" in str(spec)


def is_remote(spec: str | Path) -> bool:
    """True for a URI whose objects live outside this machine's filesystem (not a local path, not file://)."""
    return is_uri(spec) and urlsplit(str(spec)).scheme.lower() != "file"


def open_uri(spec: str | Path) -> tuple[Any, str]:
    """`(pyarrow filesystem, path inside it)` for a local path or a `file://`, `s3://`, `gs://` URI.

    Raises:
        UriError: unknown scheme, bad query option, no bucket (one line naming the URI).
    """
    import pyarrow.fs as pafs

    spec = str(spec)
    if not is_uri(spec):
        return pafs.LocalFileSystem(), str(Path(spec).expanduser().resolve())
    scheme = urlsplit(spec).scheme.lower()
    if scheme not in SCHEMES:
        raise UriError(f"{display(spec)!r} has scheme {scheme!r}; fipray reads "
                       f"{', '.join(s + '://' for s in SCHEMES)} or a local path")
    try:
        fs, path = pafs.FileSystem.from_uri(spec)
    except Exception as e:  # ArrowInvalid (bad option), OSError
        raise UriError(f"{display(spec)!r} is not a usable {scheme}:// URI: {_one_line(e)}") from None
    if scheme in ("s3", "gs", "gcs") and not path.split("/", 1)[0]:
        raise UriError(f"{display(spec)!r} names no bucket ({scheme}://BUCKET/KEY)")
    return fs, path


def child(spec: str | Path, rel: str) -> str:
    """`rel` under the folder `spec`, keeping the URI's query options."""
    spec = str(spec)
    if not is_uri(spec):
        return str(Path(spec) / rel)
    base, _, query = spec.partition("?")
    return base.rstrip("/") + "/" + rel.strip("/") + (f"?{query}" if query else "")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _info(fs: Any, path: str, spec: str) -> Any:
    try:
        return fs.get_file_info(path)
    except Exception as e:  # unreachable endpoint, no credentials, access denied
        raise UriError(f"cannot read {display(spec)!r}: {_one_line(e)}") from None


def file_info(spec: str | Path) -> tuple[str, int | None]:
    """`("file" | "folder" | "missing", size or None)` of what `spec` names."""
    import pyarrow.fs as pafs

    fs, path = open_uri(spec)
    info = _info(fs, path, str(spec))
    if info.type == pafs.FileType.File:
        return "file", info.size
    if info.type == pafs.FileType.Directory:
        return "folder", None
    if is_remote(spec) and _listing(fs, path, str(spec), missing_ok=True):
        return "folder", None  # an object-store prefix with objects under it
    return "missing", None


def open_input_file(spec: str | Path) -> Any:
    """A seekable pyarrow input file (e.g. for `pyarrow.parquet.ParquetFile`: row groups read as needed)."""
    fs, path = open_uri(spec)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise UriError(f"{display(str(spec))!r} does not exist") from None
    except Exception as e:
        raise UriError(f"cannot read {display(str(spec))!r}: {_one_line(e)}") from None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The node's cache folder: the argument, else the one `using_cache_dir` set (a run's `data.cache_dir`),
    else `$FIPRAY_CACHE_DIR`, else `~/.cache/fipray/uri`."""
    root = (cache_dir or _CACHE_DIR.get() or os.environ.get("FIPRAY_CACHE_DIR")
            or Path.home() / ".cache" / "fipray" / "uri")
    return Path(root).expanduser()


@contextlib.contextmanager
def using_cache_dir(cache_dir: str | Path | None) -> Iterator[None]:
    """Within the block, `cache_root()` is `cache_dir` (None: unchanged): how a run's `data.cache_dir` reaches
    the dataset loaders without being one of their arguments."""
    token = _CACHE_DIR.set(str(cache_dir) if cache_dir else _CACHE_DIR.get())
    try:
        yield
    finally:
        _CACHE_DIR.reset(token)


def _entry(root: Path, spec: str, fingerprint: Any) -> Path:
    """The cache entry of `spec` at `fingerprint` (the URI without credentials, sizes, mtimes)."""
    key = hashlib.sha256(json.dumps([redact(spec), fingerprint], sort_keys=True).encode()).hexdigest()[:32]
    return root / key[:2] / key


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _copy(fs: Any, src: str, dst: Path, spec: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fs.open_input_stream(src) as f, open(dst, "wb") as out:
            while chunk := f.read(CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except Exception as e:
        raise UriError(f"cannot read {display(spec)!r}: {_one_line(e)}") from None


def cached_file(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local path holding the file `spec` names: the path itself when local, else the node cache's copy.

    Raises:
        UriError: the file does not exist (or is a folder), or cannot be read.
    """
    import pyarrow.fs as pafs

    spec = str(spec)
    fs, path = open_uri(spec)
    info = _info(fs, path, spec)
    if info.type != pafs.FileType.File:
        what = "is a folder, not a file" if info.type == pafs.FileType.Directory else "does not exist"
        raise UriError(f"{display(spec)!r} {what}")
    if not is_remote(spec):
        return Path(path)
    mtime = info.mtime_ns if info.mtime_ns is not None else None
    entry = _entry(cache_root(cache_dir), spec, [info.size, mtime])
    target = entry / Path(path).name
    if target.is_file():
        return target
    with _locked(entry):
        if target.is_file():  # another process filled it while we waited
            return target
        shutil.rmtree(entry, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fill-", dir=entry.parent))
        try:
            _copy(fs, path, tmp / target.name, spec)
            tmp.rename(entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _listing(fs: Any, path: str, spec: str, missing_ok: bool = False) -> list[Any]:
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=missing_ok))
    except FileNotFoundError:
        if missing_ok:
            return []
        raise UriError(f"{display(spec)!r} does not exist") from None
    except Exception as e:
        raise UriError(f"cannot list {display(spec)!r}: {_one_line(e)}") from None
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def cached_folder(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local folder holding every file under the folder (or object-store prefix) `spec` names: the folder
    itself when local, else the node cache's copy (filled whole, then renamed into place).

    Raises:
        UriError: nothing exists there, or it is a file, or it cannot be read.
    """
    import pyarrow.fs as pafs

    spec = str(spec)
    fs, path = open_uri(spec)
    if not is_remote(spec):
        info = _info(fs, path, spec)
        if info.type != pafs.FileType.Directory:
            what = "is a file, not a folder" if info.type == pafs.FileType.File else "does not exist"
            raise UriError(f"{display(spec)!r} {what}")
        return Path(path)
    path = path.rstrip("/")
    files = _listing(fs, path, spec, missing_ok=True)
    if not files:
        kind = _info(fs, path, spec).type
        what = "is a file, not a folder" if kind == pafs.FileType.File else "does not exist (no objects under it)"
        raise UriError(f"{display(spec)!r} {what}")
    rels = [(f.path[len(path) + 1:], f.size, f.mtime_ns) for f in files]
    entry = _entry(cache_root(cache_dir), spec, rels)
    done = entry / ".complete"
    if done.is_file():
        return entry
    with _locked(entry):
        if done.is_file():
            return entry
        shutil.rmtree(entry, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fill-", dir=entry.parent))
        try:
            for f, (rel, _, _) in zip(files, rels):
                _copy(fs, f.path, tmp / rel, child(spec, rel))
            (tmp / ".complete").write_text(json.dumps({"uri": display(spec), "files": len(rels)}))
            tmp.rename(entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
