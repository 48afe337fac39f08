"""The Python API checks a user's data before any training: numpy arrays converted (saying so) or refused, and a
wrong input_shape, too few num_classes or token ids for an image model named at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fipray.config import load_config
from fipray.data import DataBundle, get_data
from fipray.experiments import run_experiment
from fipray.models.inputs import InputError

TINY = ["operation=continual", "seeds=[0]", "threads=1", "train.steps=2", "path.steps=2", "continual.baselines=[]",
        "continual.num_tasks=2", "model.kwargs={hidden: [16]}"]


def _digits_arrays():
    b = get_data("digits", seed=0)
    return [t.numpy() for t in b.train.tensors], [t.numpy() for t in b.test.tensors]


def test_numpy_pairs_are_converted_saying_so_and_bare_arrays_refused():
    (xtr, ytr), (xte, yte) = _digits_arrays()
    with pytest.warns(UserWarning, match=r"DataBundle.train: converted the \(x, y\) arrays to a TensorDataset"):
        b = DataBundle((xtr, ytr), (xte, yte), num_classes=10, input_shape=(1, 8, 8))
    assert isinstance(b.train, TensorDataset) and b.train.tensors[0].dtype == torch.float32
    assert b.train.tensors[1].dtype == torch.int64
    with pytest.raises(TypeError, match="DataBundle.test must be a torch Dataset.*bare array has no labels"):
        DataBundle(b.train, xte, num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="DataBundle.train: 3 inputs but 2 labels"):
        DataBundle((np.zeros((3, 4)), np.zeros(2)), b.test, num_classes=10, input_shape=(4,))


def _bundle(**kw):
    b = get_data("digits", seed=0)
    return DataBundle(kw.get("train", b.train), kw.get("test", b.test), kw.get("num_classes", 10),
                      kw.get("input_shape", (1, 8, 8)))


SPARSE = ["operation=sparsify", "seeds=[0]", "threads=1", "train.steps=2", "path.steps=2", "sparsify.targets=[0.5]",
          "sparsify.invariance_steps=1", "model.kwargs={hidden: [16]}"]


@pytest.mark.parametrize("kw, match", [
    ({"input_shape": (64,)}, r"DataBundle.input_shape is \(64,\) but the train items have shape \(1, 8, 8\)"),
    ({"num_classes": 3}, r"DataBundle.num_classes is 3 but the train labels run from 0 to 9"),
])
def test_a_bundle_that_does_not_fit_fails_before_training(tmp_path, kw, match):
    with pytest.raises(InputError, match=match):
        run_experiment(load_config(None, SPARSE), tmp_path, progress=False, bundle=_bundle(**kw))
    assert not (tmp_path / "summary.json").exists()


def test_images_for_a_text_model_fail_naming_the_model_section():
    from fipray.models.inputs import check_inputs

    with pytest.raises(InputError, match="model 'hf_bert' reads integer token ids but the data's inputs are "
                                         "torch.float32"):
        check_inputs(_bundle(), {"name": "hf_bert"}, torch.nn.Linear(64, 10))


def test_token_ids_for_an_image_model_fail_naming_the_model_section(tmp_path):
    ids = TensorDataset(torch.randint(0, 50, (40, 8)), torch.arange(40) % 2)
    b = DataBundle(ids, ids, num_classes=2, input_shape=(8,))
    with pytest.raises(InputError, match="integer token ids .* model 'mlp' reads float inputs: use a text model"):
        run_experiment(load_config(None, TINY), tmp_path, progress=False, bundle=b)


def test_a_fitting_bundle_runs_as_before(tmp_path):
    s = run_experiment(load_config(None, TINY), tmp_path, progress=False, bundle=_bundle())
    assert 0 <= s["methods"]["fip"]["acc_mean"] <= 1
