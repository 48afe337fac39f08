"""PGD/FGSM, the ε curve and the sanity flags on small MLPs trained on sklearn digits."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from fipray.ensemble import Ensemble
from fipray.eval import fgsm_attack, input_gradients, pgd_attack, robustness_curve, sanity_flags
from fipray.eval.predict import accuracy


def train_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 200) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    # These nets are tiny: one thread is faster than two fighting over a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64) in [0, 1]
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:1600], y[1400:1600]
    models = [train_mlp(x_tr, y_tr, seed=s) for s in range(3)]
    yield {"x": x_te, "y": y_te, "models": models}
    torch.set_num_threads(threads)


def test_models_learned(digits):
    for m in digits["models"]:
        assert accuracy(m, digits["x"], digits["y"]) > 0.9


def test_pgd_properties(digits):
    model, x, y = digits["models"][0], digits["x"], digits["y"]
    adv = pgd_attack(model, x, y, eps=0.1)
    assert adv.shape == x.shape
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(pgd_attack(model, x, y, eps=0.0), x)
    assert accuracy(model, adv, y) <= accuracy(model, x, y)
    # Same seed, same result; different seed, a different random start.
    assert torch.equal(adv, pgd_attack(model, x, y, eps=0.1))
    assert not torch.equal(adv, pgd_attack(model, x, y, eps=0.1, seed=1))


def test_attacks_leave_global_rng_and_training_flags_alone(digits):
    model, x, y = digits["models"][0], digits["x"][:32], digits["y"][:32]
    model.train()
    model[0].eval()  # mixed flags must survive
    torch.manual_seed(123)
    state = torch.get_rng_state()
    pgd_attack(model, x, y, eps=0.1, steps=3)
    fgsm_attack(model, x, y, eps=0.1)
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model.modules()] == [True, False, True, True]
    model.eval()


def test_attack_input_validation(digits):
    model, x, y = digits["models"][0], digits["x"][:4], digits["y"][:4]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd_attack(model, x * 3 - 1, y, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="examples"):
        fgsm_attack(model, x, y[:3], eps=0.1)


def test_robustness_curve_and_sanity_flags(digits):
    target, surrogate = digits["models"][0], digits["models"][1]
    x, y = digits["x"], digits["y"]
    eps_list = [0.0, 0.05, 0.3]
    rows = robustness_curve(target, x, y, eps_list, surrogate=surrogate, steps=20, batch_size=128)
    assert [r["eps"] for r in rows] == eps_list
    by_eps = {r["eps"]: r for r in rows}
    clean = rows[0]["clean"]
    assert by_eps[0.0]["whitebox"] == clean and by_eps[0.0]["transfer"] == clean
    for r in rows:
        assert r["whitebox"] <= r["clean"]
        assert r["whitebox"] <= r["transfer"]  # attacking the model itself is the stronger attack
        assert math.isnan(r["autoattack"])
        assert r["n"] == 200 and r["steps"] == 20
    assert by_eps[0.3]["whitebox"] < by_eps[0.05]["whitebox"]

    report = sanity_flags(rows, target=target, x=x, y=y, eps=0.05, batch_size=128)
    assert set(report["flags"]) == {
        "acc_decreases_with_eps",
        "acc_near_zero_at_max_eps",
        "more_steps_not_better",
        "whitebox_le_transfer",
        "nonzero_input_gradients",
    }
    assert all(report["flags"].values()), report
    measured = report["measured"]
    assert set(measured["whitebox_by_steps"]) == {10, 40}
    assert measured["zero_input_gradient_fraction"] == 0.0
    assert measured["max_eps"] == 0.3

    # Without a surrogate the transfer column is NaN and its flag is "not checked".
    rows_ns = robustness_curve(target, x[:50], y[:50], [0.1], steps=5)
    assert math.isnan(rows_ns[0]["transfer"])
    flags = sanity_flags(rows_ns, target=target, x=x[:50], y=y[:50], eps=0.1, steps_list=(5, 10))["flags"]
    assert flags["whitebox_le_transfer"] is None


def test_sanity_flags_catch_probability_head():
    # A softmax-probability head fed to CE is the classic fake robustness: saturated probabilities
    # give exactly zero input gradients on confidently classified inputs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e4)
    x, y = torch.rand(16, 4), torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        y = model(x).argmax(-1)
    grads = input_gradients(model, x, y)
    assert (grads.flatten(1).abs().amax(1) == 0).any()
    rows = [{"eps": 0.0, "whitebox": 1.0, "transfer": math.nan}]
    report = sanity_flags(rows, target=model, x=x, y=y, eps=0.1, steps_list=(2, 4))
    assert report["flags"]["nonzero_input_gradients"] is False
    assert report["flags"]["acc_near_zero_at_max_eps"] is False


def test_ensemble_under_pgd(digits):
    ens = Ensemble(digits["models"])
    x, y = digits["x"], digits["y"]
    grads = input_gradients(ens, x, y)
    assert (grads.flatten(1).abs().amax(1) > 0).all()  # the log-mean-softmax head does not mask gradients
    clean = accuracy(ens, x, y)
    adv = pgd_attack(ens, x, y, eps=0.3)
    assert accuracy(ens, adv, y) < 0.1 < clean
    assert not any(m.training for m in ens.members)
    # Even an ensemble switched to training mode is attacked with its members in eval mode.
    ens.train()
    pgd_attack(ens, x[:8], y[:8], eps=0.1, steps=2)
    assert ens.training and not any(m.training for m in ens.members)


def test_fgsm_weaker_than_pgd(digits):
    model, x, y = digits["models"][0], digits["x"], digits["y"]
    adv = fgsm_attack(model, x, y, eps=0.1)
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert accuracy(model, pgd_attack(model, x, y, eps=0.1), y) <= accuracy(model, adv, y) + 0.01


def test_autoattack_column_on_flat_inputs(digits):
    # torchattacks' AutoAttack expects image batches; flat (N, 64) inputs go through a reshape adapter.
    model, x, y = digits["models"][0], digits["x"][:16], digits["y"][:16]
    (row,) = robustness_curve(model, x, y, [0.1], autoattack=True)
    assert 0.0 <= row["autoattack"] <= row["clean"]
    assert row["autoattack"] <= row["whitebox"] + 2 / 16  # AutoAttack is at least about as strong as PGD
