"""Ensemble serving: fused in-process forward vs loop vs vmap, and HTTP (Ray Serve) vs in-process.

    python benchmarks/bench_serve.py --ensemble runs/ensemble/ensembles/fip_seed0   # a trained ensemble
    python benchmarks/bench_serve.py                                                # 10 random small CNNs
    python benchmarks/bench_serve.py --smoke-test                                   # seconds, tiny

Prints, from one run on one machine (torch single-threaded, as the serving actors run):
  forward table        per model, batch 1 and 256, no-grad forward and forward + input gradient:
                       time of a Python loop over members, torch.func vmap, the fused forward, and
                       `Ensemble` itself (fused, except conv nets on CPU batches > 32: the loop)
  Ensemble/member      in-process ensemble latency over one member's, same batch (goal <= 2 at batch 1)
  http / in-process    examples/s through POST /predict (bounded load test, @serve.batch) over
                       examples/s of the in-process ensemble on the same request batches (goal >= 0.5)
  latency percentiles  p50 / p90 / p99 of the HTTP requests
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from fipray.ensemble import Ensemble, load_ensemble, read_ensemble_meta, save_ensemble
from fipray.models import create_model


def _best_interleaved(fns: dict, n: int, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` mean seconds per call over `n` calls of each function.

    The functions take turns within each repeat, so that load from other processes on a shared
    machine hits them alike instead of whichever happened to run at the time.
    """
    for fn in fns.values():
        for _ in range(max(1, n // 4)):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for label, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[label] = min(best[label], (time.perf_counter() - t0) / n)
    return best


def _vmap_fn(members):
    from torch.func import functional_call, stack_module_state

    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    vm = torch.vmap(one, in_dims=(0, 0, None))

    def head(x):
        logp = torch.log_softmax(vm(params, buffers, x), dim=-1)
        return torch.logsumexp(logp, dim=0)

    return head


def bench_forward(name: str, kwargs: dict, shape: tuple, k: int, batches: list[int], repeats: int) -> list[dict]:
    members = []
    for i in range(k):
        torch.manual_seed(i)
        members.append(create_model(name, num_classes=10, input_shape=shape, **kwargs).eval())
    for m in members:
        m.requires_grad_(False)  # serving / attacking needs input gradients only
    always_fused = Ensemble(members)
    always_fused._cpu_fused_max_batch = math.inf  # the fused path even where Ensemble picks the loop
    fns = {"loop": Ensemble(members, fused=False), "vmap": _vmap_fn(members), "fused": always_fused,
           "Ensemble": Ensemble(members)}
    single = members[0]
    rows = []
    for b in batches:
        x = torch.rand(b, *shape)
        n = 100 if b == 1 else 3
        for mode in ("forward", "forward+input_grad"):
            calls = {}
            for label, fn in [*fns.items(), ("single_member", single)]:
                if mode == "forward":
                    def call(fn=fn, x=x):
                        with torch.no_grad():
                            fn(x)
                else:
                    def call(fn=fn, x=x):
                        xg = x.clone().requires_grad_(True)
                        torch.autograd.grad(fn(xg).sum(), xg)
                calls[label] = call
            best = _best_interleaved(calls, n, repeats)
            row = {"model": name, "batch": b, "mode": mode, **{f"{k}_ms": 1e3 * v for k, v in best.items()}}
            row["vmap/loop"] = row["vmap_ms"] / row["loop_ms"]
            row["fused/loop"] = row["fused_ms"] / row["loop_ms"]
            row["Ensemble/loop"] = row["Ensemble_ms"] / row["loop_ms"]
            row["Ensemble/member"] = row["Ensemble_ms"] / row["single_member_ms"]
            row["loop/member"] = row["loop_ms"] / row["single_member_ms"]
            rows.append(row)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_http(ens_dir: Path, shards_list: list[int], requests: int, concurrency: int, request_batches: list[int],
               seed: int = 0) -> list[dict]:
    from ray import serve

    from fipray.ray._local import init_local
    from fipray.ray.serve import start
    from fipray.ray.serve_load import load_test

    meta = read_ensemble_meta(ens_dir)
    shape = tuple(meta["model_spec"]["input_shape"])
    g = torch.Generator().manual_seed(seed)
    ens = load_ensemble(ens_dir).requires_grad_(False)
    workloads = {}
    for rb in request_batches:
        inputs = [torch.rand(rb, *shape, generator=g) for _ in range(64)]
        bodies = [json.dumps({"inputs": x.tolist()}).encode() for x in inputs]
        # In-process: the same request batches, one at a time, the Ensemble, one thread.
        order = [inputs[i % len(inputs)] for i in range(min(requests, 200))]

        def run_inproc(order=order):
            with torch.no_grad():
                for x in order:
                    ens(x)

        run_inproc()
        t_in = min(_timed(run_inproc) for _ in range(3))
        workloads[rb] = (bodies, len(order) * rb / t_in)

    tmp = tempfile.mkdtemp(prefix="fbs", dir="/tmp")
    init_local(num_cpus=2, temp_dir=tmp, object_store_memory=256 * 1024**2)
    rows = []
    try:
        for shards in shards_list:
            port = _free_port()
            t0 = time.perf_counter()
            start({"ensemble": str(ens_dir), "shards": shards, "max_inputs": max(256, *request_batches)},
                  host="127.0.0.1", port=port)
            deploy_s = time.perf_counter() - t0
            url = f"http://127.0.0.1:{port}/predict"
            for rb, (bodies, inproc_eps) in workloads.items():
                load_test(url, bodies, requests=min(50, requests), concurrency=concurrency, time_limit_s=60,
                          examples_per_request=rb)  # warm-up
                res = load_test(url, bodies, requests=requests, concurrency=concurrency, time_limit_s=300,
                                examples_per_request=rb)
                res.update({"shards": shards, "request_batch": rb, "deploy_s": deploy_s,
                            "inproc_examples_per_s": inproc_eps,
                            "http/in-process": res["examples_per_s"] / inproc_eps})
                rows.append(res)
            serve.shutdown()
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _random_ensemble(directory: Path, name: str, kwargs: dict, shape: tuple, k: int) -> Path:
    members = []
    for i in range(k):
        torch.manual_seed(i)
        members.append(create_model(name, num_classes=10, input_shape=shape, **kwargs))
    spec = {"name": name, "kwargs": kwargs, "num_classes": 10, "input_shape": list(shape)}
    return save_ensemble(members, directory, model_spec=spec, metadata={"operation": "random (benchmark)"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ensemble", type=Path, help="ensemble folder to serve (default: 10 random small CNNs)")
    p.add_argument("--members", type=int, default=10)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--request-batch", type=int, nargs="+", default=[1, 32], help="inputs per HTTP request")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    p.add_argument("--skip-http", action="store_true", help="only the in-process forward table")
    p.add_argument("--skip-forward", action="store_true", help="only the HTTP part")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(1)

    models = [("small_cnn", {}, (1, 8, 8)), ("mlp", {"hidden": [256, 256]}, (1, 8, 8))]
    batches, repeats, members = [1, 256], args.repeats, args.members
    if args.smoke_test:
        models = [("mlp", {"hidden": [16]}, (1, 4, 4))]
        batches, repeats, members = [1, 8], 1, 3
        args.requests, args.shards, args.request_batch = 20, [2], [1, 4]

    print(json.dumps({"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "members": members,
                      "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}))
    print("\n# in-process forward: loop vs vmap vs fused (ms per call, best of repeats)")
    for name, kwargs, shape in [] if args.skip_forward else models:
        for row in bench_forward(name, kwargs, shape, members, batches, repeats):
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))

    if args.skip_http:
        return 0
    with tempfile.TemporaryDirectory(prefix="fbs_ens") as tmp:
        ens_dir = args.ensemble
        if ens_dir is None:
            name, kwargs, shape = models[0]
            ens_dir = _random_ensemble(Path(tmp) / "ens", name, kwargs, shape, members)
        print(f"\n# HTTP through Ray Serve vs in-process, ensemble {ens_dir} "
              f"({read_ensemble_meta(ens_dir)['num_members']} members), {args.requests} requests, "
              f"concurrency {args.concurrency}, {args.request_batch} input(s) per request; in-process = the "
              f"Ensemble on the same request batches, one at a time")
        for row in bench_http(ens_dir, args.shards, args.requests, args.concurrency, args.request_batch):
            keep = ("shards", "request_batch", "requests", "ok", "errors", "seconds", "throughput_rps", "examples_per_s",
                    "inproc_examples_per_s", "http/in-process", "p50_ms", "p90_ms", "p99_ms", "max_ms", "deploy_s")
            print(json.dumps({k: round(row[k], 3) if isinstance(row[k], float) else row[k] for k in keep}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
