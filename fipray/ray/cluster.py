"""Cluster plumbing that `fipray paths` and `fipray sweep` share: a quiet Ray, where a worker runs, checks before work.

    quiet_ray()                                   # Ray's console noise out of the user's way
    worker_device(cfg.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    placement()                                   # pid, node, host, GPUs of this worker (worker.json)
    joined_cluster(address)                       # a cluster someone else started?
    check_resources(job, strict=...)              # one path (all its ranks) can be placed
    check_storage_on_nodes(storage)               # every alive node can write storage

Starting or joining Ray itself is `fipray.ray.local.init_local`.
"""

from __future__ import annotations

import logging
import os
import time

import ray

from fipray.config import ConfigError
from fipray.job import JobConfig
from fipray.ray.storage import Storage, check_storage, open_storage


def quiet_ray() -> None:
    """Keep Ray's console noise out of the user's way: one progress display per run is what they see."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 the legacy reporter prints nothing
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/TensorBoard/JSON per trial
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


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


def placement() -> dict:
    """Where this worker runs and on what Ray gave it (worker.json; what placement tests read)."""
    import socket

    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "node": ctx.get_node_id(), "host": socket.gethostname(), "started_at": time.time(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


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
