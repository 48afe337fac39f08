"""Streamed data: batches from a DataLoader (workers, augmentation) stay a pure function of (seed, step).

The resume test kills a run with streamed data and 2 DataLoader workers mid-phase and checks the
resumed weights are bit-identical to the uninterrupted run's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fipray.config import ConfigError, load_config
from fipray.core.distances import get_distance
from fipray.data.batches import BatchStream
from fipray.data.stream import StreamedExamples, TensorExamples, build_transform
from fipray.path import run_path
from fipray.phases import fip_phase, supervised_phase
from fipray.runtime import build_model

SPEC = {"name": "small_cnn", "kwargs": {}, "num_classes": 10, "input_shape": [1, 8, 8]}
AUGMENT = build_transform([{"RandomCrop": {"size": 8, "padding": 1}}, {"RandomHorizontalFlip": {}}])


class Images(Dataset):
    """Digits as a plain map-style dataset (not a TensorDataset): items are loaded one by one."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i].clone(), int(self.y[i])


@pytest.fixture(scope="module")
def data(digits):
    from fipray.data import as_tensors

    x, y = as_tensors(digits.train)
    return x, y.long()


def test_tensor_examples_are_the_old_indexing(data):
    x, y = data
    src, ref = TensorExamples(x, y).batches(32, 7), BatchStream(len(x), 32, 7)
    for t in (0, 1, 40, 41):
        xb, yb = src.batch(t)
        assert torch.equal(xb, x[ref.indices(t)]) and torch.equal(yb, y[ref.indices(t)])


def test_streamed_batches_equal_in_memory_ones_and_augmentation_is_seeded(data):
    x, y = data
    plain = StreamedExamples(Images(x, y), torch.device("cpu"), workers=2).batches(32, 7)
    mem = TensorExamples(x, y).batches(32, 7)
    for t in (0, 3, 60):  # 60: a later epoch
        assert all(torch.equal(a, b) for a, b in zip(plain.batch(t), mem.batch(t)))
    aug = [StreamedExamples(Images(x, y), torch.device("cpu"), workers=w, train_transform=AUGMENT).batches(32, 7)
           for w in (0, 2)]
    for t in (0, 1, 2):
        a0, a2 = aug[0].batch(t)[0], aug[1].batch(t)[0]
        assert torch.equal(a0, a2)  # the same augmentation whichever worker (or none) loads the item
        assert not torch.equal(a0, mem.batch(t)[0])  # and it really augments
    # Asking for an earlier step (a resume) rebuilds the loader at that step.
    assert torch.equal(aug[1].batch(1)[0], aug[0].batch(1)[0])


def test_streamed_run_resumes_bit_identically_with_workers(data, tmp_path):
    x, y = data
    cfg = load_config(None, ["train.steps=12", "train.batch_size=32", "path.steps=12", "path.batch_size=32",
                             "path.memory_batch_size=48", "path.lr=0.003"])

    def phases():
        ex = StreamedExamples(Images(x, y), torch.device("cpu"), workers=2, train_transform=AUGMENT)
        mem = StreamedExamples(Images(x[:200], y[:200]), torch.device("cpu"), workers=0)
        return [supervised_phase("base", ex, None, cfg.train, 0),
                fip_phase("fip", cfg.path, 0, memory=mem, new_data=ex,
                          secondary=lambda m, lg, xb, yb, s: F.cross_entropy(lg, yb))]

    model0 = build_model(SPEC, 0, torch.device("cpu"))
    kw = dict(record_every=4, checkpoint_every=5, distance=get_distance("bhattacharyya"), heldout=x[:64])
    ref = run_path(copy.deepcopy(model0), phases(), out_dir=tmp_path / "ref", **kw)

    class Kill(Exception):
        pass

    def cut(event, payload):
        if event == "checkpoint" and payload["global_step"] == 15:  # mid-way through the FIP phase
            raise Kill

    with pytest.raises(Kill):
        run_path(copy.deepcopy(model0), phases(), out_dir=tmp_path / "cut", callback=cut, **kw)
    res = run_path(copy.deepcopy(model0), phases(), out_dir=tmp_path / "cut", **kw)
    assert res.resumed_from == 15
    for a, b in zip(ref.model.parameters(), res.model.parameters()):
        assert torch.equal(a, b)
    assert [r["objective"] for r in res.records if "objective" in r] == [
        r["objective"] for r in ref.records if "objective" in r]
    assert ref.records[-1]["heldout_distance"] > 0  # the FIP phase moved


