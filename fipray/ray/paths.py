"""`fipray paths`: P FIP paths at once on Ray, each its own unit of scheduling and of failure.

    run_paths(job, out) -> summary

1. check everything that can be checked before work starts (paths, storage, resources);
2. train the shared base network w0 once (a Ray task), into `<storage>/base/`;
3. launch one unit per path: `backend: worker` runs the core loop in a Ray task (retried in a fresh
   process when its process dies, resuming from the path's checkpoint); `backend: train` runs a
   `TorchTrainer` per path (DDP over `workers_per_path` ranks, Train's FailureConfig and checkpoint
   restore). Ranks of one trainer fail together, so paths never share a trainer (RAY_NOTES.md);
4. merge: the record rows of every path into `<out>/path.parquet` (column `path`), the sampled networks
   of every path into one ensemble folder `<out>/ensemble/` (`fipray.ensemble_folder.load_ensemble`).

Storage (`ray.storage_path`, default `<out>/storage`) is a folder every node sees or a `s3://`, `gs://`,
`file://` URI (`fipray.ray.storage`): on an object store each path runs in a staging folder on its node,
pushes its checkpoint (and the samples it names) at every checkpoint and its outputs at the end, and a
path restarted on another node (its process or its whole node lost) starts from what storage holds. The
merged outputs are then also put under `<storage>/merged/`, so a cluster without a shared filesystem
still leaves them where every machine can read them.

Paths push their record rows to a collector actor at most every `ray.report_every_s` seconds (and at
each checkpoint); rows re-sent by a restarted path are dropped by key (path, phase, phase_step), so the
driver's progress display and the merged table never count a row twice.

This module is the driver (checks, w0, launch, wait, merge, summary). What it drives lives beside it:
`fipray.ray.cluster` (quiet Ray, worker devices, resource and storage checks; shared with `fipray sweep`),
`fipray.ray.layout` (where things are in storage), `fipray.ray.progress` (the collector and each path's
reporter), `fipray.ray.worker_backend` (the w0 task and `backend: worker`'s path task) and
`fipray.ray.train_backend` (`backend: train`: a TorchTrainer per path and its per-rank loop).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from fipray.atomic import atomic_write_json, atomic_write_text, write_parquet
from fipray.config import ConfigError, save_config
from fipray.job import JobConfig
from fipray.ray.cluster import check_resources, check_storage_on_nodes, joined_cluster, quiet_ray
from fipray.ray.data import check_engine
from fipray.ray.layout import BASE_REL, path_rel, run_storage
from fipray.ray.local import init_local
from fipray.ray.progress import row_key, start_collector
from fipray.ray.storage import Storage, check_storage
from fipray.ray.train_backend import train_path
from fipray.ray.worker_backend import base_task, worker_path
from fipray.runtime import build_model, prepare_out
from fipray.units import BASE_DIR, load_final, load_samples, path_operation, path_steps


def _threads(job: JobConfig) -> int:
    return job.cfg.threads or max(1, int(job.ray.cpus_per_path))


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

    from fipray.ensemble_folder import save_ensemble

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
    check_engine(cfg, job.ray.backend)  # data.engine: ray needs ray.backend: train and a parquet training split
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
    collector = start_collector()
    t_launch = time.perf_counter()
    refs = _launch_paths(job, storage, collector, cfg_dict, threads)
    results = _wait_for_paths(refs, collector, total=P * path_steps(cfg),
                              desc=f"{P} {cfg.operation} paths ({rc.backend})", progress=progress)
    paths_seconds = time.perf_counter() - t_launch
    ordered = [results[k] for k in range(P)]
    snap = ray.get(collector.snapshot.remote())
    merged = merge(job, out, storage, ordered)
    streamed, restored = _dedup_check(snap["rows"], out / "path.parquet", ordered)
    summary = {
        "operation": cfg.operation, "backend": rc.backend, "num_paths": P, "seeds": [r["seed"] for r in ordered],
        "workers_per_path": rc.workers_per_path, "seconds": time.perf_counter() - t0,
        "ray_start_seconds": ray_start, "paths_seconds": paths_seconds, "storage": storage.display(),
        "ensemble": str(out / "ensemble"), "nodes": len({r.get("node") for r in ordered if r.get("node")}),
        "ensemble_members": merged["members"], "path_rows": merged["rows"],
        "streamed_rows": len(snap["rows"]), "streamed_duplicates_dropped": snap["duplicates"],
        "streamed_rows_match_table": streamed, "restored_rows": restored,
        "paths": [{k: r[k] for k in ("path", "seed", "steps", "seconds", "resumed_from", "attempts", "world",
                                     "records", "final", "node", "gpu_ids", "device", "parallel") if k in r} for r in ordered],
        "config_hash": cfg.run_id(),
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", _report(job, ordered, merged))
    if storage.local is None:
        storage.upload_dir(out, "merged", last=["summary.json"])
    return summary


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
        ray.get(ray.remote(base_task).options(**_per_rank(rc), max_retries=rc.max_failures)
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
            wtask = ray.remote(worker_path).options(**_per_rank(rc), max_retries=rc.max_failures,
                                                      retry_exceptions=False)
            refs[wtask.remote(cfg_dict, k, st.uri, collector, threads, rc.report_every_s)] = k
        else:
            ttask = ray.remote(train_path).options(num_cpus=0, max_retries=0)
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
              f"{merged['members']} networks: `ensemble/` (fipray.ensemble_folder.load_ensemble).", ""]
    return "\n".join(lines)


def _dict(rc: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(rc)


def _dedup_check(rows: list[dict], table_file: Path, results: list[dict]) -> tuple[bool, int]:
    """Do the streamed rows (after dropping re-sent ones) hold exactly the merged table's keys?

    A path resumed by this driver from a checkpoint an earlier driver left (that driver killed, its collector
    gone) never streams the rows the checkpoint restored: those, and only those (step <= the path's
    `resumed_from`), may be missing from the stream. Returns (match, how many table rows were restored so).
    """
    import pyarrow.parquet as pq

    t = pq.read_table(table_file).to_pylist() if table_file.is_file() else []
    streamed = {row_key(r["path"], r) for r in rows}
    table = {row_key(r["path"], r): r for r in t}
    resumed = {r["path"]: r.get("resumed_from") or 0 for r in results}
    missing = [r for key, r in table.items() if key not in streamed]
    ok = streamed <= table.keys() and len(table) == len(t)
    return ok and all(r["step"] <= resumed.get(r["path"], 0) for r in missing), len(missing)
