"""`fipray paths` for `ray job submit`: a thin wrapper over the same command-line runner.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/paths.py [arguments of fipray paths]

Inside a job RAY_ADDRESS names the cluster, so the work runs on it; run by hand, a local Ray starts.
Every argument is `fipray paths`'s (`--smoke-test` included); see `fipray paths --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the submitted working dir's fipray, not whatever the node has installed
DEFAULT_CONFIG = "jobs/configs/ensemble_digits.yaml"  # used when no --config is given


def main(argv: list[str] | None = None) -> int:
    from fipray.cli import main as fipray_main

    args = list(sys.argv[1:] if argv is None else argv)
    if DEFAULT_CONFIG and "--config" not in args and not any(a.startswith("--config=") for a in args):
        args = ["--config", str(ROOT / DEFAULT_CONFIG), *args]
    return fipray_main(["paths", *args], prog="jobs/paths.py")


if __name__ == "__main__":
    sys.exit(main())
