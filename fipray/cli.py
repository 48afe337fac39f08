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
        if name == "ensemble":
            s.add_argument("--ensemble", type=Path, dest="load",
                           help="evaluate the networks of this ensemble folder (e.g. `fipray paths`' ensemble/) "
                                "as the FIP candidates instead of walking a new path (= ensemble.load)")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. path.lam=0.5")
    # Ray commands (fipray.ray; Ray is imported only when one of them runs).
    for name, helptext in (("paths", "run P FIP paths in parallel on Ray, merge their tables and ensembles"),
                           ("sweep", "search config fields with Ray Tune + ASHA (the YAML's sweep: section)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", type=Path, help="YAML config (e.g. jobs/configs/sweep_continual_digits.yaml)")
        s.add_argument("--out", type=Path, help=f"output folder (default runs/{name}-<run id>)")
        s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray is started)")
        s.add_argument("--no-progress", action="store_true", help="hide the progress display")
        if name == "paths":
            s.add_argument("--num-paths", type=int, help="number of paths P (default ray.num_paths, 1)")
            s.add_argument("--backend", choices=("worker", "train"), help="default ray.backend (worker)")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. path.lam=0.5")
    # Geometry commands (spectrum, compose, query): arguments and dispatch live in fipray._geometry_cli.
    from fipray._geometry_cli import add_parsers

    add_parsers(sub)
    # Serving commands (fipray.ray.serve / fipray.ray.attack; Ray is imported only when one runs).
    s = sub.add_parser("serve", help="serve an ensemble folder over HTTP with Ray Serve (members sharded)")
    s.add_argument("--ensemble", type=Path, required=True, help="ensemble folder (ensemble.json + members.safetensors)")
    s.add_argument("--shards", type=int, default=1, help="shard deployments the members are split over (1: one deployment)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--max-inputs", type=int, default=256, help="largest batch one request may carry")
    s.add_argument("--gpus-per-shard", type=float, default=0.0, help="GPUs each shard asks for")
    s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray is started)")
    s = sub.add_parser("attack", help="white-box and transfer PGD on a served (sharded) ensemble via Ray handles")
    s.add_argument("--ensemble", type=Path, required=True, help="ensemble folder written by `fipray ensemble`")
    s.add_argument("--eps", type=float, nargs="+", help="L-inf radii (default: the run config's ensemble.eps)")
    s.add_argument("--shards", type=int, default=1, help="shard deployments the members are split over")
    s.add_argument("--steps", type=int, help="PGD steps (default: the run config's ensemble.pgd_steps)")
    s.add_argument("--seed", type=int, help="attack seed (default: the ensemble's seed)")
    s.add_argument("--examples", type=int, help="test examples (default: the run config's ensemble.eval_examples)")
    s.add_argument("--config", type=Path, help="the run config (default: config.yaml of the run that made it)")
    s.add_argument("--surrogate", type=Path, help="ensemble folder to craft transfer attacks on (default: w0)")
    s.add_argument("--out", type=Path, help="output folder (default runs/attack-<run id>-seed<S>-s<shards>)")
    s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray is started)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("paths", "sweep"):
        import importlib

        return importlib.import_module(f"fipray.ray.{args.command}").main(args)
    if args.command in ("spectrum", "compose", "query"):
        from fipray._geometry_cli import main as geometry_main

        return geometry_main(args)
    if args.command in ("serve", "attack"):
        return _serve_or_attack(args)
    from fipray.config import ConfigError, load_config

    try:
        extra = [f"ensemble.load={json.dumps(str(args.load))}"] if getattr(args, "load", None) else []
        cfg = load_config(args.config, [*args.overrides, *extra, f"operation={args.command}"])
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


def _serve_or_attack(args: argparse.Namespace) -> int:
    from fipray.config import ConfigError

    try:
        if args.command == "serve":
            from fipray.ray.serve import main_serve

            serve_args = {"ensemble": str(args.ensemble), "shards": args.shards, "max_inputs": args.max_inputs,
                          "gpus_per_shard": args.gpus_per_shard}
            return main_serve(serve_args, host=args.host, port=args.port, address=args.address)
        import ray

        from fipray.ray.attack import format_brief, main_attack

        try:
            summary = main_attack(args.ensemble, eps=args.eps, shards=args.shards, steps=args.steps, seed=args.seed,
                                  examples=args.examples, config=args.config, surrogate=args.surrogate,
                                  out=args.out, address=args.address)
        finally:
            ray.shutdown()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"fipray: error: {e}", file=sys.stderr)
        return 2
    print(summary["report"])
    print(f"results in {summary['out']}/ (summary.json, report.md, robustness.parquet)")
    print(format_brief(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
