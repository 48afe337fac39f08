"""`fipray` command line: `fipray continual|sparsify|ensemble --config FILE --out DIR [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXPERIMENTS = ("continual", "sparsify", "ensemble")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fipray", description="Functionally invariant paths.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in EXPERIMENTS:
        s = sub.add_parser(name, help=f"run the {name} experiment (FIP vs its baselines over seeds)")
        s.add_argument("--config", type=Path, help=f"YAML config (e.g. jobs/configs/{name}_digits.yaml)")
        s.add_argument("--out", type=Path, help="output folder (default runs/<operation>-<run id>)")
        s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. path.lam=0.5")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fipray.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, [*args.overrides, f"operation={args.command}"])
        out = args.out or Path("runs") / f"{args.command}-{cfg.run_id()}"
        from fipray.experiments import run_experiment

        summary = run_experiment(cfg, out, progress=not args.no_progress)
    except ConfigError as e:
        print(f"fipray: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"fipray: error: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"results in {out}/ (summary.json, report.md, *.parquet, *.png)")
    if args.command == "continual":
        brief = {m: round(v["acc_mean"], 4) for m, v in summary["methods"].items()}
    elif args.command == "sparsify":
        brief = {m: {p: round(v["accuracy_mean"], 4) for p, v in d.items()} for m, d in summary["methods"].items()}
    else:
        brief = {m: round(v["clean_mean"], 4) for m, v in summary["methods"].items()}
    print(json.dumps(brief))
    return 0


if __name__ == "__main__":
    sys.exit(main())
