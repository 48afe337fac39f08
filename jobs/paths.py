"""P FIP paths of a fipray config on Ray, for `ray job submit` (thin: parse, build config, call the library).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/paths.py --config jobs/configs/ensemble_digits.yaml --num-paths 8 --out /shared/runs/paths

Inside a job RAY_ADDRESS names the cluster, so the paths run on it; run by hand, a local Ray starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the submitted working dir's fipray, not whatever the node has installed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "ensemble_digits.yaml")
    p.add_argument("--num-paths", type=int, help="number of paths P (default ray.num_paths)")
    p.add_argument("--backend", choices=("worker", "train"), help="default ray.backend (worker)")
    p.add_argument("--out", type=Path, help="output folder (default runs/paths-<operation>-<run id>)")
    p.add_argument("--address", help="Ray cluster (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--smoke-test", action="store_true", help="tiny steps, 2 paths: seconds")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    from fipray.config import ConfigError
    from fipray.ray.paths import run_paths
    from fipray.ray.paths_config import load_job, smoke_overrides

    try:
        over = (smoke_overrides(args.config, sweep=False) if args.smoke_test else []) + list(args.overrides)
        if args.num_paths is not None:
            over.append(f"ray.num_paths={args.num_paths}")
        if args.backend is not None:
            over.append(f"ray.backend={args.backend}")
        job = load_job(args.config, over)
        out = args.out or Path("runs") / f"paths-{job.cfg.operation}-{job.cfg.run_id()}"
        summary = run_paths(job, out, progress=False, address=args.address)
    except ConfigError as e:
        print(f"jobs/paths.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("operation", "backend", "num_paths", "path_rows",
                                              "ensemble_members", "seconds")}))
    print(f"results in {Path(out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
