"""What every `jobs/<command>.py` does: put this checkout's fipray first and run `fipray <command>`.

Inside `ray job submit` RAY_ADDRESS names the cluster, so the work runs on it; run by hand, a local Ray
starts. Every argument is the command's own (`--smoke-test` included; see `fipray <command> --help`).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: str, default_config: str = "", argv: list[str] | None = None) -> int:
    """`fipray <command> [argv]`, with `--config ROOT/default_config` when none is given."""
    sys.path.insert(0, str(ROOT))  # the submitted working dir's fipray, not whatever the node has installed
    from fipray.cli import main as fipray_main

    args = list(sys.argv[1:] if argv is None else argv)
    if default_config and "--config" not in args and not any(a.startswith("--config=") for a in args):
        args = ["--config", str(ROOT / default_config), *args]
    return fipray_main([command, *args], prog=f"jobs/{command}.py")
