"""`fipray paths`: P FIP paths at once on Ray, each its own unit of scheduling and of failure.

    run_paths(job, out) -> summary

1. check everything that can be checked before work starts (paths, storage, resources);
2. train the shared base network w0 once (a Ray task), into `<storage>/base/`;
3. launch one unit per path: `backend: worker` runs the core loop in a Ray task (retried in a fresh
   process when its process dies, resuming from the path's checkpoint); `backend: train` runs a
   `TorchTrainer` per path (DDP over `workers_per_path` ranks, Train's FailureConfig and checkpoint
   restore). Ranks of one trainer fail together, so paths never share a trainer (RAY_NOTES.md);
4. merge: the record rows of every path into `<out>/path.parquet` (column `path`), the sampled networks
   of every path into one ensemble folder `<out>/ensemble/` (`fipray.ensemble.load_ensemble`).

Storage (`ray.storage_path`, default `<out>/storage`) is a folder every node sees or a `s3://`, `gs://`,
`file://` URI (`fipray.ray.storage`): on an object store each path runs in a staging folder on its node,
pushes its checkpoint (and the samples it names) at every checkpoint and its outputs at the end, and a
path restarted on another node (its process or its whole node lost) starts from what storage holds. The
merged outputs are then also put under `<storage>/merged/`, so a cluster without a shared filesystem
still leaves them where every machine can read them.

Paths push their record rows to a collector actor at most every `ray.report_every_s` seconds (and at
each checkpoint); rows re-sent by a restarted path are dropped by key (path, phase, phase_step), so the
driver's progress display and the merged table never count a row twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from fipray.atomic import atomic_write_json, atomic_write_text, write_parquet
from fipray.config import ConfigError, save_config
from fipray.job import JobConfig
from fipray.ray.local import init_local
from fipray.ray.storage import Storage, Workspace, check_storage, open_storage
from fipray.runtime import build_model, prepare_out
from fipray.units import (
    BASE_DIR,
    BASE_FILE,
    build_path,
    load_final,
    load_samples,
    path_operation,
    path_steps,
    run_one_path,
    train_shared_base,
    write_path_outputs,
)

BASE_REL = f"{BASE_DIR}/{BASE_FILE}"  # w0 in storage; written last, so its presence means w0 is complete


def path_rel(k: int) -> str:
    """Path k's folder in storage."""
    return f"paths/path{k}"


def quiet_ray() -> None:
    """Keep Ray's console noise out of the user's way: one progress display per run is what they see."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 the legacy reporter prints nothing
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/TensorBoard/JSON per trial
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _key(k: int, row: dict) -> tuple:
    return (k, row["phase"], row["phase_step"])


@ray.remote(num_cpus=0)
class Collector:
    """Receives the record rows and start events of every path; the driver polls it."""

    def __init__(self) -> None:
        self.rows: dict[tuple, dict] = {}
        self.duplicates = 0
        self.steps: dict[int, int] = {}
        self.starts: dict[int, list[int]] = {}

    def start(self, k: int, pid: int) -> int:
        self.starts.setdefault(k, []).append(pid)
        return len(self.starts[k])

    def push(self, k: int, rows: list[dict], step: int) -> None:
        for r in rows:
            key = _key(k, r)
            if key in self.rows:
                self.duplicates += 1
            self.rows[key] = r
        self.steps[k] = max(self.steps.get(k, 0), step)

    def progress(self) -> dict[int, int]:
        return dict(self.steps)

    def snapshot(self) -> dict:
        return {"rows": [{"path": key[0], **r} for key, r in sorted(self.rows.items(), key=lambda kv: (
            kv[0][0], kv[1]["step"]))], "duplicates": self.duplicates, "starts": self.starts}


class Reporter:
    """The core loop's callback inside a path: buffers record rows, pushes them every few seconds."""

    def __init__(self, collector: Any, k: int, every_s: float, enabled: bool = True):
        self.collector, self.k, self.every_s, self.enabled = collector, k, every_s, enabled
        self.rows: list[dict] = []
        self.step = 0
        self.last = time.monotonic()

    def __call__(self, event: str, payload: dict) -> None:
        if event == "record":
            self.rows.append(dict(payload))
            self.step = max(self.step, int(payload["step"]))
        elif event == "checkpoint":
            self.step = max(self.step, int(payload["global_step"]))
        if event == "checkpoint" or time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.enabled and (self.rows or self.step):
            self.collector.push.remote(self.k, self.rows, self.step)
        self.rows, self.last = [], time.monotonic()


