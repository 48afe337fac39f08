"""Errors that mean "a file the user gave (or a run left) is damaged": the CLI prints them as one line, exit 2."""

from __future__ import annotations


class DamagedFile(ValueError):
    """A file fipray must read is empty, truncated, of another format or fails its checksum; the message names the
    file and what is wrong with it (never a library's traceback or advice to load untrusted pickles)."""
