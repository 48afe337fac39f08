"""The path length: Σ‖w_k − w_{k−1}‖ over every optimizer step, not over the records, and exact on resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fipray.core.step import StepOutput
from fipray.path import Phase, load_checkpoint, run_path

D = 0.5  # a power of two: every zig-zag weight and step norm is exact in float32


class Interrupt(Exception):
    pass


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight[0, 0] = 0.0  # the zig-zag weight: 0, D, 0, D, ... exactly
    return net


def _zigzag(t: int) -> float:
    return D if t % 2 == 0 else -D


def _zigzag_step(model, optim, t, state) -> StepOutput:
    """+D, −D, +D, ... on one weight: the path goes back and forth, its chord stays at most D."""
    with torch.no_grad():
        model[0].weight[0, 0] += _zigzag(t)
    z = torch.zeros(())
    return StepOutput(z, z, z)


def _random_step(model, optim, t, state) -> StepOutput:
    """A step on every tensor, drawn from the step number alone (a resumed run draws the same)."""
    g = torch.Generator().manual_seed(1000 + t)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    z = torch.zeros(())
    return StepOutput(z, z, z)


def _phase(name: str, steps: int, step=_zigzag_step, prepare=None) -> Phase:
    return Phase(name=name, steps=steps, step=step, prepare=prepare,
                 optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_zigzag_length_is_the_sum_of_step_norms_not_the_chord():
    res = run_path(_net(), [_phase("a", 101)], record_every=10**9)
    assert [r["step"] for r in res.records] == [101]  # one record: the phase end
    r = res.records[-1]
    assert r["fip_length"] == 101 * D  # exact: every step moved one weight by D
    assert r["weight_distance"] == pytest.approx(D)
    assert r["fip_length"] > 100 * r["weight_distance"]


def test_length_is_independent_of_record_every():
    lengths = {}
    for every in (1, 7, 10**9):
        res = run_path(_net(), [_phase("a", 20, _random_step), _phase("b", 15, _random_step)], record_every=every)
        lengths[every] = res.records[-1]["fip_length"]
    assert lengths[1] == lengths[7] == lengths[10**9]
    # and it is the sum of the norms of the steps, computed here independently
    model, total = _net(), 0.0
    for t in list(range(20)) + list(range(15)):
        before = _flat(model)
        _random_step(model, None, t, {})
        total += float((_flat(model) - before).double().norm())
    assert lengths[1] == pytest.approx(total, rel=1e-6)
    assert lengths[1] > 3 * res.records[-1]["weight_distance"]  # a random walk: length ~ √steps × chord


def test_a_jump_made_by_prepare_is_one_segment():
    def jump(model):
        with torch.no_grad():
            model[2].bias += torch.tensor([3.0, 4.0])  # a segment of length 5
        return {}

    res = run_path(_net(), [_phase("a", 4), _phase("b", 4, prepare=jump)], record_every=10**9)
    assert res.records[-1]["fip_length"] == 8 * D + 5.0


def test_weights_view_is_measured_every_step():
    calls = []

    def view(model):
        calls.append(1)
        return 2 * _flat(model)

    res = run_path(_net(), [_phase("a", 30)], record_every=10**9, weights=view)
    assert res.records[-1]["fip_length"] == 2 * 30 * D
    assert res.records[-1]["weight_distance"] == 0.0  # 30 steps: back at w0
    assert len(calls) == 2 + 1 + 30 + 1  # w0 and prev, the phase start, every step, the record


@pytest.mark.parametrize("every", [3, 10**9])
def test_resumed_mid_phase_gives_the_identical_length(tmp_path, every):
    def phases():
        return [_phase("a", 17, _random_step), _phase("b", 13, _random_step)]

    ref = run_path(_net(), phases(), out_dir=tmp_path / "ref", record_every=every, checkpoint_every=5)

    def cut(event, payload):
        if event == "checkpoint" and payload["global_step"] == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_path(_net(), phases(), out_dir=tmp_path / "cut", record_every=every, checkpoint_every=5, callback=cut)
    ckpt = load_checkpoint(tmp_path / "cut")
    assert ckpt["global_step"] == 10 and ckpt["phase"] == 0  # mid phase "a"
    res = run_path(_net(), phases(), out_dir=tmp_path / "cut", record_every=every, checkpoint_every=5)
    assert res.resumed_from == 10
    got = [(r["step"], r["fip_length"], r["weight_distance"]) for r in res.records]
    want = [(r["step"], r["fip_length"], r["weight_distance"]) for r in ref.records]
    assert got == want  # bit-identical, not approximately equal
    assert not math.isnan(got[-1][1]) and got[-1][1] > 0


def test_a_checkpoint_with_the_old_flat_tracker_state_still_loads():
    from fipray.path import _Tracker

    model = _net()
    tr = _Tracker(model, None, None)
    flat = _flat(model)
    tr.load_state_dict({"w0": flat.clone(), "prev": flat.clone(), "length": 1.5, "logits0": None})
    with torch.no_grad():
        model[0].weight[0, 0] += D
    assert tr.row(model)["fip_length"] == 1.5 + D
