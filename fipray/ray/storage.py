"""Where a Ray run keeps what must outlive a node: a local folder or a URI, through `pyarrow.fs` (as Ray Train).

    st = open_storage("s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http")
    check_storage(st)                    # before any work: bad URI, no credentials, unreachable, no bucket
    st.write_json("paths/path0/worker.json", {...}); st.read_json(...); st.upload_file(local, rel)

`ray.storage_path` may be a folder (every node must see it: a shared mount, or one machine), `file://...`,
`s3://bucket/prefix` or `gs://bucket/prefix`; the query string of a URI holds the filesystem's options,
exactly as `pyarrow.fs.FileSystem.from_uri` and Ray Train read them (`endpoint_override`, `scheme`,
`region`, `anonymous`, ...). Credentials come from the environment (AWS_ACCESS_KEY_ID..., AWS_PROFILE,
instance or pod roles; GOOGLE_APPLICATION_CREDENTIALS), never from fipray's config.

Writes are atomic enough for resume: on a local filesystem a file is written beside its target and
renamed over it; on an object store one object is one put (a multipart upload only becomes visible when
it completes). A folder that belongs together is uploaded with its marker file last (`checkpoint.pt`,
`result.json`, `model.safetensors`), so a reader that finds the marker finds everything it names.

`Workspace` gives a unit of work a local folder: the storage folder itself when storage is local (the core
loop writes its checkpoints there directly, as before), otherwise a private staging folder filled from
storage at the start (resume) and pushed back at every checkpoint. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fipray.atomic import atomic_write, atomic_write_bytes, atomic_write_json
from fipray.config import ConfigError
from fipray.uri import UriError, open_uri
from fipray.uri import display as _display  # the URI without credentials or query options

CHECK_TIMEOUT_S = 30.0  # a storage probe that has not answered by then fails the run (unreachable endpoint)


def _fs():
    import pyarrow.fs as pafs

    return pafs


@dataclass(frozen=True)
class Storage:
    """A root folder on a `pyarrow.fs` filesystem.

    Attributes:
        uri: what the user wrote (an absolute folder for local storage); what workers reopen.
        fs: the filesystem.
        root: the root's path inside `fs` (for S3/GCS: ``bucket/prefix``).
        key: the config key it came from, for error messages.
    """

    uri: str
    fs: Any
    root: str
    key: str = "ray.storage_path"

    @property
    def is_local(self) -> bool:
        return type(self.fs).__name__ == "LocalFileSystem"

    @property
    def local(self) -> Path | None:
        """The root as a local folder, or None on an object store."""
        return Path(self.root) if self.is_local else None

    @property
    def scheme(self) -> str:
        return urlsplit(self.uri).scheme if "://" in self.uri else "file"

    def path(self, rel: str = "") -> str:
        return f"{self.root.rstrip('/')}/{rel.strip('/')}" if rel.strip("/") else self.root

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it (scheme://bucket/prefix/rel), credentials and options left out."""
        base = _display(self.uri).rstrip("/")
        return f"{base}/{rel.strip('/')}" if rel.strip("/") else base

    def child(self, rel: str) -> Storage:
        parts = self.uri.split("?", 1)
        uri = parts[0].rstrip("/") + "/" + rel.strip("/") + (f"?{parts[1]}" if len(parts) == 2 else "")
        return Storage(uri, self.fs, self.path(rel), self.key)

    # -- reading -----------------------------------------------------------------------------------
    def _info(self, rel: str) -> Any:
        return self.fs.get_file_info(self.path(rel))

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == _fs().FileType.File

    def exists(self, rel: str) -> bool:
        return self._info(rel).type != _fs().FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def files(self, rel: str = "") -> list[str]:
        """Every file under `rel`, as paths relative to `rel` ('/'-separated), sorted; [] if there is none."""
        pafs = _fs()
        base = self.path(rel).rstrip("/")
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File)

    def download_file(self, rel: str, local: str | Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(self.path(rel)) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return local

    def download_dir(self, rel: str, local: str | Path) -> list[str]:
        """Copy every file under `rel` into the local folder `local`; returns the relative names copied."""
        names = self.files(rel)
        for n in names:
            self.download_file(f"{rel}/{n}", Path(local) / n)
        return names

    # -- writing -----------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write-then-rename on a local filesystem, one object put on an object store."""
        if self.local is not None:
            atomic_write_bytes(self.local / rel, data)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> None:
        if self.local is not None:
            atomic_write_json(self.local / rel, obj)
            return
        with tempfile.TemporaryDirectory() as d:  # the same JSON (NaN -> null, numpy scalars) as local files
            atomic_write_json(Path(d) / "x.json", obj)
            self.write_bytes(rel, (Path(d) / "x.json").read_bytes())

    def upload_file(self, local: str | Path, rel: str) -> None:
        if self.local is not None:
            def copy(tmp: str) -> None:
                shutil.copyfile(local, tmp)

            atomic_write(self.local / rel, copy)
            return
        with open(local, "rb") as src, self.fs.open_output_stream(self.path(rel)) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def upload_dir(self, local: str | Path, rel: str, *, last: Iterable[str] = ()) -> list[str]:
        """Copy the local folder's files to `rel`; the names in `last` (relative, if present) go last, in order."""
        local = Path(local)
        names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        tail = [n for n in last if n in names]
        for n in [n for n in names if n not in tail] + tail:
            self.upload_file(local / n, f"{rel}/{n}")
        return names

    def delete(self, rel: str) -> None:
        pafs = _fs()
        info = self._info(rel)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))


