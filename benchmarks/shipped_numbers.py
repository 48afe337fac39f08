"""Every shipped experiment config's summary numbers, to check that a refactor changed none of them.

    python benchmarks/shipped_numbers.py run --out /tmp/numbers-after        # runs every shipped config
    python benchmarks/shipped_numbers.py compare /tmp/numbers-before /tmp/numbers-after

`run` executes the experiment configs in jobs/configs (seed-fixed) through the public API and writes
`<out>/<config>/summary.json` plus `<out>/numbers.json`: every number of every summary except wall times
and the environment. `compare` prints, per config, how many numbers are bit-identical, how many differ
and the largest absolute difference. Use `--only NAME ...` to run a subset.

By default `run` covers every digits experiment config at its shipped size (about 25 minutes on 2 cores).
The real-network configs (pretrained MiniLM-L6 on BBC News) run reduced, so that a refactor is checked on a
transformer too in a few minutes: one seed and a few steps of each phase (`REAL`, the overrides beside each
name; `--only` names them like any other). `--real` adds them to the default set.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["continual_digits", "continual_digits_bn", "continual_digits_domain", "continual_digits_paper",
           "sparsify_digits", "compose_digits", "spectrum_digits", "spectrum_cnn1m", "ensemble_digits",
           "ensemble_digits_vit", "ensemble_robust_digits"]
# Real networks, reduced: the same code paths (pretrained weights, tokenizer, attention, dropout seeded per step),
# one seed, a few steps. The numbers are not results, only a fingerprint of the arithmetic.
REAL = {
    "sparsify_bbc_minilm": ["seeds=[0]", "train.steps=6", "path.steps=4", "sparsify.invariance_steps=2",
                            "sparsify.calibration=16", "data.kwargs.per_class=20"],
    "continual_bbc_minilm": ["seeds=[0]", "train.steps=6", "path.steps=4", "continual.memory_per_task=8",
                             "continual.baselines=[naive,er,derpp,lora]",
                             "continual.tasks=[{name: bbc_news, kwargs: {seed: 0, max_length: 32, per_class: 20, "
                             "topics: [business, entertainment, politics]}}, {name: bbc_news, kwargs: {seed: 0, "
                             "max_length: 32, per_class: 20, topics: [sports, tech]}}]"],
    "spectrum_minilm": ["train.steps=6", "spectrum.points=16", "spectrum.lanczos_iters=8", "spectrum.slq_iters=6",
                        "data.kwargs.per_class=20"],
}
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
    unknown = sorted(set(only) - set(CONFIGS) - set(REAL))
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}; shipped: {', '.join([*CONFIGS, *REAL])}")
    sys.path.insert(0, str(ROOT))
    from fipray.config import load_config
    from fipray.experiments import run_experiment

    numbers: dict[str, dict] = {}
    for name in only or CONFIGS:
        cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml", REAL.get(name, []))
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
    r.add_argument("--real", action="store_true", help="also the reduced real-network configs (REAL)")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.out, args.only or ([*CONFIGS, *REAL] if args.real else []))
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
