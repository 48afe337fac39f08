"""Train mode done right: base training and baselines update BatchNorm statistics; FIP phases measure
invariance and drift on the eval-mode network."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fipray.config import load_config
from fipray.core.distances import get_distance
from fipray.core.step import Anchor, fip_objective
from fipray.eval.predict import accuracy
from fipray.path import run_path
from fipray.phases import fip_phase, supervised_phase
from fipray.runtime import train_base


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(32, 10))


@pytest.fixture(scope="module")
def data(digits):
    from fipray.data import as_tensors

    x, y = as_tensors(digits.train)
    xt, yt = as_tensors(digits.test)
    return x, y.long(), xt, yt.long()


def test_base_training_updates_batchnorm_statistics(data):
    x, y, xt, yt = data
    cfg = load_config(None, ["train.steps=150", "train.lr=0.01"])
    model = bn_net()
    bn = model[2]
    assert torch.equal(bn.running_mean, torch.zeros(32)) and int(bn.num_batches_tracked) == 0
    train_base(model, x, y, cfg, 0)
    assert int(bn.num_batches_tracked) == 150  # every step ran in train mode
    assert float(bn.running_mean.abs().sum()) > 0 and not torch.allclose(bn.running_var, torch.ones(32))
    assert not model.training  # run_path hands the network back in eval mode
    # The running statistics are usable: eval-mode accuracy is that of a trained network.
    assert accuracy(model, xt, yt) > 0.85


def test_fip_phase_keeps_batchnorm_statistics_and_measures_drift_in_eval_mode(data):
    x, y, xt, yt = data
    cfg = load_config(None, ["train.steps=150", "train.lr=0.01", "path.steps=30", "path.lr=0.003",
                             "path.record_every=10"])
    base = bn_net()
    train_base(base, x, y, cfg, 0)
    model = copy.deepcopy(base)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    phase = fip_phase("fip", cfg.path, 0, memory=x[:256], new_data=(x, y),
                      secondary=lambda m, lg, xb, yb, s: F.cross_entropy(lg, yb))
    assert phase.train_mode is False  # path.train_mode's default
    res = run_path(model, [phase], heldout=xt[:128], distance=get_distance("bhattacharyya"),
                   record_every=cfg.path.record_every)
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k  # eval-mode updates: statistics untouched
    # The recorded drift is the eval-mode network's (dropout off, running statistics), to the bit.
    with torch.no_grad():
        want = float(get_distance("bhattacharyya")(model.eval()(xt[:128]), base.eval()(xt[:128])))
    assert res.records[-1]["heldout_distance"] == pytest.approx(want, rel=1e-6)
    assert want > 0


def test_fip_phase_in_train_mode_updates_statistics_but_invariance_uses_eval_mode(data):
    x, y, xt, yt = data
    cfg = load_config(None, ["train.steps=100", "train.lr=0.01", "path.steps=10", "path.train_mode=true"])
    base = bn_net()
    train_base(base, x, y, cfg, 0)
    model = copy.deepcopy(base)
    phase = fip_phase("fip", cfg.path, 0, memory=x[:256], new_data=(x, y),
                      secondary=lambda m, lg, xb, yb, s: F.cross_entropy(lg, yb))
    assert phase.train_mode is True
    n0 = int(model[2].num_batches_tracked)
    run_path(model, [phase])
    assert int(model[2].num_batches_tracked) == n0 + 10  # the new batches went through train mode ...
    # ... while the invariance term is the eval-mode distance to the anchor: at the anchor itself it is 0,
    # which a train-mode forward (batch statistics, dropout) would not give.
    anchor = Anchor.from_model(base, x[:256])
    probe = copy.deepcopy(base).train()
    _, d, _ = fip_objective(probe, anchor, distance=get_distance("bhattacharyya"), lam=1.0, beta=0.0,
                            x_new=x[:32], secondary=None)
    assert abs(float(d)) < 1e-6
    assert probe.training  # the mode is handed back
    with torch.no_grad():  # not vacuous: the same distance on train-mode outputs is far from 0
        train_d = float(get_distance("bhattacharyya")(probe(x[:256]), anchor.logits))
    assert train_d > 1e-3


def test_supervised_phases_default_to_train_mode():
    cfg = load_config(None)
    x, y = torch.rand(8, 4), torch.zeros(8, dtype=torch.long)
    assert supervised_phase("s", x, y, cfg.train, 0).train_mode is True


def test_dropout_masks_are_a_function_of_seed_and_step(data):
    """Train-mode randomness (dropout) is seeded per step: runs repeat whatever the global RNG did before."""
    x, y, _, _ = data
    cfg = load_config(None, ["train.steps=20", "train.lr=0.01"])
    a, b, c = bn_net(), bn_net(), bn_net()
    train_base(a, x, y, cfg, 0)
    torch.rand(1000)  # another consumer of the global RNG in between
    train_base(b, x, y, cfg, 0)
    train_base(c, x, y, cfg, 1)  # another seed: other batches and masks
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    net = bn_net()
    state = torch.get_rng_state()
    train_base(net, x, y, cfg, 0)
    assert torch.equal(state, torch.get_rng_state())  # the caller's global RNG is left as it was
