"""Representation diversity, coherence and disagreement on tiny nets with known answers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fipray.ensemble import Ensemble
from fipray.eval.diversity import coherence, default_layers, pairwise_disagreement, representation_diversity


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


_G = torch.Generator().manual_seed(0)
X = torch.rand(32, 1, 3, 4, generator=_G)
Y = torch.randint(0, 4, (32,), generator=_G)


def test_default_layers_in_order():
    assert default_layers(mlp(0)) == ["1", "2", "3"]
    assert default_layers(cnn(0)) == ["0", "1", "3"]


@pytest.mark.parametrize("make", [mlp, cnn])
def test_identical_members_have_zero_diversity_and_disagreement(make):
    base = make(0)
    members = [base, copy.deepcopy(base), copy.deepcopy(base)]
    x = torch.rand(20, 1, 6, 6) if make is cnn else X
    scores = representation_diversity(members, x)
    assert set(scores) == set(default_layers(base)) | {"mean"}
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in scores.values())
    assert pairwise_disagreement(members, x) == 0.0


def test_representation_diversity_matches_hand_computation():
    a, b = mlp(0), mlp(1)
    scores = representation_diversity([a, b], X, layers=["1"], batch_size=5)
    with torch.no_grad():
        na = a[1](a[0](X)).norm(dim=1)
        nb = b[1](b[0](X)).norm(dim=1)
    # Population std of two numbers is half their distance.
    expected = float(((na - nb).abs() / 2).mean())
    assert scores["1"] == pytest.approx(expected, rel=1e-5)
    assert scores["mean"] == scores["1"]


def test_reused_module_gets_one_key_per_call():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(12, 8), nn.Linear(8, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x.flatten(1)))))

    torch.manual_seed(0)
    scores = representation_diversity([Reuse(), Reuse()], X)
    assert set(scores) == {"fc1", "fc2", "act", "act[1]", "mean"}
    assert scores["act"] > 0


def test_disagreement_hand_computed():
    class Fixed(nn.Module):
        def __init__(self, preds):
            super().__init__()
            self.register_buffer("logits", nn.functional.one_hot(torch.tensor(preds), 3).float())

        def forward(self, x):
            return self.logits[: x.shape[0]]

    members = [Fixed([0, 1, 2, 0]), Fixed([0, 1, 2, 1]), Fixed([1, 1, 2, 1])]
    # pairs: (0,1) 1/4, (0,2) 2/4, (1,2) 1/4 -> mean 1/3
    assert pairwise_disagreement(members, torch.zeros(4, 1)) == pytest.approx(1 / 3)


def test_coherence_with_itself_is_one():
    model = mlp(0)
    assert coherence([model], model, X, Y) == pytest.approx(1.0, abs=1e-5)
    # The max over members picks the member that is the surrogate.
    assert coherence([mlp(1), model, mlp(2)], model, X, Y) == pytest.approx(1.0, abs=1e-5)
    assert coherence([mlp(1), mlp(2)], model, X, Y) < 0.99


def test_accepts_ensemble_and_restores_modes():
    members = [mlp(0), mlp(1)]
    ens = Ensemble(members)
    assert pairwise_disagreement(ens, X) == pairwise_disagreement(members, X)
    assert representation_diversity(ens, X) == representation_diversity(members, X)
    other = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4)
    ).train()
    coherence(ens, other, X, Y)
    assert other.training and all(m.training for m in other.modules())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_disagreement([mlp(0)], X)
    with pytest.raises(ValueError, match="at least 2"):
        representation_diversity([mlp(0)], X)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        representation_diversity([mlp(0), mlp(1)], X, layers=["nope"])
    with pytest.raises(ValueError, match="examples"):
        coherence([mlp(0)], mlp(1), X, Y[:3])