def test_streaming_gives_the_in_memory_numbers(tmp_path):
    from fipray.experiments import run_experiment

    common = ["operation=ensemble", "seeds=[0]", "model.kwargs={hidden: [32]}", "model.name=mlp", "train.steps=40",
              "path.steps=20", "ensemble.members=2", "ensemble.sample_every=10", "ensemble.eps=[0.1]",
              "ensemble.pgd_steps=2", "ensemble.eval_examples=40", "ensemble.baselines=[base]", "threads=1"]
    a = run_experiment(load_config(None, common), tmp_path / "mem", progress=False)
    b = run_experiment(load_config(None, [*common, "data.stream=true", "data.workers=1"]), tmp_path / "stream",
                       progress=False)
    for m in ("fip", "base"):
        assert a["methods"][m]["whitebox"] == b["methods"][m]["whitebox"]
        assert a["methods"][m]["member_clean_mean"] == b["methods"][m]["member_clean_mean"]


def test_transform_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.train_transforms.*needs data.stream"):
        load_config(None, ["data.train_transforms=[{RandomHorizontalFlip: {}}]"])
    with pytest.raises(ConfigError, match="data.eval_transforms.*unknown transform 'Rezise'"):
        load_config(None, ["data.eval_transforms=[{Rezise: {size: 16}}]"])
    cfg = load_config(None, ["data.stream=true", "data.train_transforms=[{RandomCrop: {size: 8, padding: 1}}]",
                             "data.eval_transforms=[{Resize: {size: [16, 16]}}]"])
    assert cfg.data.stream and len(cfg.data.train_transforms) == 1


def test_streamed_sparsify_gives_the_in_memory_numbers(tmp_path):
    from fipray.experiments import run_experiment

    common = ["operation=sparsify", "seeds=[0]", "model.kwargs={hidden: [32]}", "train.steps=40", "path.steps=20",
              "path.memory_batch_size=64", "sparsify.invariance_steps=5", "sparsify.targets=[0.7]",
              "sparsify.baselines=[magnitude_ft, wanda]", "threads=1"]
    a = run_experiment(load_config(None, common), tmp_path / "mem", progress=False)
    b = run_experiment(load_config(None, [*common, "data.stream=true"]), tmp_path / "stream", progress=False)
    for m in ("fip", "magnitude_ft", "wanda"):
        assert a["methods"][m]["0.7"]["sparsity"] == b["methods"][m]["0.7"]["sparsity"]
        assert a["methods"][m]["0.7"]["accuracy_mean"] == b["methods"][m]["0.7"]["accuracy_mean"], m


def test_streamed_continual_gives_the_in_memory_numbers(tmp_path):
    """Replay memories are training examples by index; streamed task data gives the same R matrices."""
    from fipray.experiments import run_experiment

    common = ["operation=continual", "seeds=[0]", "model.kwargs={hidden: [32]}", "train.steps=40", "path.steps=15",
              "continual.num_tasks=3", "continual.classes_per_task=2", "continual.memory_per_task=8",
              "continual.baselines=[er, ewc]", "continual.ewc_samples=32", "threads=1"]
    a = run_experiment(load_config(None, common), tmp_path / "mem", progress=False)
    b = run_experiment(load_config(None, [*common, "data.stream=true", "data.workers=1"]), tmp_path / "stream",
                       progress=False)
    for m in ("fip", "er", "ewc"):
        assert a["methods"][m]["acc_mean"] == b["methods"][m]["acc_mean"], m
        assert a["methods"][m]["task_incremental"]["acc_mean"] == b["methods"][m]["task_incremental"]["acc_mean"]


@pytest.mark.parametrize("op", ["ensemble", "sparsify"])
def test_streamed_path_unit_gives_the_in_memory_path(op, tmp_path):
    """The per-path unit of `fipray paths` (without Ray) streams too, to the same weights."""
    from fipray.units import load_final, run_one_path, train_shared_base

    common = [f"operation={op}", "seeds=[0]", "model.kwargs={hidden: [32]}", "train.steps=30", "path.steps=20",
              "path.memory_batch_size=64", "ensemble.sample_every=10", "sparsify.invariance_steps=5",
              "sparsify.targets=[0.6]", "threads=1"]
    finals = []
    for name, extra in (("mem", []), ("stream", ["data.stream=true", "data.workers=1"])):
        cfg = load_config(None, [*common, *extra])
        base = train_shared_base(cfg, tmp_path / name / "storage")
        run_one_path(cfg, 1, base, tmp_path / name / "path1")
        finals.append(load_final(tmp_path / name / "path1"))
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k
