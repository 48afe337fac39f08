"""`backend: train` of `fipray paths`: one `TorchTrainer` per path, and the loop each of its ranks runs.

    train_path(cfg_dict, k, storage_uri, collector, job_ray, run_name, threads) -> path k's result

`train_path` runs in a zero-CPU Ray task started by the driver (`fipray.ray.paths`); Train restarts the
path's ranks together from their last checkpoint (FailureConfig), so paths never share a trainer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fipray.ray.cluster import placement
from fipray.ray.data import worker_bundle
from fipray.ray.layout import BASE_REL, path_rel
from fipray.ray.progress import Reporter
from fipray.ray.storage import Workspace, open_storage
from fipray.units import build_path, write_path_outputs


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
        st.write_json(f"{path_rel(k)}/worker.json", {**placement(), "attempt": attempt})
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
    with Workspace(st, path_rel(k), fetch=False) as ws, worker_bundle(cfg) as bundle:
        job = build_path(cfg, k, ws.input_file(BASE_REL), device=device, rank=data_rank, world=data_world,
                         wrap=wrap, bundle=bundle)
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


def train_path(cfg_dict: dict, k: int, storage_uri: str, collector: Any, job_ray: dict, run_name: str,
               threads: int) -> dict:
    """Drives one path's TorchTrainer (a zero-CPU task, so drivers never hold the CPUs workers need)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fipray.config import from_dict
    from fipray.ray.data import check_engine, train_dataset

    cfg = from_dict(cfg_dict)
    check_engine(cfg, "train")
    # data.engine: ray: the training split as a Ray Dataset, every rank given all of it (datasets_to_split=[]).
    data: dict[str, Any] = {"datasets": {"train": train_dataset(cfg)}, "dataset_config": DataConfig(datasets_to_split=[])} \
        if cfg.data.engine == "ray" else {}
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
        **data,
    )
    trainer.fit()
    return st.read_json(f"{path_rel(k)}/result.json")
