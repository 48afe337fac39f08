"""Every shipped experiment config's summary numbers, to check that a refactor changed none of them.

    python benchmarks/shipped_numbers.py run --out /tmp/numbers-after        # runs every shipped config
    python benchmarks/shipped_numbers.py compare /tmp/numbers-before /tmp/numbers-after

`run` executes the experiment configs in jobs/configs (seed-fixed) through the public API and writes
`<out>/<config>/summary.json` plus `<out>/numbers.json`: every number of every summary except wall times
and the environment. `compare` prints, per config, how many numbers are bit-identical, how many differ
and the largest absolute difference. Use `--only NAME ...` to run a subset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["continual_digits", "sparsify_digits", "ensemble_digits", "compose_digits", "spectrum_digits",
           "spectrum_cnn1m"]
SKIP = ("seconds", "environment", "run_id", "set", "sanity_measurements")


def flatten(x: object, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists by index; wall times and paths dropped."""
    out: dict[str, object] = {}
    if isinstance(x, dict):
        for k, v in x.items():
            if any(s in str(k) for s in SKIP):
                continue
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = x
    return out


def run(out: Path, only: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from fipray.config import load_config
    from fipray.experiments import run_experiment

    numbers: dict[str, dict] = {}
    for name in only or CONFIGS:
        cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml")
        t0 = time.perf_counter()
        summary = run_experiment(cfg, out / name, progress=False)
        numbers[name] = flatten(summary)
        print(f"{name}: {len(numbers[name])} numbers in {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1, sort_keys=True, default=str))


def compare(a: Path, b: Path) -> int:
    na = json.loads((a / "numbers.json").read_text())
    nb = json.loads((b / "numbers.json").read_text())
    worst = 0
    for name in sorted(set(na) | set(nb)):
        if name not in na or name not in nb:
            print(f"{name}: only in {'before' if name in na else 'after'}")
            continue
        x, y = na[name], nb[name]
        same, diff, missing, big = 0, [], sorted(set(x) ^ set(y)), 0.0
        for k in sorted(set(x) & set(y)):
            u, v = x[k], y[k]
            if u == v or (isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v)):
                same += 1
            else:
                diff.append(k)
                if isinstance(u, (int, float)) and isinstance(v, (int, float)):
                    big = max(big, abs(float(u) - float(v)))
        print(f"{name}: {same} identical, {len(diff)} differ (max |Δ| {big:.3g}), {len(missing)} keys in one only")
        for k in diff[:10]:
            print(f"    {k}: {x[k]} -> {y[k]}")
        for k in missing[:10]:
            print(f"    only in {'before' if k in x else 'after'}: {k}")
        worst = max(worst, len(diff))
    return 1 if worst else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--only", nargs="*", default=[])
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.out, args.only)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
