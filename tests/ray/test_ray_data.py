"""`data.engine: ray`: the training split read and preprocessed by Ray Data, from an S3 bucket (moto on 127.0.0.1).

- refused configs fail before Ray starts, in one line naming `data.engine`;
- the split Ray Data delivers (materialised in row-index order) is exactly the `parquet` loader's (local engine);
- `fipray paths` with `data.engine: ray`, `ray.backend: train`, 2 paths: path 0's worker killed mid-run resumes,
  and its records and final weights equal an uninterrupted local-engine run of the same path.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from fipray.config import ConfigError
from fipray.job import job_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from _moto import moto_s3  # noqa: E402
from test_storage_s3 import run_paths_killing_path0  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


def _digits_parquet(folder: Path) -> None:
    """sklearn digits as train/test Parquet files: 64 pixel columns and `label` (train in row groups of 300)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    cols = {f"p{i}": x[:, i] for i in range(64)}
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({**{k: v[:1400] for k, v in cols.items()}, "label": y[:1400]}),
                   folder / "train.parquet", row_group_size=300)
    pq.write_table(pa.table({**{k: v[1400:] for k, v in cols.items()}, "label": y[1400:]}), folder / "test.parquet")


def _upload(s3: dict, folder: Path, prefix: str) -> dict:
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{s3['endpoint']}")
    for name in ("train", "test"):
        client.upload_file(str(folder / f"{name}.parquet"), "fipray-test", f"{prefix}/{name}.parquet")
    return {n: s3["uri"](f"{prefix}/{n}.parquet") for n in ("train", "test")}


def _data(files: dict, engine: str, cache: Path) -> dict:
    return {"name": "parquet", "engine": engine, "cache_dir": str(cache),
            "kwargs": {**files, "input_shape": [1, 8, 8], "scale": 16.0}}


def _config(data: dict, **ray_keys) -> dict:
    return {"operation": "undirected", "seeds": [0], "threads": 1, "data": data,
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 100},
            "path": {"lam": 1.0, "beta": 0.0, "steps": 2000, "memory_batch_size": 64, "record_every": 50,
                     "checkpoint_every": 200, "heldout": 64},
            "ensemble": {"members": 2, "sample_every": 1000},
            "ray": {"num_paths": 2, "report_every_s": 0.2, "backend": "train", **ray_keys}}


@pytest.mark.ray
def test_refused_configs_name_data_engine(tmp_path):
    from fipray.ray.paths import run_paths

    local = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    cases = [(_config(_data(local, "ray", tmp_path), backend="worker"), "needs ray.backend: train"),
             (_config({"name": "digits", "engine": "ray"}), "data.name: digits")]
    for cfg, words in cases:
        with pytest.raises(ConfigError) as e:
            run_paths(job_from_dict(cfg), tmp_path / "out", progress=False)
        msg = str(e.value)
        assert "'data.engine'" in msg and words in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()  # refused before any output or Ray


@pytest.fixture(scope="module")
def fresh_ray(s3):
    """Ray Data's read tasks reach the bucket with the AWS_* variables of the Ray they run in: a tier Ray started
    by an earlier module (without them) is stopped, so that `ray_2cpus` starts one with them set."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.heavy  # ~35 s with its own Ray start; README's tier keeps the refusals, the heavy kill test the numbers
def test_ray_engine_delivers_the_local_engines_split(s3, fresh_ray, ray_2cpus, tmp_path):
    """Read from the bucket by Ray Data (5 row groups, streamed in no set order), materialised by row index:
    the same tensors, classes and shape as the `parquet` loader on the same files."""
    from fipray.ray.data import Materialised, iter_rows, train_dataset
    from fipray.runtime import load_bundle

    _digits_parquet(tmp_path / "d")
    cfg = job_from_dict(_config(_data(_upload(s3, tmp_path / "d", "unit"), "ray", tmp_path / "cache"))).cfg
    local = load_bundle(job_from_dict(_config(_data({n: str(tmp_path / "d" / f"{n}.parquet") for n in ("train", "test")},
                                                    "local", tmp_path / "cache"))).cfg)
    mat = Materialised(cfg, iter_rows(train_dataset(cfg)), where=tmp_path)
    try:
        got = mat.bundle()
        assert got.num_classes == local.num_classes and got.input_shape == local.input_shape == (1, 8, 8)
        for a, b in zip((*got.train.tensors, *got.test.tensors), (*local.train.tensors, *local.test.tensors)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert (mat.folder / "x.npy").is_file()  # on disk, memory-mapped
    finally:
        mat.close()
    assert not mat.folder.exists()


def _train_checkpointed(st) -> bool:
    """backend train: Train keeps the path's checkpoints under <storage>/train/<run id>-path0/checkpoint_*/."""
    saved = [n for n in st.files("train") if "-path0/" in n and n.endswith("checkpoint.pt")]
    if saved:  # Train registers a reported checkpoint a little later (reports every ~2 s; RAY_NOTES.md)
        time.sleep(3)
    return bool(saved)


