"""Ray Tune sweep of a fipray config, for `ray job submit` (thin: parse, build config, call the library).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py --config jobs/configs/sweep_continual_digits.yaml --out /shared/runs/sweep

Inside a job RAY_ADDRESS names the cluster, so the sweep joins it; run by hand, a local Ray starts.
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
    p.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "sweep_continual_digits.yaml")
    p.add_argument("--out", type=Path, help="output folder (default runs/sweep-<operation>-<run id>)")
    p.add_argument("--address", help="Ray cluster (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--smoke-test", action="store_true", help="tiny steps, one seed, 2 trials: seconds")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    from fipray.config import ConfigError
    from fipray.ray.paths_config import load_job, smoke_overrides
    from fipray.ray.sweep import run_sweep

    try:
        over = (smoke_overrides(args.config, sweep=True) if args.smoke_test else []) + list(args.overrides)
        job = load_job(args.config, over)
        out = args.out or Path("runs") / f"sweep-{job.cfg.operation}-{job.cfg.run_id()}"
        summary = run_sweep(job, out, progress=False, address=args.address)
    except ConfigError as e:
        print(f"jobs/sweep.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("metric", "mode", "best_config", "best_metric", "num_trials",
                                              "num_stopped_early", "seconds")}))
    print(f"results in {Path(out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
