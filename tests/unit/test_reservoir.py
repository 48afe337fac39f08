"""The DER protocol's pieces: the reservoir plan and buffer, per-batch domain examples, ER's concatenated
replay, DER's logits stored at insertion, per-method overrides and the protocol's config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fipray.config import ConfigError, from_dict
from fipray.data.reservoir import ReplayBuffer, ReservoirPlan
from fipray.data.stream import TensorExamples
from fipray.data.transformed import ConcatExamples, TransformedExamples


def _stream(sizes, bs):
    """Task i offers its examples in order, `bs` per step."""
    return [(n // bs, (lambda t, bs=bs: torch.arange(t * bs, (t + 1) * bs))) for n in sizes]


def _reference(size, batches, seed):
    """Algorithm R one example at a time, drawing from the same generator as the plan: buffer contents
    (task, index) before every global step."""
    g = torch.Generator().manual_seed(seed)
    buf, seen, before = [None] * size, 0, []
    for task, (steps, indices) in enumerate(batches):
        for t in range(steps):
            before.append(list(buf[:min(seen, size)]))
            idx = indices(t)
            u = torch.rand(len(idx), generator=g, dtype=torch.float64)
            for k, i in enumerate(idx.tolist()):
                slot = seen if seen < size else int(u[k] * (seen + 1))
                if slot < size:
                    buf[slot] = (task, i)
                seen += 1
    before.append(list(buf[:min(seen, size)]))
    return before


def test_plan_matches_algorithm_r_one_example_at_a_time():
    batches = _stream([40, 30, 50], 5)
    plan = ReservoirPlan.build(12, batches, seed=3)
    ref = _reference(12, batches, 3)
    assert plan.offsets == (0, 8, 14, 24)
    for g in range(plan.offsets[-1] + 1):
        slots, tasks, index = plan.contents(g)
        assert list(zip(tasks.tolist(), index.tolist())) == ref[g], g
        assert slots.tolist() == list(range(len(ref[g])))


def test_reservoir_is_a_uniform_sample_of_the_stream():
    # 4 tasks of 500 examples, buffer 100: each task holds ~25 slots at the end (mean over seeds).
    counts = torch.zeros(4)
    for seed in range(40):
        plan = ReservoirPlan.build(100, _stream([500] * 4, 10), seed)
        _, tasks, _ = plan.contents(plan.offsets[-1])
        counts += torch.bincount(tasks, minlength=4)
    share = counts / counts.sum()
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.03), share
    # and it is a pure function of the seed
    a, b = (ReservoirPlan.build(100, _stream([500] * 4, 10), 7) for _ in range(2))
    assert torch.equal(a.slot, b.slot) and torch.equal(a.index, b.index)


def test_buffer_samples_without_replacement_from_what_was_seen_before_the_step():
    ex = [TensorExamples(torch.arange(30.0)[:, None], torch.arange(30) % 3), TensorExamples(
        100 + torch.arange(30.0)[:, None], torch.arange(30) % 3)]
    plan = ReservoirPlan.build(8, _stream([30, 30], 3), seed=0)
    buf = ReplayBuffer(plan, ex, seed=1)
    assert buf.sample(0, 4) is None  # nothing offered yet
    x, y, slots, tasks = buf.sample(1, 10)  # after step 0: three examples
    assert sorted(x.flatten().tolist()) == [0.0, 1.0, 2.0] and tasks.tolist() == [0, 0, 0]
    x, _, slots, _ = buf.sample(15, 5)
    assert len(set(slots.tolist())) == 5
    x2, *_ = buf.sample(15, 5)
    assert torch.equal(x, x2)  # a pure function of (seed, step)
    xa, *_ = buf.sample(15, 5, draw=1)
    assert not torch.equal(x, xa)


def test_der_stores_the_logits_an_example_had_when_it_entered():
    ex = [TensorExamples(torch.arange(20.0)[:, None], torch.zeros(20, dtype=torch.long))]
    plan = ReservoirPlan.build(4, _stream([20], 2), seed=0)
    buf = ReplayBuffer(plan, ex, seed=0, num_outputs=1)

    class Clock(nn.Module):  # output = the step at which it is called, whatever the input
        def __init__(self):
            super().__init__()
            self.now = 0

        def forward(self, x):
            return torch.full((len(x), 1), float(self.now))

    net = Clock()
    for g in range(plan.offsets[-1]):
        net.now = g
        buf.store(net, g)
    slots, _, index = plan.contents(plan.offsets[-1])
    for s, i in zip(slots.tolist(), index.tolist()):
        assert buf.logits[s, 0] == i // 2  # example i was offered (and stored) at step i // 2


def test_transformed_and_concatenated_examples_take_in_order():
    x = torch.arange(12.0).reshape(6, 2)
    y = torch.arange(6)
    tr = TransformedExamples(x, y, lambda b: -b)
    xb, yb = tr.take(torch.tensor([4, 1]))
    assert torch.equal(xb, -x[[4, 1]]) and torch.equal(yb, y[[4, 1]])
    cat = ConcatExamples([TensorExamples(x, y), tr])
    xc, yc = cat.take(torch.tensor([7, 0, 11, 5]))
    assert torch.equal(xc, torch.stack([-x[1], x[0], -x[5], x[5]])) and yc.tolist() == [1, 0, 5, 5]
    xb, _ = cat.batches(4, 0).batch(0)
    assert xb.shape == (4, 2)


def test_domain_tasks_are_transformed_per_batch_not_copied():
    from fipray.data import get_data
    from fipray.ops.continual import build_tasks

    cfg = _cfg()
    tasks = build_tasks(cfg, get_data("digits"), torch.device("cpu"), 0)
    assert all(t.x_train is None and isinstance(t.train, TransformedExamples) for t in tasks)
    assert all(t.train.x.data_ptr() == tasks[0].train.x.data_ptr() for t in tasks)  # one copy of the inputs
    a, _ = tasks[1].train_data.take(torch.arange(5))
    b, _ = tasks[2].train_data.take(torch.arange(5))
    assert not torch.equal(a, b)


def test_er_concat_is_one_mean_over_batch_and_replay():
    from fipray.config import TrainConfig
    from fipray.phases import supervised_phase

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    xm, ym = torch.randn(2, 3), torch.randint(0, 2, (2,))
    net = nn.Linear(3, 2)
    tc = TrainConfig(steps=1, batch_size=8, lr=1.0, optimizer="plain_sgd")
    phase = supervised_phase("p", x, y, tc, 0, mix_in=lambda m, t, s: (xm, ym))
    ref = nn.Linear(3, 2)
    ref.load_state_dict(net.state_dict())
    phase.step(net, phase.optimizer(net), 0, {})
    F.cross_entropy(ref(torch.cat([x, xm])), torch.cat([y, ym])).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= p.grad
    assert torch.allclose(net.weight, ref.weight, atol=1e-6) and torch.allclose(net.bias, ref.bias, atol=1e-6)


def _cfg(**continual):
    cc = {"stream": "domain", "num_tasks": 3, "identity_first": False, "memory": "reservoir", "buffer_size": 20,
          "epochs": 1, "base": "each", "baselines": ["naive", "er", "der", "derpp", "fip_stored", "joint"], **continual}
    return from_dict({"operation": "continual", "seeds": [0], "threads": 1, "data": {"name": "digits"},
                      "model": {"name": "mlp", "kwargs": {"hidden": [16], "init": "xavier"}},
                      "train": {"steps": 1, "batch_size": 32, "lr": 0.1, "optimizer": "plain_sgd"},
                      "path": {"lr": 0.1, "optimizer": "plain_sgd", "batch_size": 32, "memory_batch_size": 16,
                               "record_every": 10000, "checkpoint_every": 10000, "heldout": 0},
                      "continual": cc})


@pytest.mark.parametrize("continual, needle", [
    ({"baselines": ["ewc"]}, "'continual.base': 'each'"),
    ({"overrides": {"derp": {"path.lr": 0.1}}}, "'derp' is not a method"),
    ({"overrides": {"derpp": {"data.name": "digits"}}}, "'data.name' cannot differ between methods"),
    ({"overrides": {"derpp": {"path.lr": -1}}}, "continual.overrides.derpp"),
    ({"domain": "rotate", "rotate_range": [90, 10]}, "low < high"),
    ({"rotate_range": [0, 180]}, "domain: rotate"),
    ({"memory": "per_task", "base": "train", "baselines": ["fip_stored"]}, "fip_stored anchors on a reservoir"),
])
def test_protocol_config_errors_name_the_key(continual, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _cfg(**continual)


def test_method_config_applies_only_that_methods_overrides():
    from fipray.ops.continual import method_config

    cfg = _cfg(overrides={"derpp": {"path.lr": 0.03, "continual.der_alpha": 1.0}})
    d = method_config(cfg, "derpp")
    assert d.path.lr == 0.03 and d.continual.der_alpha == 1.0 and d.continual.overrides == {}
    assert method_config(cfg, "er") is cfg


def test_the_protocol_runs_every_method_from_its_own_first_task(tmp_path):
    from fipray.experiments import run_experiment

    cfg = _cfg(domain="rotate", rotate_range=[0, 180])
    summary = run_experiment(cfg, tmp_path, progress=False)
    assert set(summary["methods"]) == {"fip", "naive", "er", "der", "derpp", "fip_stored", "joint"}
    import pandas as pd

    R = pd.read_parquet(tmp_path / "accuracy_matrix.parquet")
    row0 = R[(R.i == 0) & (R.setting == "class") & (R.j == 0)].set_index("method").acc
    assert row0["naive"] != row0["er"] or row0["er"] != row0["der"]  # each learned task 0 with its own rule
    res = pd.read_parquet(tmp_path / "results.parquet")
    assert set(res["memory"]) == {"reservoir 20"}
