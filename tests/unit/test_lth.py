"""Lottery tickets by open_lth's protocol (`fipray.baselines.sparsify`, the `lth` sparsify baseline).

Properties: the level schedule is open_lth's (⌈20%⌉ of the remaining weights a level) and meets every target
exactly; masks only shrink across levels; the head is never pruned; a level resets every survivor (and every
other parameter) to the reset point; rewinding resets to the weights after `rewind_steps` steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fipray.baselines.sparsify import (
    LotteryConfig,
    lottery_phases,
    lottery_schedule,
    lottery_ticket,
    rewind_point,
)
from fipray.config import ConfigError, load_config
from fipray.core.masks import counted_tensors, keep_count
from fipray.eval.sparsity import counted_parameters
from fipray.runtime import build_model, tensors

CPU = torch.device("cpu")
SPEC = {"name": "mlp", "kwargs": {"hidden": [32, 16]}, "num_classes": 10, "input_shape": [1, 8, 8]}
LENET_N = 784 * 300 + 300 * 100  # LeNet-300-100's counted weights without the head
OPEN_LTH_TARGETS = (0.2, 0.672323, 0.892632, 0.964823, 0.988477, 0.990784, 0.992628, 0.994103)


def _open_lth_remaining(n: int, levels: int, rate: float = 0.2) -> list[int]:
    """open_lth's sparse_global: each level prunes ceil(rate * remaining)."""
    out = [n]
    for _ in range(levels):
        out.append(out[-1] - math.ceil(rate * out[-1]))
    return out


def test_schedule_is_open_lths_levels_for_the_papers_targets():
    sched = lottery_schedule(LENET_N, OPEN_LTH_TARGETS, 0.2)
    assert [k for k, _ in sched] == _open_lth_remaining(LENET_N, 23)
    met = {ps[0]: level for level, (_, ps) in enumerate(sched) if ps}
    assert list(met.values()) == [1, 5, 10, 15, 20, 21, 22, 23]
    for p, level in met.items():
        assert sched[level][0] == keep_count(LENET_N, p)  # every method keeps exactly this many


@pytest.mark.parametrize("targets", [(0.2, 0.67, 0.89, 0.96, 0.987, 0.99, 0.991, 0.994), (0.5,), (0.05, 0.999)])
def test_schedule_meets_any_target_exactly_and_never_prunes_more_than_the_rate(targets):
    n = 1000
    sched = lottery_schedule(n, targets, 0.2)
    keeps = [k for k, _ in sched]
    assert keeps[0] == n and all(a > b for a, b in zip(keeps, keeps[1:]))  # strictly fewer each level
    for a, b in zip(keeps, keeps[1:]):
        assert a - b <= math.ceil(0.2 * a)  # at most open_lth's level; less only to land on a target
    for k, ps in sched:
        for p in ps:
            assert k == keep_count(n, p)
    assert sorted(p for _, ps in sched for p in ps) == sorted(set(targets))
    assert sched[-1][1] == (max(targets),)  # the schedule ends at the largest target


@pytest.fixture(scope="module")
def data(digits):
    xtr, ytr = tensors(digits.train, CPU)
    xte, yte = tensors(digits.test, CPU)
    return xtr, ytr, xte, yte


def _ticket(data, targets, lth, out_dir=None):
    """Run lottery_ticket on a small MLP, the head excluded; record the counted weights at each finished level."""
    xtr, ytr, xte, yte = data
    init = build_model(SPEC, 0, CPU)
    w_init = copy.deepcopy(init.state_dict())
    names = counted_parameters(init, include_head=False)
    seen: list[dict] = []

    def evaluate(m):
        seen.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"accuracy": float((m(xte).argmax(-1) == yte).float().mean())}

    rows = lottery_ticket(init, names, targets, xtr, ytr, lth, 0, evaluate=evaluate, out_dir=out_dir)
    return {"rows": rows, "names": names, "w_init": w_init, "seen": seen, "model": init}


LTH = LotteryConfig(epochs_per_level=4, batch_size=64, lr=0.1)


@pytest.fixture(scope="module")
def ticket(data):
    return _ticket(data, (0.2, 0.5, 0.8), LTH)


def test_ticket_meets_every_target_exactly_at_its_level(ticket):
    names = ticket["names"]
    n = sum(t.numel() for t in counted_tensors(ticket["model"], names))
    sched = lottery_schedule(n, (0.2, 0.5, 0.8), 0.2)
    rows = {r["target"]: r for r in ticket["rows"]}
    assert set(rows) == {0.0, 0.2, 0.5, 0.8}
    for p in (0.2, 0.5, 0.8):
        r = rows[p]
        assert r["sparsity"] == (n - keep_count(n, p)) / n  # exact, not close
        assert sched[r["level"]][0] == r["keep"] == keep_count(n, p)
    assert rows[0.0]["level"] == 0 and rows[0.0]["sparsity"] == 0.0
    per_level = rows[0.0]["steps"]
    assert per_level > 0 and all(rows[p]["steps"] == (rows[p]["level"] + 1) * per_level for p in (0.2, 0.5, 0.8))
    assert rows[0.8]["accuracy"] > 0.3  # it learned something after the resets (10 classes: chance 0.1)


def test_ticket_masks_only_shrink_and_the_head_is_never_pruned(ticket):
    names, seen = ticket["names"], ticket["seen"]  # seen: the network at the end of every level, dense first
    head = [n for n in counted_parameters(ticket["model"]) if n not in names]
    n = sum(t.numel() for t in counted_tensors(ticket["model"], names))
    assert len(head) == 1 and len(seen) == len(lottery_schedule(n, (0.2, 0.5, 0.8), 0.2)) > 4
    masks = [torch.cat([s[n].ne(0).flatten() for n in names]) for s in seen]
    assert masks[0].all()
    for a, b in zip(masks, masks[1:]):
        assert not (b & ~a).any()  # a weight pruned once stays pruned
        assert b.sum() < a.sum()
    for s in seen:
        assert s[head[0]].ne(0).all()  # the output layer keeps every weight