def _threads(job: JobConfig) -> int:
    return job.cfg.threads or max(1, int(job.ray.cpus_per_path))


def worker_device(requested: str, gpu_ids: list, visible: str | None) -> str:
    """The torch device of a Ray worker: the GPU Ray assigned to it, never a hard-coded `cuda:0`.

    Args:
        requested: the config's `device` ("cpu" keeps the CPU even where Ray assigned a GPU, e.g. the
            fake GPU resources of a placement test; any "cuda[:i]" means "the GPU Ray gave me").
        gpu_ids: `ray.get_gpu_ids()` of this worker.
        visible: CUDA_VISIBLE_DEVICES of this worker (Ray sets it to the assigned GPUs, so the assigned
            GPU is usually `cuda:0` of this process; without it the index is the GPU's own id).
    """
    if not requested.startswith("cuda"):
        return requested
    if not gpu_ids:
        raise ConfigError(f"config key 'device': {requested!r}, but Ray assigned this worker no GPU "
                          "(ray.gpus_per_path is 0, or no node has a GPU)")
    gid = str(gpu_ids[0])
    order = [v.strip() for v in visible.split(",")] if visible else []
    return f"cuda:{order.index(gid) if gid in order else int(float(gid))}"


def _placement() -> dict:
    """Where this worker runs and on what Ray gave it (worker.json; what placement tests read)."""
    import socket

    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "node": ctx.get_node_id(), "host": socket.gethostname(), "started_at": time.time(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _base_task(cfg_dict: dict, storage_uri: str, threads: int) -> str:
    """w0 into `<storage>/base/` (on an object store: trained here, then put with model.safetensors last)."""
    from fipray.config import from_dict

    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    st = open_storage(storage_uri)
    device = worker_device(cfg.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if st.local is not None:
        train_shared_base(cfg, st.local, device=device)
    else:
        with tempfile.TemporaryDirectory(prefix="fipray-base-") as d:
            train_shared_base(cfg, d, device=device)
            st.upload_dir(Path(d) / BASE_DIR, BASE_DIR, last=[BASE_FILE])
    return st.display(BASE_REL)


def _worker_path(cfg_dict: dict, k: int, storage_uri: str, collector: Any, threads: int, every_s: float) -> dict:
    """Backend `worker`: path k's core loop in this Ray worker process, its folder in storage."""
    from fipray.config import from_dict

    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    attempt = ray.get(collector.start.remote(k, os.getpid()))
    st = open_storage(storage_uri)
    place = _placement()
    device = worker_device(cfg.device, place["gpu_ids"], place["cuda_visible_devices"])
    with Workspace(st, path_rel(k)) as ws:
        # Where the fault-tolerance tests find the process (or node) to kill; useful when debugging a cluster.
        st.write_json(f"{path_rel(k)}/worker.json", {**place, "attempt": attempt, "device": device})
        rep = Reporter(collector, k, every_s)

        def callback(event: str, payload: dict) -> None:
            if event == "checkpoint":  # persisted before its rows are announced
                ws.push(last=["checkpoint.pt"])
            rep(event, payload)

        res = run_one_path(cfg, k, ws.input_file(BASE_REL), ws.dir, callback=callback, device=device,
                           extra={"attempts": attempt, "backend": "worker", "world": 1, "node": place["node"],
                                  "gpu_ids": place["gpu_ids"], "device": device})
        ws.push(last=["result.json"])
    rep.flush()
    return res


def _train_loop(config: dict) -> None:
    """Backend `train`: the per-rank loop of path k's TorchTrainer.

    `ray.parallel: ddp` (world > 1): DDP, rank r on its own shard of the data (an effective batch
    `world` times larger); rank 0's checkpoint serves every rank. `ray.parallel: fsdp`: the network
    sharded over the ranks (`fipray.ray.fsdp`), every rank on the path's own batches (the unsharded
    path); every rank checkpoints its own optimizer shard, as `rank<r>/checkpoint.pt` of one Train checkpoint.
    """
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from fipray.config import from_dict
    from fipray.path import run_path
    from fipray.ray.fsdp import full_flat, gather, shard_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg = from_dict(config["cfg"])
    k, fsdp = config["k"], config["parallel"] == "fsdp"
    # Each rank keeps its checkpoint in a private folder, handed to Train (which persists it in the run's
    # storage and hands it back to every rank of a restarted group): rank 0's, or with FSDP every rank's.
    parent = Path(tempfile.mkdtemp(prefix=f"fipray-path{k}-rank{rank}-"))
    local = parent / f"rank{rank}" if fsdp else parent
    local.mkdir(exist_ok=True)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            shutil.copy(Path(d) / (f"rank{rank}/" if fsdp else "") / "checkpoint.pt", local / "checkpoint.pt")
    attempt = ray.get(config["collector"].start.remote(k, os.getpid())) if rank == 0 else 0
    st = open_storage(config["storage"])
    if rank == 0:
        st.write_json(f"{path_rel(k)}/worker.json", {**_placement(), "attempt": attempt})
    rep = Reporter(config["collector"], k, config["every_s"], enabled=rank == 0)

    def callback(event: str, payload: dict) -> None:
        rep(event, payload)
        if event == "checkpoint":  # every rank reports (a collective); rank 0 (FSDP: each rank) brings files
            ckpt = Checkpoint.from_directory(str(parent)) if rank == 0 or fsdp else None
            ray.train.report({"global_step": payload["global_step"]}, checkpoint=ckpt)

    device = ray.train.torch.get_device() if cfg.device.startswith("cuda") else torch.device(cfg.device)
    wrap: Any
    if fsdp:  # the path's own data on every rank; the network sharded
        data_rank, data_world, wrap = 0, 1, shard_model
    else:
        data_rank, data_world, wrap = rank, world, (ray.train.torch.prepare_model if world > 1 else None)
    with Workspace(st, path_rel(k), fetch=False) as ws:
        job = build_path(cfg, k, ws.input_file(BASE_REL), device=device, rank=data_rank, world=data_world,
                         wrap=wrap)
        kwargs = {**job.kwargs, **({"weights": full_flat} if fsdp and "weights" not in job.kwargs else {})}
        try:
            res = run_path(job.model, job.phases, out_dir=local, callback=callback, **kwargs)
        except RuntimeError as e:
            if fsdp and "DTensor" in str(e):
                raise RuntimeError(f"ray.parallel: fsdp: operation {cfg.operation!r} changes parameters in place, "
                                   f"which sharded parameters do not support; use ray.parallel: ddp ({e})") from e
            raise
        rep.flush()
        res.model = gather(res.model)  # FSDP: a collective on every rank; otherwise the model itself
        if rank == 0:
            write_path_outputs(ws.dir, k, job, res, extra={"attempts": attempt, "backend": "train", "world": world,
                                                           "parallel": config["parallel"]})
            ws.push(last=["result.json"])
    shutil.rmtree(parent, ignore_errors=True)


def _train_path(cfg_dict: dict, k: int, storage_uri: str, collector: Any, job_ray: dict, run_name: str,
                threads: int) -> dict:
    """Drives one path's TorchTrainer (a zero-CPU task, so drivers never hold the CPUs workers need)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    st = open_storage(storage_uri)
    gpus = float(job_ray["gpus_per_path"])
    res = {"CPU": float(job_ray["cpus_per_path"]), **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg_dict, "k": k, "storage": storage_uri, "parallel": job_ray["parallel"],
                           "collector": collector, "threads": threads, "every_s": job_ray["report_every_s"]},
        scaling_config=ScalingConfig(num_workers=int(job_ray["workers_per_path"]), use_gpu=gpus > 0,
                                     resources_per_worker=res),
        # Train keeps the path's checkpoints in the same storage (a URI's filesystem handed over as is).
        run_config=RunConfig(name=run_name, storage_path=st.path("train"), storage_filesystem=st.fs,
                             failure_config=FailureConfig(max_failures=int(job_ray["max_failures"])),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()
    return st.read_json(f"{path_rel(k)}/result.json")


def run_storage(job: JobConfig, out: Path) -> Storage:
    """The run's storage: `ray.storage_path` (a folder or a URI), or `<out>/storage` when it is empty."""
    sp = job.ray.storage_path
    return open_storage(sp if sp else out / "storage", "ray.storage_path")


def joined_cluster(address: str | None) -> bool:
    """Is this run on a cluster someone else started (which an autoscaler may still grow)?"""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def _check_here(storage_uri: str) -> str | None:
    try:
        check_storage(open_storage(storage_uri))
        return None
    except ConfigError as e:
        return str(e)


def check_storage_on_nodes(st: Storage) -> None:
    """Prove every node alive now can write storage (its credentials, its mounts), before any work.

    The driver's own check (`check_storage`) says nothing of the workers: a worker node without the
    bucket's role, or without the shared folder mounted, would fail only when its first path checkpoints.

    Raises:
        ConfigError: naming the nodes that cannot, and why.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(_check_here)
    refs = {f"{n['NodeManagerAddress']} {n['NodeID'][:8]}": task.options(
        num_cpus=0, max_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)).remote(st.uri)
        for n in ray.nodes() if n.get("Alive")}
    errors = {where: err for where, err in zip(refs, ray.get(list(refs.values()))) if err}
    if errors:
        raise ConfigError("; ".join(f"node {where}: {err}" for where, err in sorted(errors.items())))


def check_resources(job: JobConfig, what: str = "path", *, strict: bool = True) -> None:
    """Fail before any work when one path (all its ranks) can never be placed on this cluster.

    On a joined cluster (`strict=False`) an autoscaler may add the nodes later, so a shortfall is only
    printed as a warning; on the local Ray started for this run it is an error.
    """
    try:
        _check_resources(job, what)
    except ConfigError as e:
        if strict:
            raise
        import sys

        print(f"fipray: warning: {e} (waiting for the cluster's autoscaler, if it has one)", file=sys.stderr)


def _check_resources(job: JobConfig, what: str) -> None:
    rc = job.ray
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    per_rank = {"CPU": rc.cpus_per_path, **({"GPU": rc.gpus_per_path} if rc.gpus_per_path else {})}
    for r, v in per_rank.items():
        if not any(n.get(r, 0) >= v for n in nodes):
            raise ConfigError(f"one {what} rank needs {v:g} {r} on one node, but no node of this cluster has that "
                              f"(cluster: {', '.join(f'{k} {v:g}' for k, v in total.items() if k in ('CPU', 'GPU'))})")
        need = v * rc.workers_per_path
        if total.get(r, 0) < need:
            raise ConfigError(f"one {what} needs {rc.workers_per_path} workers x {v:g} {r} = {need:g} {r}, but the "
                              f"cluster has {total.get(r, 0):g} {r}: lower ray.workers_per_path or ray.{r.lower()}s_per_path")


def _members(out_paths: list[tuple[int, Path, dict]], spec: dict, seed: int) -> tuple[list, dict]:
    members: list = []
    meta: dict[str, list[int]] = {"path_ids": [], "steps": [], "seeds": []}
    for k, d, res in out_paths:
        states = load_samples(d) or [load_final(d)]
        steps = [s["global_step"] for s in res["samples"]] or [res["steps"]]
        for st, step in zip(states, steps):
            m = build_model(spec, seed, torch.device("cpu"))
            m.load_state_dict(st)
            members.append(m.eval())
            meta["path_ids"].append(k)
            meta["steps"].append(step)
            meta["seeds"].append(res["seed"])
    return members, meta


def merge(job: JobConfig, out: Path, st: Storage, results: list[dict]) -> dict:
    """The merged path table and ensemble folder from the paths' folders in storage.

    From an object store the paths' outputs (not their checkpoints) are first copied to a private local
    folder; the merged outputs go to `out` and, from an object store, also to `<storage>/merged/`.
    """
    if st.local is not None:
        return _merge(job, out, st.local, results)
    with tempfile.TemporaryDirectory(prefix="fipray-merge-") as d:
        mirror = Path(d)
        st.download_file(f"{BASE_DIR}/spec.json", mirror / BASE_DIR / "spec.json")
        for r in results:
            rel = path_rel(r["path"])
            for n in st.files(rel):
                if n != "checkpoint.pt" and n != "worker.json":
                    st.download_file(f"{rel}/{n}", mirror / rel / n)
        return _merge(job, out, mirror, results)


def _merge(job: JobConfig, out: Path, storage: Path, results: list[dict]) -> dict:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fipray.ensemble import save_ensemble

    cfg = job.cfg
    dirs = [(r["path"], storage / path_rel(r["path"]), r) for r in results]
    tables = [pq.read_table(d / "records.parquet") for _, d, _ in dirs if (d / "records.parquet").is_file()]
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    write_parquet(out / "path.parquet", table)
    spec = json.loads((storage / "base" / "spec.json").read_text())
    members, meta = _members(dirs, spec, int(cfg.seeds[0]))
    # Text members: the tokenizer that made the data (else save_ensemble takes the members' pretrained_dir's).
    tokenizer = cfg.data.kwargs.get("tokenizer")
    save_ensemble(members, out / "ensemble", model_spec=spec, tokenizer=tokenizer, metadata={
        "operation": cfg.operation, "config_hash": cfg.run_id(), "num_paths": len(results),
        "source": "fipray paths: the sampled networks of every path (the final network where a path samples none)",
        **meta})
    return {"rows": table.num_rows, "members": len(members)}


def run_paths(job: JobConfig, out: str | Path, *, progress: bool = True, address: str | None = None,
              num_cpus: int | None = None, temp_dir: str | None = None) -> dict:
    """Run `job.ray.num_paths` FIP paths on Ray and merge them into `out`. Returns the summary.

    Starts a private local Ray (all the machine's CPUs unless `num_cpus`) when no cluster is named by
    `address` or RAY_ADDRESS, and joins the running one otherwise (or uses Ray if already initialised).
    """
    cfg = job.cfg
    path_operation(cfg)  # an operation without FIP paths fails before Ray starts
    out = Path(out).resolve()
    storage = run_storage(job, out)  # a bad URI fails here
    prepare_out(cfg, out)  # fails on an unwritable --out
    check_storage(storage)  # no credentials, unreachable endpoint, no bucket, read-only: before any work
    atomic_write_text(out / "job.yaml", __import__("yaml").safe_dump(job.to_dict(), sort_keys=False))
    t0 = time.perf_counter()
    started = not ray.is_initialized()
    quiet_ray()
    init_local(num_cpus=num_cpus, address=address, temp_dir=temp_dir, logging_level=logging.ERROR)
    ray_start = time.perf_counter() - t0
    try:
        check_resources(job, strict=not joined_cluster(address))
        check_storage_on_nodes(storage)
        return _run(job, out, storage, progress=progress, ray_start=ray_start, t0=t0)
    finally:
        if started:
            ray.shutdown()


def _run(job: JobConfig, out: Path, storage: Storage, *, progress: bool, ray_start: float, t0: float) -> dict:
    """Train w0 if needed, run every path to completion, merge them, and write the summary and report."""
    cfg, rc = job.cfg, job.ray
    P, threads, cfg_dict = rc.num_paths, _threads(job), cfg.to_dict()
    _prepare_storage(job, storage, cfg_dict, threads)
    collector = _collector()
    t_launch = time.perf_counter()
    refs = _launch_paths(job, storage, collector, cfg_dict, threads)
    results = _wait_for_paths(refs, collector, total=P * path_steps(cfg),
                              desc=f"{P} {cfg.operation} paths ({rc.backend})", progress=progress)
    paths_seconds = time.perf_counter() - t_launch
    ordered = [results[k] for k in range(P)]
    snap = ray.get(collector.snapshot.remote())
    merged = merge(job, out, storage, ordered)
    streamed = _dedup_check(snap["rows"], out / "path.parquet")
    summary = {
        "operation": cfg.operation, "backend": rc.backend, "num_paths": P, "seeds": [r["seed"] for r in ordered],
        "workers_per_path": rc.workers_per_path, "seconds": time.perf_counter() - t0,
        "ray_start_seconds": ray_start, "paths_seconds": paths_seconds, "storage": storage.display(),
        "ensemble": str(out / "ensemble"), "nodes": len({r.get("node") for r in ordered if r.get("node")}),
        "ensemble_members": merged["members"], "path_rows": merged["rows"],
        "streamed_rows": len(snap["rows"]), "streamed_duplicates_dropped": snap["duplicates"],
        "streamed_rows_match_table": streamed,
        "paths": [{k: r[k] for k in ("path", "seed", "steps", "seconds", "resumed_from", "attempts", "world",
                                     "records", "final", "node", "gpu_ids", "device", "parallel") if k in r} for r in ordered],
        "config_hash": cfg.run_id(),
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", _report(job, ordered, merged))
    if storage.local is None:
        storage.upload_dir(out, "merged", last=["summary.json"])
    return summary


def _collector() -> Any:
    """The row collector, pinned to the driver's node: a node lost mid-run never takes the rows with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return Collector.options(  # type: ignore[attr-defined]
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()


def _per_rank(rc: Any) -> dict:
    """Ray task options asking for one rank's CPUs and GPUs."""
    return {"num_cpus": rc.cpus_per_path, "num_gpus": rc.gpus_per_path}


def _prepare_storage(job: JobConfig, st: Storage, cfg_dict: dict, threads: int) -> None:
    """Claim storage for this config and train w0 there unless a previous run already did.

    Raises:
        ConfigError: storage holds the checkpoints of another config, which resuming would mix in.
    """
    import yaml

    from fipray.config import from_dict

    cfg, rc = job.cfg, job.ray
    if st.is_file("config.yaml"):  # resuming: the checkpoints there must be this config's
        old = from_dict(yaml.safe_load(st.read_text("config.yaml")))
        if old.run_id() != cfg.run_id():
            raise ConfigError(f"storage {st.display()!r} holds paths of another config (run id {old.run_id()}, "
                              f"this one {cfg.run_id()}): use another --out or ray.storage_path")
    if st.local is not None:
        save_config(cfg, st.local / "config.yaml")
    else:
        st.write_text("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if not st.is_file(BASE_REL):
        ray.get(ray.remote(_base_task).options(**_per_rank(rc), max_retries=rc.max_failures)
                .remote(cfg_dict, st.uri, threads))


def _launch_paths(job: JobConfig, st: Storage, collector: Any, cfg_dict: dict, threads: int) -> dict:
    """Start one unit per path (a worker task or a TorchTrainer driver); returns {object ref: path index}.

    A worker task is retried (`ray.max_failures` times) when its process or its node dies: the retry may
    land on any node and resumes from the path's checkpoint in storage.
    """
    cfg, rc = job.cfg, job.ray
    refs = {}
    for k in range(rc.num_paths):
        if rc.backend == "worker":
            wtask = ray.remote(_worker_path).options(**_per_rank(rc), max_retries=rc.max_failures,
                                                      retry_exceptions=False)
            refs[wtask.remote(cfg_dict, k, st.uri, collector, threads, rc.report_every_s)] = k
        else:
            ttask = ray.remote(_train_path).options(num_cpus=0, max_retries=0)
            refs[ttask.remote(cfg_dict, k, st.uri, collector, _dict(rc), f"{cfg.run_id()}-path{k}", threads)] = k
    return refs


def _wait_for_paths(refs: dict, collector: Any, *, total: int, desc: str, progress: bool) -> dict[int, dict]:
    """Wait for every path, moving a progress bar by the steps the collector has heard of.

    A finished path counts with its final step count, which the collector may not have received yet.
    Returns {path index: that path's result}.
    """
    from tqdm.auto import tqdm

    results: dict[int, dict] = {}
    with tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            for ref in done:
                results[refs[ref]] = ray.get(ref)
            steps = ray.get(collector.progress.remote())
            for k, r in results.items():
                steps[k] = r["steps"]
            n = min(total, sum(steps.values()))
            if n != bar.n:
                bar.update(n - bar.n)
    return results


def _report(job: JobConfig, ordered: list[dict], merged: dict) -> str:
    """`report.md`: one table row per path, then where the merged table and ensemble are."""
    cfg, rc = job.cfg, job.ray
    lines = [f"# {rc.num_paths} FIP paths: {cfg.operation}, backend {rc.backend}", "",
             "| path | seed | steps | seconds | attempts | resumed from |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['seed']} | {r['steps']} | {r['seconds']:.1f} | {r.get('attempts', 1)} | "
              f"{r['resumed_from']} |" for r in ordered]
    lines += ["", f"Merged path table: `path.parquet` ({merged['rows']} rows, column `path`). Ensemble of "
              f"{merged['members']} networks: `ensemble/` (fipray.ensemble.load_ensemble).", ""]
    return "\n".join(lines)


def _dict(rc: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(rc)


def _dedup_check(rows: list[dict], table_file: Path) -> bool:
    """Do the streamed rows (after dropping re-sent ones) hold exactly the merged table's keys?"""
    import pyarrow.parquet as pq

    t = pq.read_table(table_file).to_pylist() if table_file.is_file() else []
    return sorted(_key(r["path"], r) for r in rows) == sorted(_key(r["path"], r) for r in t)
