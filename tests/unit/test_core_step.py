"""Anchor, fip_objective and penalty_step: S = λ·d(f(x_mem; w), f(x_mem; w_anchor)) + β·L."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fipray.core.distances import get_distance
from fipray.core.step import Anchor, StepOutput, fip_objective, penalty_step
from fipray.models import create_model


def _mlp(seed=0, hidden=(32,)):
    torch.manual_seed(seed)
    return create_model("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=list(hidden))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class _Counting(nn.Module):
    """Wraps a module and counts forward calls and the rows they saw."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.rows = 0

    def forward(self, x):
        self.calls += 1
        self.rows += len(x)
        return self.inner(x)


def test_anchor_from_model_uses_eval_mode_once_and_restores_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    model = _Counting(net)
    model.train()
    x, _ = _data(50, 1)
    anchor = Anchor.from_model(model, x)
    assert model.calls == 1 and model.rows == 50  # one pass over the memory
    assert model.training and net.training  # mode restored
    net.eval()
    with torch.no_grad():
        want = net(x)
    # Dropout off: the anchor equals the deterministic eval-mode outputs, bit for bit.
    torch.testing.assert_close(anchor.logits, want, rtol=0, atol=0)
    assert not anchor.logits.requires_grad
    assert anchor.inputs is x
    assert len(anchor) == 50


def test_anchor_from_model_batches_agree_with_one_pass():
    model = _Counting(_mlp(1))
    x, _ = _data(37, 2)
    one = Anchor.from_model(model, x)
    model.calls = 0
    chunked = Anchor.from_model(model, x, batch_size=10)
    assert model.calls == 4  # ceil(37 / 10)
    torch.testing.assert_close(chunked.logits, one.logits, rtol=0, atol=1e-6)
    sel = one.select(torch.tensor([3, 0, 36]))
    torch.testing.assert_close(sel.logits, one.logits[[3, 0, 36]], rtol=0, atol=0)
    torch.testing.assert_close(sel.inputs, x[[3, 0, 36]], rtol=0, atol=0)


def test_penalty_step_is_not_reevaluating_the_anchor():
    # The anchor's logits are data: later steps compare to them, not to a re-run anchor network.
    model = _mlp(2)
    x_mem, _ = _data(40, 3)
    anchor = Anchor.from_model(model, x_mem)
    frozen = anchor.logits.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x_new, y_new = _data(16, 4)
    for _ in range(3):
        penalty_step(model, opt, anchor, distance=get_distance("bhattacharyya"), lam=1.0, beta=1.0,
                     secondary=lambda logits: F.cross_entropy(logits, y_new), x_new=x_new)
    torch.testing.assert_close(anchor.logits, frozen, rtol=0, atol=0)
    with torch.no_grad():
        now = model(x_mem)
    assert float(get_distance("bhattacharyya")(now, anchor.logits)) > 1e-6  # the model moved, anchor did not


@pytest.mark.parametrize("optim", ["sgd", "adam"])
@pytest.mark.parametrize("distance", ["bhattacharyya", "kl", "l2"])
def test_penalty_step_at_the_anchor_without_secondary_stays_put(distance, optim):
    model = _mlp(3)
    x_mem, _ = _data(64, 5)
    anchor = Anchor.from_model(model, x_mem)
    w0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optim == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    d = get_distance(distance)
    # SGD: the gradient at the anchor is (numerically) zero, so nothing moves. Adam divides that
    # rounding-level gradient (~1e-8 for Bhattacharyya) by its own RMS and turns it into lr-sized
    # steps in random directions (measured: distance up to ~3e-5 within 5 steps, weights ~1% away
    # after 50), so it only gets the looser bound (KL, whose rounding gradient is not clamped away,
    # measured 1.6e-4 after 5 steps).
    tol = 1e-6 if optim == "sgd" else 5e-4
    for _ in range(5):
        out = penalty_step(model, opt, anchor, distance=d, lam=1.0, beta=0.0)
        assert isinstance(out, StepOutput)
        assert abs(float(out.distance)) <= tol
        assert abs(float(out.objective)) <= tol
        assert float(out.secondary) == 0.0
    w1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if optim == "sgd":
        assert float((w1 - w0).abs().max()) <= 1e-6
    model.eval()
    with torch.no_grad():
        assert abs(float(d(model(x_mem), anchor.logits))) <= tol


def test_penalty_step_returns_detached_scalars():
    model = _mlp(4)
    x_mem, _ = _data(20, 6)
    x_new, y_new = _data(8, 7)
    anchor = Anchor.from_model(model, x_mem)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = penalty_step(model, opt, anchor, distance=get_distance("l2"), lam=2.0, beta=0.5,
                       secondary=lambda logits: F.cross_entropy(logits, y_new), x_new=x_new)
    for t in (out.objective, out.distance, out.secondary):
        assert t.ndim == 0 and not t.requires_grad
    # S = λ d + β L at the pre-step weights (d = 0 there).
    assert float(out.objective) == pytest.approx(2.0 * float(out.distance) + 0.5 * float(out.secondary), rel=1e-6)