def test_level_prepare_resets_survivors_and_everything_else_to_the_reset_point(data):
    xtr, ytr, _, _ = data
    model = build_model(SPEC, 1, CPU)
    names = counted_parameters(model, include_head=False)
    reset = {k: torch.randn_like(v) for k, v in model.state_dict().items()}  # any reset point (init or rewind)
    n = sum(t.numel() for t in counted_tensors(model, names))
    sched = lottery_schedule(n, (0.5,), 0.2)
    phases = lottery_phases(names, sched, xtr, ytr, LTH, 0, reset, finish=lambda m, level: {})
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    state = phases[1].prepare(model)
    flat_trained = torch.cat([trained[k].abs().flatten() for k in names])
    keep = sched[1][0]
    threshold = flat_trained.topk(keep).values.min()
    for name, mask in zip(names, state["masks"]):
        w = model.state_dict()[name]
        assert torch.equal(mask, trained[name].abs() >= threshold)  # the largest trained magnitudes survive
        assert torch.equal(w[mask], reset[name][mask])  # survivors: the reset point's values
        assert w[~mask].eq(0).all()
    assert sum(int(m.sum()) for m in state["masks"]) == keep
    for k, v in model.state_dict().items():
        if k not in names:  # biases and the head: reset too (open_lth resets the whole network)
            assert torch.equal(v, reset[k])


def test_rewind_point_is_init_without_rewinding_and_the_early_weights_with_it(data):
    xtr, ytr, _, _ = data
    init = build_model(SPEC, 0, CPU)
    w0 = copy.deepcopy(init.state_dict())
    same = rewind_point(copy.deepcopy(init), xtr, ytr, LTH, 0)
    assert all(torch.equal(same[k], w0[k]) for k in w0)
    a = rewind_point(copy.deepcopy(init), xtr, ytr, LotteryConfig(rewind_steps=5, batch_size=64), 0)
    b = rewind_point(copy.deepcopy(init), xtr, ytr, LotteryConfig(rewind_steps=6, batch_size=64), 0)
    assert any(not torch.equal(a[k], w0[k]) for k in w0)  # trained away from init
    assert any(not torch.equal(a[k], b[k]) for k in w0)  # and by exactly its own number of steps


def test_rewound_ticket_survivors_start_from_the_rewind_point(data):
    lth = LotteryConfig(epochs_per_level=1, batch_size=64, lr=0.05, rewind_steps=4)
    xtr, ytr, _, _ = data
    r = _ticket(data, (0.2,), lth)
    assert [row["level"] for row in r["rows"]] == [1, 0]
    assert r["rows"][0]["sparsity"] == pytest.approx(0.2, abs=1e-3)
    rewound = rewind_point(build_model(SPEC, 0, CPU), xtr, ytr, lth, 0)
    assert any(not torch.equal(rewound[k], r["w_init"][k]) for k in rewound)


def test_a_rerun_in_the_same_folder_resumes_instead_of_retraining(data, tmp_path):
    first = _ticket(data, (0.2, 0.5), LTH, out_dir=tmp_path)
    again = _ticket(data, (0.2, 0.5), LTH, out_dir=tmp_path)
    assert again["seen"] == []  # nothing re-evaluated: every level came from the checkpoint
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in first["rows"]]
    assert torch.equal(torch.cat([p.flatten() for p in again["model"].parameters()]),
                       torch.cat([p.flatten() for p in first["model"].parameters()]))


def test_lth_needs_the_head_out_of_the_counted_tensors_unless_it_prunes_it():
    with pytest.raises(ConfigError, match="exclude_head"):
        load_config(None, ["sparsify.baselines=[lth]"])
    with pytest.raises(ConfigError, match="prune_head"):
        load_config(None, ["sparsify.baselines=[lth]", "sparsify.exclude_head=true", "sparsify.lth.prune_head=true"])
    assert load_config(None, ["sparsify.baselines=[lth]", "sparsify.exclude_head=true"]).sparsify.lth.rate == 0.2
    assert load_config(None, ["sparsify.baselines=[lth]", "sparsify.lth.prune_head=true"]).sparsify.lth.prune_head


def test_sparsify_operation_reports_lth_at_every_target(capsys, tmp_path, data):
    import json

    from fipray.cli import main

    out = tmp_path / "run"
    code = main(["sparsify", "--no-progress", "--out", str(out), "seeds=[0]", "train.steps=20", "path.steps=10",
                 "sparsify.invariance_steps=5", "sparsify.targets=[0.2, 0.36]", "sparsify.exclude_head=true",
                 "sparsify.baselines=[magnitude, lth]", "sparsify.lth.epochs_per_level=1",
                 "sparsify.lth.batch_size=256", "model.kwargs={hidden: [32]}"])
    assert code in (0, None)
    s = json.loads((out / "summary.json").read_text())
    for p, level in (("0.2", 1), ("0.36", 2)):  # 0.36 = 1 - 0.8²: open_lth's level 2, unchanged
        for m in ("fip", "magnitude", "lth"):
            assert s["methods"][m][p]["sparsity"] == s["methods"]["magnitude"][p]["sparsity"]
        assert s["methods"]["lth"][p]["level"] == level
        assert s["methods"]["lth"][p]["steps"] == (level + 1) * (len(data[0]) // 256)
