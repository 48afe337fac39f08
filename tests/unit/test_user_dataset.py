"""A user's own torch Dataset goes through every operation via the Python API."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from fipray.config import load_config
from fipray.data import DataBundle
from fipray.experiments import run_experiment


class Blobs(Dataset):
    """Four Gaussian blobs in 6-d, values squashed into [0, 1]; not a TensorDataset."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 4
        centers = torch.eye(4, 6) * 3.0
        self.x = torch.sigmoid(centers[self.y] + 0.5 * torch.randn(n, 6, generator=g))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    return DataBundle(Blobs(160, 0), Blobs(80, 1), num_classes=4, input_shape=(6,))


COMMON = ["seeds=[0]", "threads=1", "model.name=mlp", "model.kwargs={hidden: [16]}", "train.steps=60",
          "path.steps=20", "path.record_every=10", "path.checkpoint_every=10"]


def test_continual_on_user_dataset(tmp_path, bundle):
    cfg = load_config(None, [*COMMON, "operation=continual", "continual.num_tasks=2",
                             "continual.memory_per_task=4", "continual.baselines=[er]"])
    s = run_experiment(cfg, tmp_path, progress=False, bundle=bundle)
    assert 0.0 <= s["methods"]["fip"]["acc_mean"] <= 1.0 and "er" in s["methods"]
    assert json.loads((tmp_path / "summary.json").read_text())["num_tasks"] == 2


def test_sparsify_on_user_dataset(tmp_path, bundle):
    cfg = load_config(None, [*COMMON, "operation=sparsify", "sparsify.targets=[0.7]",
                             "sparsify.invariance_steps=5", "sparsify.baselines=[magnitude]"])
    s = run_experiment(cfg, tmp_path, progress=False, bundle=bundle)
    assert abs(s["methods"]["fip"]["0.7"]["sparsity"] - 0.7) <= 0.001


def test_ensemble_on_user_dataset(tmp_path, bundle):
    cfg = load_config(None, [*COMMON, "operation=ensemble", "ensemble.members=2", "ensemble.sample_every=5",
                             "ensemble.eps=[0.1]", "ensemble.pgd_steps=2", "ensemble.eval_examples=16",
                             "ensemble.baselines=[base]"])
    s = run_experiment(cfg, tmp_path, progress=False, bundle=bundle)
    assert set(s["methods"]) == {"fip", "base"} and "0.1" in s["methods"]["fip"]["whitebox"]
