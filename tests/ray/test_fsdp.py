"""`ray.parallel: fsdp`: one FIP path's network sharded over 2 gloo CPU ranks of a TorchTrainer (FSDP2).

Every rank follows the path's own batches, so the sharded path must be the unsharded path: the same
final weights and record rows (within 1e-6) as `run_one_path` in this process without Ray or sharding.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fipray.config import ConfigError
from fipray.job import job_from_dict

pytestmark = pytest.mark.ray

DIGITS = {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}}


def _job(**over):
    base = {"operation": "continual", "seeds": [0], "threads": 1, "data": DIGITS,
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 40},
            "path": {"lam": 10.0, "steps": 60, "record_every": 20, "checkpoint_every": 30},
            "continual": {"num_tasks": 2, "memory_per_task": 10},
            "ray": {"backend": "train", "num_paths": 1, "workers_per_path": 2, "parallel": "fsdp",
                    "report_every_s": 0.2}}
    return job_from_dict(base, over)


@pytest.mark.heavy
def test_fsdp_path_on_two_ranks_equals_the_unsharded_path(ray_2cpus, tmp_path):
    from fipray.ray.paths import run_paths
    from fipray.units import base_path, load_final, run_one_path

    job = _job()
    s = run_paths(job, tmp_path / "out", progress=False)
    (p,) = s["paths"]
    assert p["world"] == 2 and p["parallel"] == "fsdp" and p["steps"] == 60
    storage = Path(s["storage"])
    run_one_path(job.cfg, 0, base_path(storage), tmp_path / "ref")  # unsharded, no Ray
    got, ref = load_final(storage / "paths" / "path0"), load_final(tmp_path / "ref")
    assert got.keys() == ref.keys()
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-6
    rows = pq.read_table(tmp_path / "out" / "path.parquet").to_pylist()
    ref_rows = pq.read_table(tmp_path / "ref" / "records.parquet").to_pylist()
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] and rows
    for a, b in zip(rows, ref_rows):
        for key in ("objective", "weight_distance", "heldout_distance"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a[key], b[key])
    assert rows[-1]["weight_distance"] > 0.1  # the path moved: the comparison is not vacuous
    # Train kept one checkpoint holding both ranks' shards of the optimizer state.
    ckpts = sorted(q.relative_to(storage / "train").parts[-2] for q in (storage / "train").rglob("checkpoint.pt"))
    assert ckpts == ["rank0", "rank1"]


def test_fsdp_needs_the_train_backend():
    with pytest.raises(ConfigError, match="'ray.parallel': fsdp needs ray.backend: train"):
        _job(**{"ray.backend": "worker", "ray.workers_per_path": 1})