def test_penalty_steps_with_cross_entropy_decrease_the_objective():
    model = _mlp(5)
    x_mem, _ = _data(64, 8)
    x_new, y_new = _data(32, 9)
    anchor = Anchor.from_model(model, x_mem)
    dist = get_distance("bhattacharyya")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def sec(logits):
        return F.cross_entropy(logits, y_new)

    with torch.no_grad():
        s0, _, l0 = fip_objective(model, anchor, distance=dist, lam=1.0, beta=1.0, secondary=sec, x_new=x_new)
    outs = [penalty_step(model, opt, anchor, distance=dist, lam=1.0, beta=1.0, secondary=sec, x_new=x_new)
            for _ in range(15)]
    with torch.no_grad():
        s1, d1, l1 = fip_objective(model, anchor, distance=dist, lam=1.0, beta=1.0, secondary=sec, x_new=x_new)
    assert float(outs[0].objective) == pytest.approx(float(s0), rel=1e-5)
    assert float(s1) < 0.8 * float(s0)
    assert float(l1) < float(l0)
    assert float(d1) > 0.0  # moving towards the new task costs some invariance


def test_grad_hook_runs_between_backward_and_update():
    model = _mlp(6)
    x_mem, _ = _data(16, 10)
    x_new, y_new = _data(8, 11)
    anchor = Anchor.from_model(model, x_mem)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = model[1].weight
    before = first.detach().clone()
    seen = []

    def hook():
        seen.append(first.grad is not None and float(first.grad.abs().sum()) > 0)
        first.grad.zero_()

    penalty_step(model, opt, anchor, distance=get_distance("bhattacharyya"), lam=1.0, beta=1.0,
                 secondary=lambda lg: F.cross_entropy(lg, y_new), x_new=x_new, grad_hook=hook)
    assert seen == [True]
    torch.testing.assert_close(first.detach(), before, rtol=0, atol=0)  # zeroed grad: no update
    assert float((model[-1].weight.grad).abs().sum()) > 0


@pytest.mark.parametrize("distance", ["bhattacharyya", "kl", "l2"])
def test_fused_forward_equals_two_forwards(distance):
    torch.manual_seed(0)
    base = _mlp(7)
    x_mem, _ = _data(48, 12)
    x_new, y_new = _data(24, 13)
    anchor = Anchor.from_model(base, x_mem)
    # Move away from the anchor so d > 0.
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dist = get_distance(distance)
    lam, beta = 0.7, 1.3

    fused = _Counting(copy.deepcopy(base)).eval()  # eval mode: the FIP phases' default
    s, d, sec = fip_objective(fused, anchor, distance=dist, lam=lam, beta=beta,
                              secondary=lambda lg: F.cross_entropy(lg, y_new), x_new=x_new)
    assert fused.calls == 1 and fused.rows == 48 + 24  # ONE forward pass over new batch + memory
    s.backward()
    g_fused = [p.grad.clone() for p in fused.parameters()]

    sep = copy.deepcopy(base)
    d_ref = dist(sep(x_mem), anchor.logits)
    l_ref = F.cross_entropy(sep(x_new), y_new)
    s_ref = lam * d_ref + beta * l_ref
    s_ref.backward()
    assert float(d_ref.detach()) > 1e-5
    torch.testing.assert_close(s.detach(), s_ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(d.detach(), d_ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sec.detach(), l_ref.detach(), rtol=0, atol=1e-6)
    for gf, p in zip(g_fused, sep.parameters()):
        torch.testing.assert_close(gf, p.grad, rtol=1e-5, atol=1e-6)


def test_objective_without_anchor_or_lambda_is_secondary_only():
    model = _mlp(8)
    x_mem, _ = _data(16, 14)
    x_new, y_new = _data(8, 15)
    anchor = Anchor.from_model(model, x_mem)
    dist = get_distance("bhattacharyya")
    counting = _Counting(model)
    with torch.no_grad():
        ce = F.cross_entropy(model(x_new), y_new)
    for a, lam in ((None, 1.0), (anchor, 0.0), (anchor.select(torch.tensor([], dtype=torch.long)), 1.0)):
        counting.calls = counting.rows = 0
        s, d, sec = fip_objective(counting, a, distance=dist, lam=lam, beta=2.0,
                                  secondary=lambda lg: F.cross_entropy(lg, y_new), x_new=x_new)
        assert counting.rows == 8  # the memory is not evaluated
        assert float(d) == 0.0
        assert float(s.detach()) == pytest.approx(2.0 * float(ce), rel=1e-6)