def open_storage(spec: str | Path, key: str = "ray.storage_path") -> Storage:
    """A `Storage` for a local folder or a `file://`, `s3://`, `gs://` URI (`fipray.uri.open_uri`).

    Raises:
        ConfigError: naming `key` and the URI (credentials removed): unknown scheme, bad query option, no bucket.
    """
    try:
        fs, root = open_uri(spec)
    except UriError as e:
        raise ConfigError(f"config key {key!r}: {e}") from None
    uri = str(spec) if "://" in str(spec) else root  # a folder: its absolute path, what workers reopen
    return Storage(uri, fs, root.rstrip("/") or root, key)


def _aws_credentials_source(query: dict) -> str | None:
    """Where the AWS SDK would find credentials (a short description), or None if nowhere.

    The SDK's chain: keys in the environment, a profile in the shared files, a web-identity token
    (EKS service accounts), the container credentials endpoint (ECS, EKS pod identity), then the
    instance metadata service (an EC2 role), which is only looked for (a TCP connect), never queried.
    """
    env = os.environ
    if query.get("anonymous", [""])[0].lower() in ("true", "1"):
        return "anonymous (the URI's anonymous=true)"
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return "AWS_ACCESS_KEY_ID"
    for var, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config")):
        if Path(env.get(var) or default).expanduser().is_file():
            return var
    for var in ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        if env.get(var):
            return var
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        try:
            with socket.create_connection(("169.254.169.254", 80), timeout=0.5):
                return "the instance metadata service (an EC2 role)"
        except OSError:
            pass
    return None


def _classify(e: BaseException) -> str:
    """A storage error in words a user can act on."""
    msg = str(e)
    low = msg.lower()
    if "no_such_bucket" in low or "nosuchbucket" in low or "bucket does not exist" in low:
        return f"the bucket does not exist ({msg.splitlines()[0][:300]})"
    if any(s in low for s in ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch",
                              "forbidden", "oauth2", "credentials", "permission denied", "http status 403",
                              "unauthenticated")):
        return f"credentials missing or refused ({msg.splitlines()[0][:300]})"
    if any(s in low for s in ("network_connection", "curlcode", "could not connect", "couldn't connect",
                              "could not resolve", "unavailable", "timed out", "connection refused")):
        return f"the endpoint is unreachable ({msg.splitlines()[0][:300]})"
    return msg.splitlines()[0][:400] if msg else type(e).__name__


