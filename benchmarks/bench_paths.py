"""Parallel FIP paths on Ray: P paths on P workers vs 1 path on 1 worker, and Ray's start-up cost.

    python benchmarks/bench_paths.py                       # digits MLP, undirected walk, CPU (README numbers)
    python benchmarks/bench_paths.py --steps 20000 --paths 4 --num-cpus 4

One local Ray is started (its start-up is timed: the cost every `fipray paths` run pays), then
`fipray.ray.paths.run_paths` runs 1 path and P paths alternately, `--repeats` times each (best kept:
other load on a shared machine only ever slows a run down). Prints, from one run on one machine:
  ray_start_s                       seconds to start local Ray (once per `fipray paths` run)
  throughput (steps/s)              P * steps / wall seconds from launching the paths to the last one done
  P paths / 1 path                  throughput ratio (goal >= 0.85 * P; 2 paths on 2 workers: >= 1.7)
  P paths / serial                  the same P paths one after another in this process, without Ray
  loadavg                           the machine's 1-min load average before and after (other users' work)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def _job(steps: int, paths: int, hidden: int):
    from fipray.job import job_from_dict

    return job_from_dict({
        "operation": "undirected", "seeds": [0], "threads": 1,
        "data": {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}},
        "model": {"name": "mlp", "kwargs": {"hidden": [hidden, hidden]}}, "train": {"steps": 200},
        # Records and checkpoints rare enough that the benchmark measures path steps, not evaluation.
        "path": {"lam": 1.0, "beta": 0.0, "steps": steps, "memory_batch_size": 64, "record_every": steps // 4,
                 "checkpoint_every": steps // 2, "heldout": 64},
        "ensemble": {"members": 1, "sample_every": steps}, "ray": {"num_paths": paths, "report_every_s": 2.0}})


def _ray_run(steps: int, paths: int, hidden: int) -> dict:
    from fipray.ray.paths import run_paths

    with tempfile.TemporaryDirectory(prefix="fpbench") as d:
        s = run_paths(_job(steps, paths, hidden), Path(d) / "out", progress=False)
    return {"paths": paths, "paths_s": s["paths_seconds"], "total_s": s["seconds"],
            "throughput": paths * steps / s["paths_seconds"]}


def _serial(steps: int, paths: int, hidden: int) -> dict:
    from fipray.units import run_one_path, train_shared_base

    torch.set_num_threads(1)
    job = _job(steps, paths, hidden)
    with tempfile.TemporaryDirectory(prefix="fpbench") as d:
        base = train_shared_base(job.cfg, d)
        t0 = time.perf_counter()
        for k in range(paths):
            run_one_path(job.cfg, k, base, Path(d) / f"p{k}")
        secs = time.perf_counter() - t0
    return {"paths": paths, "paths_s": secs, "throughput": paths * steps / secs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8000, help="steps per path")
    p.add_argument("--paths", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    import os

    import ray

    from fipray.ray.cluster import quiet_ray
    from fipray.ray.local import init_local

    load0 = os.getloadavg()[0]
    quiet_ray()
    t0 = time.perf_counter()
    init_local(num_cpus=args.num_cpus, temp_dir=tempfile.mkdtemp(prefix="fpbr", dir="/tmp"))
    ray_start = time.perf_counter() - t0
    ones, manys = [], []
    for _ in range(args.repeats):
        ones.append(_ray_run(args.steps, 1, args.hidden))
        manys.append(_ray_run(args.steps, args.paths, args.hidden))
    ray.shutdown()
    one, many = max(ones, key=lambda r: r["throughput"]), max(manys, key=lambda r: r["throughput"])
    serial = _serial(args.steps, args.paths, args.hidden)
    out = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine(), "num_cpus": args.num_cpus},
        "setting": {"model": f"mlp {args.hidden}-{args.hidden}", "operation": "undirected", "steps": args.steps,
                    "threads_per_path": 1},
        "ray_start_s": round(ray_start, 2),
        "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "repeats": args.repeats,
        "throughput_steps_per_s": {"1 path / 1 worker": round(one["throughput"], 1),
                                   f"{args.paths} paths / {args.paths} workers": round(many["throughput"], 1),
                                   f"{args.paths} paths serial, no Ray": round(serial["throughput"], 1)},
        f"{args.paths} paths / 1 path": round(many["throughput"] / one["throughput"], 3),
        f"{args.paths} paths / serial": round(many["throughput"] / serial["throughput"], 3),
        "wall_s_per_run_incl_base_training": {"1 path": round(one["total_s"], 1),
                                              f"{args.paths} paths": round(many["total_s"], 1)},
        "all_throughputs": {"1": [round(r["throughput"], 1) for r in ones],
                            str(args.paths): [round(r["throughput"], 1) for r in manys]},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
