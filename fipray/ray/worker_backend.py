"""The plain Ray tasks of a `fipray paths` run: w0 (for either backend) and `backend: worker`'s path.

    base_task(cfg_dict, storage_uri, threads) -> where w0 is      # trains w0 into <storage>/base/
    worker_path(cfg_dict, k, storage_uri, collector, threads, every_s) -> path k's result

The driver (`fipray.ray.paths`) runs them with `ray.remote(...).options(...)`; a worker task retried
after its process or node died resumes from the path's checkpoint in storage.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch

from fipray.ray.cluster import placement, worker_device
from fipray.ray.layout import BASE_REL, path_rel
from fipray.ray.progress import Reporter
from fipray.ray.storage import Workspace, open_storage
from fipray.units import BASE_DIR, BASE_FILE, run_one_path, train_shared_base


def base_task(cfg_dict: dict, storage_uri: str, threads: int) -> str:
    """w0 into `<storage>/base/` (on an object store: trained here, then put with model.safetensors last)."""
    from fipray.config import from_dict

    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    st = open_storage(storage_uri)
    device = worker_device(cfg.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    with _base_data(cfg) as bundle:
        if st.local is not None:
            train_shared_base(cfg, st.local, device=device, bundle=bundle)
        else:
            with tempfile.TemporaryDirectory(prefix="fipray-base-") as d:
                train_shared_base(cfg, d, device=device, bundle=bundle)
                st.upload_dir(Path(d) / BASE_DIR, BASE_DIR, last=[BASE_FILE])
    return st.display(BASE_REL)


@contextlib.contextmanager
def _base_data(cfg: Any) -> Iterator[Any]:
    """`data.engine: ray`: w0's data read by Ray Data as the paths read theirs (this task iterates the dataset
    once into a private on-disk copy ordered by row index); otherwise None (the config's own loader)."""
    if cfg.data.engine != "ray":
        yield None
        return
    from fipray.ray.data import Materialised, iter_rows, train_dataset

    mat = Materialised(cfg, iter_rows(train_dataset(cfg)))
    try:
        yield mat.bundle()
    finally:
        mat.close()


def worker_path(cfg_dict: dict, k: int, storage_uri: str, collector: Any, threads: int, every_s: float) -> dict:
    """Backend `worker`: path k's core loop in this Ray worker process, its folder in storage."""
    from fipray.config import from_dict
    from fipray.ray.data import check_engine

    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    check_engine(cfg, "worker")
    attempt = ray.get(collector.start.remote(k, os.getpid()))
    st = open_storage(storage_uri)
    place = placement()
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