def _with_timeout(fn: Callable[[], None], timeout_s: float) -> BaseException | None:
    """Run `fn` in a daemon thread; its exception, a TimeoutError, or None."""
    box: dict[str, BaseException | None] = {}

    def target() -> None:
        try:
            fn()
            box["e"] = None
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            box["e"] = e

    t = threading.Thread(target=target, daemon=True, name="fipray-storage-check")
    t.start()
    t.join(timeout_s)
    if "e" not in box:
        return TimeoutError(f"no answer within {timeout_s:g} s")
    return box["e"]


def check_storage(st: Storage, *, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Prove `st` can be written and read back before any work starts, or raise a ConfigError saying why.

    Raises:
        ConfigError: naming the config key, the URI and the problem: no credentials, an unreachable
            endpoint (or none answering within `timeout_s`), a missing bucket, a read-only location.
    """
    where = f"storage path {st.display()!r} (config key {st.key!r})"
    if st.scheme == "s3":
        query = parse_qs(urlsplit(st.uri).query)
        if _aws_credentials_source(query) is None:
            raise ConfigError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                              "AWS_PROFILE or a web-identity token, run on a node with a role, or add anonymous=true "
                              "to the URI for a public bucket)")
    probe = f".fipray-write-test-{uuid.uuid4().hex[:12]}"

    def attempt() -> None:
        if st.local is not None:
            st.local.mkdir(parents=True, exist_ok=True)
        st.write_bytes(probe, b"ok")
        if st.read_bytes(probe) != b"ok":
            raise OSError("a test object written there read back different bytes")
        st.delete(probe)

    err = _with_timeout(attempt, timeout_s)
    if err is None:
        return
    if isinstance(err, TimeoutError):
        raise ConfigError(f"{where}: the endpoint is unreachable ({err})") from None
    raise ConfigError(f"{where}: cannot be written: {_classify(err)}") from None


class Workspace:
    """The local folder of one unit of work (a path, the base network) whose home is `rel` in storage.

    With local storage it is the storage folder itself. On an object store it is a private staging folder,
    filled from storage on entry (what a restarted unit resumes from) and pushed back by `push()`: new or
    changed files first, the `last` names after them, so the marker file names only files already there.
    """

    def __init__(self, st: Storage, rel: str, *, fetch: bool = True):
        self.st, self.rel, self.fetch = st, rel.strip("/"), fetch
        self._tmp: Path | None = None
        self._pushed: dict[str, tuple[int, int]] = {}
        self.dir = Path()

    def __enter__(self) -> Workspace:
        if self.st.local is not None:
            self.dir = self.st.local / self.rel
            self.dir.mkdir(parents=True, exist_ok=True)
            return self
        self._tmp = Path(tempfile.mkdtemp(prefix="fipray-ws-"))
        self.dir = self._tmp / "w"
        self.dir.mkdir()
        if self.fetch:
            for n in self.st.download_dir(self.rel, self.dir):
                s = (self.dir / n).stat()
                self._pushed[n] = (s.st_size, s.st_mtime_ns)
        return self

    def push(self, last: Iterable[str] = ()) -> list[str]:
        """Upload what changed since the last push (no-op on local storage); returns the names uploaded."""
        if self.st.local is not None:
            return []
        last = list(last)
        changed = []
        for p in sorted(self.dir.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            n = p.relative_to(self.dir).as_posix()
            s = p.stat()
            if self._pushed.get(n) != (s.st_size, s.st_mtime_ns):
                changed.append((n, (s.st_size, s.st_mtime_ns)))
        changed.sort(key=lambda c: (c[0] in last, last.index(c[0]) if c[0] in last else 0))
        for n, sig in changed:
            self.st.upload_file(self.dir / n, f"{self.rel}/{n}")
            self._pushed[n] = sig
        return [n for n, _ in changed]

    def input_file(self, rel: str) -> Path:
        """Another storage file this unit reads (e.g. w0) as a local file: itself, or a private copy."""
        if self.st.local is not None or self._tmp is None:
            return Path(self.st.path(rel))
        return self.st.download_file(rel, self._tmp / "inputs" / rel)

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