@pytest.mark.ray
@pytest.mark.heavy
def test_fipray_paths_ray_engine_resumes_a_killed_path_bit_exactly(s3, tmp_path):
    """`fipray paths` with data.engine: ray (the training split read from the bucket by Ray Data), backend train,
    storage in the bucket: path 0's rank-0 worker is SIGKILLed once its checkpoint is in the bucket; Train
    restarts it from that checkpoint, and its records and final weights equal an uninterrupted local-engine run."""
    from safetensors.torch import load as load_safetensors

    from fipray.ray.storage import open_storage
    from fipray.units import load_final, run_one_path

    _digits_parquet(tmp_path / "d")
    files = _upload(s3, tmp_path / "d", "data")
    cfg = _config(_data(files, "ray", tmp_path / "cache"), max_failures=2)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    st = open_storage(s3["uri"]("runs/raydata"))
    run_paths_killing_path0(s3, st, tmp_path / "job.yaml", tmp_path / "out", _train_checkpointed, deadline_s=300,
                            finish_s=400)
    summary = st.read_json("merged/summary.json")
    by_path = {p["path"]: p for p in summary["paths"]}
    assert by_path[0]["attempts"] == 2 and by_path[0]["resumed_from"] and by_path[1]["attempts"] == 1
    rows = pq.read_table(io.BytesIO(st.read_bytes("merged/path.parquet"))).to_pylist()
    # The uninterrupted reference: path 0 in this process with the local engine on the same files.
    st.download_file("base/model.safetensors", tmp_path / "base" / "model.safetensors")
    ref_cfg = job_from_dict(_config(_data(files, "local", tmp_path / "cache"))).cfg
    ref = run_one_path(ref_cfg, 0, tmp_path / "base" / "model.safetensors", tmp_path / "ref0")
    ref_rows = pq.read_table(tmp_path / "ref0" / "records.parquet").to_pylist()
    got_rows = sorted((r for r in rows if r["path"] == 0), key=lambda r: r["step"])
    assert len(got_rows) == len(ref_rows) == ref["records"]
    for g, r in zip(got_rows, ref_rows):
        assert {k: g[k] for k in r if k not in ("seconds",)} == {k: r[k] for k in r if k not in ("seconds",)}
    got = load_safetensors(st.read_bytes("paths/path0/final.safetensors"))
    want = load_final(tmp_path / "ref0")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _sweep_job(data: dict, **over):
    base = {"operation": "continual", "seeds": [0], "threads": 1, "data": data,
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 40},
            "path": {"lam": 10.0, "steps": 20, "record_every": 10, "checkpoint_every": 20},
            "continual": {"num_tasks": 2, "memory_per_task": 10},
            "sweep": {"metric": "acc_mean", "num_samples": 1, "max_concurrent_trials": 1, "grace_period": 1,
                      "reduction_factor": 2, "include_base_config": False, "name": "t", "trainable": "train",
                      "search": {"path.lam": {"grid": [3.0]}}}}
    return job_from_dict(base, over)


def test_sweeps_refuse_the_ray_engine_without_train_trials(tmp_path):
    from fipray.ray.sweep import run_sweep

    local = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    for over, words in (({"sweep.trainable": "function"}, "needs sweep.trainable: train"),
                        ({"sweep.scheduler": "pbt"}, "sweep.scheduler: pbt")):
        with pytest.raises(ConfigError) as e:
            run_sweep(_sweep_job(_data(local, "ray", tmp_path), **over), tmp_path / "out", progress=False)
        assert "'data.engine'" in str(e.value) and words in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.heavy  # ~1 min: a Tune trial as a TorchTrainer whose split Ray Data reads from the bucket
def test_a_train_trainable_sweep_reads_its_split_with_ray_data(s3, fresh_ray, ray_2cpus, tmp_path, capsys):
    """`fipray sweep` with sweep.trainable: train and data.engine: ray: the trial's TorchTrainer worker gets the
    training split from Ray Data (materialised by row index) and reports what the same trial reports in-process
    on the same files read by the local engine."""
    from fipray.ray.sweep import run_sweep
    from fipray.units import run_trial

    _digits_parquet(tmp_path / "d")
    files = _upload(s3, tmp_path / "d", "sweep")
    with capsys.disabled():  # the Tune + Train driver hangs under pytest's capture (test_sweep.py)
        s = run_sweep(_sweep_job(_data(files, "ray", tmp_path / "cache")), tmp_path / "s", progress=False)
    rows = pq.read_table(tmp_path / "s" / "trials.parquet").to_pylist()
    assert s["num_trials"] == 1 and rows[0]["status"] == "completed", rows
    job = _sweep_job(_data(files, "local", tmp_path / "cache"), **{"path.lam": 3.0})
    got: list[dict] = []
    run_trial(job.cfg, got.append, **job.sweep.options())
    assert rows[0]["metric"] == got[-1]["acc_mean"], (rows[0], got[-1])
