"""Helpers of `benchmarks/gpu_check.sh`: the environment report, the paths check and the final table.

    python benchmarks/gpu_check.py env [--require-cuda]          # versions, device, bf16, importable packages
    python benchmarks/gpu_check.py paths OUT_DIR --num-paths P   # check a `fipray paths` run, print its numbers
    python benchmarks/gpu_check.py report DIR SECTIONS_TSV       # one table + DIR/summary.json

Each prints what it found and exits non-zero when its check fails, so the shell script can mark that
section FAILED and go on to the next one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path

PACKAGES = ("torch", "timm", "transformers", "ray", "torchattacks", "pyarrow", "safetensors", "sklearn", "yaml")


def cmd_env(args: argparse.Namespace) -> int:
    info: dict = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.platform(),
                  "cpus": os.cpu_count()}
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            info[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001  (any import failure is a finding, not a crash)
            info[name] = f"MISSING ({type(e).__name__}: {e})"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, device_count=torch.cuda.device_count(), cuda=torch.version.cuda,
                    total_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import fipray

        info["fipray"] = str(Path(fipray.__file__).parent)
    except Exception as e:  # noqa: BLE001
        info["fipray"] = f"MISSING ({type(e).__name__}: {e})"
    print(json.dumps(info, indent=2))
    if args.require_cuda and not info["cuda_available"]:
        print("!!! CUDA is not available to this Python", file=sys.stderr)
        return 1
    if str(info["fipray"]).startswith("MISSING"):
        return 1
    return 0


def cmd_paths(args: argparse.Namespace) -> int:
    out = Path(args.out)
    summary_file = out / "summary.json"
    if not summary_file.is_file():
        print(f"!!! {summary_file} was not written", file=sys.stderr)
        return 1
    s = json.loads(summary_file.read_text())
    keep = {k: s.get(k) for k in ("operation", "backend", "num_paths", "seeds", "seconds", "ray_start_seconds",
                                  "paths_seconds", "ensemble_members", "path_rows", "streamed_rows_match_table")}
    keep["paths"] = [{k: p.get(k) for k in ("path", "seed", "steps", "seconds", "attempts")} for p in s.get("paths", [])]
    print(json.dumps(keep, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(keep, indent=2))
    problems = []
    if s.get("num_paths") != args.num_paths or len(s.get("paths", [])) != args.num_paths:
        problems.append(f"expected {args.num_paths} paths, summary has {s.get('num_paths')} "
                        f"({len(s.get('paths', []))} listed)")
    if not s.get("path_rows"):
        problems.append("path.parquet has no rows")
    if s.get("streamed_rows_match_table") is False:
        problems.append("streamed rows do not match path.parquet")
    for p in problems:
        print(f"!!! {p}", file=sys.stderr)
    return 1 if problems else 0


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def cmd_report(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    sections = []
    for line in Path(args.sections).read_text().splitlines():
        name, rc, secs = line.split("\t")
        sections.append({"section": name, "rc": int(rc), "seconds": int(secs), "ok": rc == "0"})
    summary: dict = {"sections": sections}
    print(f"{'section':10s} {'status':>8s} {'rc':>4s} {'seconds':>8s}")
    for s in sections:
        status = "ok" if s["ok"] else ("TIMEOUT" if s["rc"] in (124, 137) else "FAILED")
        print(f"{s['section']:10s} {status:>8s} {s['rc']:4d} {s['seconds']:8d}")
    rows = []
    for name in ("vit", "bert"):
        f = d / f"{name}.json"
        if f.is_file():
            r = json.loads(f.read_text())
            rows.append((name, r))
            summary[name] = {k: r.get(k) for k in (
                "model", "device_name", "amp", "batch", "memory", "input_shape", "params", "finetune_step_ms",
                "fip_step_ms", "fip_over_finetune", "flop_ratio", "time_ratio_over_flop_ratio", "gv_ms", "grad_ms",
                "gv_over_grad", "gv_op_over_grad", "peak_mem_gib", "wall_s")}
    if rows:
        print(f"\n{'model':6s} {'ft ms':>8s} {'fip ms':>8s} {'fip/ft':>7s} {'flops':>6s} {'t/flop':>7s} "
              f"{'gv/grad':>8s} {'gvop/gr':>8s} {'peak GiB ft/fip/gv/grad':>26s}")
        for name, r in rows:
            mem = r.get("peak_mem_gib") or {}
            peaks = "/".join(_fmt(mem.get(k), ".1f") for k in ("finetune_step", "fip_step", "gv", "grad"))
            print(f"{name:6s} {r['finetune_step_ms']:8.2f} {r['fip_step_ms']:8.2f} {r['fip_over_finetune']:7.3f} "
                  f"{r['flop_ratio']:6.2f} {r['time_ratio_over_flop_ratio']:7.3f} {r['gv_over_grad']:8.3f} "
                  f"{r['gv_op_over_grad']:8.3f} {peaks:>26s}")
        print("goals: fip/ft <= 1.25 on ViT-B/16 (paper ~1.4 on an RTX 2060), (time ratio)/(flop ratio) <= 1.1, "
              "gv/grad <= 3")
    pf = d / "paths_summary.json"
    if pf.is_file():
        summary["paths"] = json.loads(pf.read_text())
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    failed = [s["section"] for s in sections if not s["ok"]]
    print(f"\n{'ALL SECTIONS OK' if not failed else 'FAILED SECTIONS: ' + ', '.join(failed)}; "
          f"wrote {d / 'summary.json'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--require-cuda", action="store_true")
    p = sub.add_parser("paths")
    p.add_argument("out")
    p.add_argument("--num-paths", type=int, required=True)
    p.add_argument("--json-out", default=None)
    r = sub.add_parser("report")
    r.add_argument("dir")
    r.add_argument("sections")
    args = ap.parse_args(argv)
    return {"env": cmd_env, "paths": cmd_paths, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
