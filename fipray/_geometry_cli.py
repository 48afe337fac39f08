"""`fipray spectrum|compose|query`: the geometry commands (argument parsing and dispatch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for name, helptext in (("spectrum", "spectrum of the metric g: top eigenvalues, density, invariant fraction"),
                           ("compose", "apply operations in sequence (e.g. continual>sparsify and back), "
                                       "recording one path-connected network set")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", type=Path, help=f"YAML config (e.g. jobs/configs/{name}_digits.yaml)")
        s.add_argument("--out", type=Path, help=f"output folder (default runs/{name}-<run id>)")
        s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. spectrum.top_k=10")
    q = sub.add_parser("query", help="score every network of a stored set on a dataset; rank them, best first")
    q.add_argument("--set", dest="set_dir", type=Path, required=True, help="network set folder (fipray compose: OUT/set)")
    q.add_argument("--data", required=True, help="dataset name (digits, cifar10, hf_disk, parquet, ...)")
    q.add_argument("--data-kwargs", default="{}", help='JSON kwargs for get_data, e.g. \'{"seed": 1}\'')
    q.add_argument("--split", choices=("test", "train"), default="test")
    q.add_argument("--limit", type=int, default=0, help="use the first N examples (0: all)")
    q.add_argument("--metric", default="auto",
                   help="accuracy | cross_entropy | perplexity | entropy_perplexity | auto (accuracy with labels)")
    q.add_argument("--no-labels", action="store_true", help="ignore the labels (label-free entropy_perplexity)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    q.add_argument("--out", type=Path, help="output folder (default: SET/query-<data>)")


def main(args: argparse.Namespace) -> int:
    from fipray.config import ConfigError

    if args.command == "query":
        try:
            return _query(args)
        except (ConfigError, FileNotFoundError, ValueError) as e:  # ValueError: a metric the data cannot give
            print(f"fipray: error: {e}", file=sys.stderr)
            return 2
    try:
        from fipray.config import load_config
        from fipray.experiments.geometry import run_geometry

        cfg = load_config(args.config, [*args.overrides, f"operation={args.command}"])
        out = args.out or Path("runs") / f"{args.command}-{cfg.run_id()}"
        summary = run_geometry(cfg, out, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError) as e:
        print(f"fipray: error: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"results in {out}/ (summary.json, report.md, *.parquet, *.png)")
    if args.command == "spectrum":
        brief = {"top_eigenvalues": [round(v, 6) for v in summary["top_eigenvalues"][:5]],
                 "fraction_below": summary["fraction_below"], "seconds": round(summary["seconds"], 1)}
    else:
        brief = {"end_point_distance": summary["end_point_distance"],
                 **{o: {"accuracy": round(v["accuracy"], 4), "sparsity": round(v["sparsity"], 4)}
                    for o, v in summary["orders"].items()}}
    print(json.dumps(brief))
    return 0


def _query(args: argparse.Namespace) -> int:
    import torch

    from fipray import report
    from fipray._io import atomic_write_json, atomic_write_text, write_parquet
    from fipray.config import ConfigError
    from fipray.data import as_tensors, get_data
    from fipray.netset import load_set
    from fipray.query import query_set

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        kwargs = json.loads(args.data_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--data-kwargs is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--data-kwargs must be a JSON object, got {args.data_kwargs!r}")
    nset = load_set(args.set_dir)
    try:
        bundle = get_data(args.data, **kwargs)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"--data {args.data!r}: {e.args[0] if e.args else e}") from None
    x, y = as_tensors(getattr(bundle, args.split))
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    if list(x.shape[1:]) != list(nset.model_spec["input_shape"]):
        raise ConfigError(f"--data {args.data!r}: inputs of shape {tuple(x.shape[1:])} do not fit the set's "
                          f"networks (input_shape {tuple(nset.model_spec['input_shape'])})")
    labelled = not args.no_labels and bool((y >= 0).any())
    res = query_set(nset, x, y.long() if labelled else None, metric=args.metric, device=args.device)
    out = args.out or Path(args.set_dir) / f"query-{args.data}"
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / "ranking.parquet", res.rows)
    cols = ["rank", "node"] + [k for k in ("accuracy", "cross_entropy", "perplexity", "entropy_perplexity")
                               if k in res.rows[0]]
    table = report.md_table(cols, [[r[c] for c in cols] for r in res.rows])
    best = res.best
    summary = {"metric": res.metric, "best": best["node"], "best_scores": {c: best[c] for c in cols[2:]},
               "best_weights": str(Path(args.set_dir) / next(n["weights"] for n in nset.nodes
                                                            if n["node"] == best["node"])),
               "num_networks": len(res.rows), "num_points": len(x), "data": args.data, "data_kwargs": kwargs,
               "split": args.split, "labelled": labelled}
    atomic_write_json(out / "summary.json", summary)
    md = "\n".join([f"# Query of {args.set_dir} with {args.data} ({args.split}, {len(x)} examples)", "",
                    f"Ranked by {res.metric} ({'higher' if res.metric == 'accuracy' else 'lower'} is better). "
                    f"Best network: `{best['node']}` ({summary['best_weights']}).", "", table, ""])
    atomic_write_text(out / "report.md", md)
    print(md)
    print(f"results in {out}/ (ranking.parquet, summary.json, report.md)")
    print(json.dumps({"best": best["node"], res.metric: best[res.metric]}))
    return 0
