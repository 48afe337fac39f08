"""cl_metrics against hand-computed numbers; task_accuracy's class masking and mode restoration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fipray.eval.continual import cl_metrics, task_accuracy

# R[i, j] = accuracy on task j after training task i.
R = np.array(
    [
        [0.90, 0.10, 0.20],
        [0.95, 0.80, 0.15],
        [0.60, 0.50, 0.95],
    ]
)
B = np.array([0.10, 0.12, 0.08])


def test_cl_metrics_hand_computed():
    m = cl_metrics(R, B)
    assert m["acc"] == pytest.approx((0.60 + 0.50 + 0.95) / 3)
    # ((0.60 - 0.90) + (0.50 - 0.80)) / 2
    assert m["bwt"] == pytest.approx(-0.30)
    # task 0: max(0.90, 0.95) - 0.60 = 0.35; task 1: max(0.10, 0.80) - 0.50 = 0.30
    assert m["forgetting"] == pytest.approx(0.325)
    # ((0.10 - 0.12) + (0.15 - 0.08)) / 2
    assert m["fwt"] == pytest.approx(0.025)
    assert all(isinstance(v, float) for v in m.values())


def test_cl_metrics_without_random_init_has_nan_fwt():
    m = cl_metrics(R)
    assert math.isnan(m["fwt"])
    assert m["bwt"] == pytest.approx(-0.30)


def test_cl_metrics_single_task_is_zero_not_nan():
    assert cl_metrics(np.array([[0.7]]), np.array([0.1])) == {
        "acc": 0.7,
        "bwt": 0.0,
        "forgetting": 0.0,
        "fwt": 0.0,
    }
    assert cl_metrics([[0.7]])["fwt"] == 0.0


@pytest.mark.parametrize("bad", [np.zeros((2, 3)), np.zeros(3), np.zeros((2, 2, 2)), np.zeros((0, 0))])
def test_cl_metrics_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="square|empty"):
        cl_metrics(bad)


def test_cl_metrics_rejects_bad_random_init_shape():
    with pytest.raises(ValueError, match="random_init_acc"):
        cl_metrics(R, np.zeros(2))


# Rows are logits (the model is the identity) chosen so that restricting the argmax changes the answer.
LOGITS = torch.tensor([[5.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 9.0]])
LABELS = torch.tensor([1, 2])


def test_task_accuracy_masks_disallowed_classes():
    model = nn.Identity()
    assert task_accuracy(model, LOGITS, LABELS, None) == 0.0  # argmax 0 and 3
    assert task_accuracy(model, LOGITS, LABELS, [1, 2]) == 1.0  # task-incremental: argmax 1 and 2
    assert task_accuracy(model, LOGITS, LABELS, [0, 1, 2]) == 0.5  # class-incremental: argmax 0 and 2
    assert task_accuracy(model, LOGITS, LABELS, [1, 2], batch_size=1) == 1.0


def test_task_accuracy_rejects_labels_outside_allowed_and_out_of_range_classes():
    with pytest.raises(ValueError, match="not in classes_allowed"):
        task_accuracy(nn.Identity(), LOGITS, LABELS, [0, 1])
    with pytest.raises(ValueError, match="4 outputs"):
        task_accuracy(nn.Identity(), LOGITS, LABELS, [1, 2, 7])
    with pytest.raises(ValueError, match="examples"):
        task_accuracy(nn.Identity(), LOGITS, LABELS[:1], None)


def test_task_accuracy_uses_eval_mode_and_restores_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.9), nn.Linear(8, 3))
    model.train()
    model[2].eval()  # a deliberately mixed state must survive
    x, y = torch.rand(64, 4), torch.randint(0, 3, (64,))
    a1 = task_accuracy(model, x, y, None)
    a2 = task_accuracy(model, x, y, None)
    assert a1 == a2  # dropout off: deterministic
    assert [m.training for m in model.modules()] == [True, True, True, False]
