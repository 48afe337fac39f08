"""The metric-constrained step (eq. 4 solved on ‖dw‖ = ε): exact norm, optimality of the quadratic
model against other directions of the same norm, and `path.step: metric` in all three operations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fipray.core.distances import get_distance
from fipray.core.metric import FlatView, flat_dot, metric_vp
from fipray.core.step import Anchor, metric_step, trust_region_step
from fipray.models import create_model


def _psd(p: int, rank: int, seed: int) -> torch.Tensor:
    u = torch.randn(rank, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u.T @ u / rank


@pytest.mark.parametrize("iters", [5, 40])
def test_trust_region_step_norm_and_optimality(iters):
    a = _psd(40, 10, 0)
    c = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = 0.3
    sol = trust_region_step(lambda v: a @ v, c, r, iters)
    dw = sol.step
    assert abs(float(dw.norm()) - r) < 1e-10 * r

    def q(d):
        return float(d @ a @ d + c @ d)

    assert abs(q(dw) - sol.model_value) < 1e-8
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        d = torch.randn(40, generator=g, dtype=torch.float64)
        assert q(dw) <= q(d * (r / d.norm())) + 1e-12
    assert q(dw) <= q(-c * (r / c.norm())) + 1e-12  # at least as good as the plain gradient step
    if iters >= 40:  # the full space: KKT (A + μI) dw = −c/2 with μ ≥ −λ_min(A)
        torch.testing.assert_close(2 * a @ dw + c + 2 * sol.multiplier * dw, torch.zeros(40, dtype=torch.float64),
                                   atol=1e-8, rtol=0)
        assert sol.multiplier >= -float(torch.linalg.eigvalsh(a)[0]) - 1e-10


def test_trust_region_step_zero_gradient_follows_null_space():
    a = _psd(30, 5, 3)
    sol = trust_region_step(lambda v: a @ v, torch.zeros(30, dtype=torch.float64), 0.5, 10,
                            generator=torch.Generator().manual_seed(0))
    assert abs(float(sol.step.norm()) - 0.5) < 1e-10
    assert float(sol.step @ a @ sol.step) < 1e-10  # a direction that leaves the outputs unchanged


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=4, input_shape=(6,), hidden=[16]).double().eval()
    x_mem = torch.randn(20, 6, dtype=torch.float64)
    x_new = torch.randn(16, 6, dtype=torch.float64)
    y_new = torch.randint(0, 4, (16,))
    return model, Anchor.from_model(model, x_mem), x_new, y_new


def test_metric_step_on_a_network_decreases_quadratic_model(net):
    base, anchor, x_new, y_new = net
    model = copy.deepcopy(base)
    dist = get_distance("bhattacharyya")
    lam, beta, eps = 2.0, 1.0, 0.05
    w0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    so, sol = metric_step(model, anchor, distance=dist, lam=lam, beta=beta, radius=eps, iters=30,
                          secondary=lambda logits: F.cross_entropy(logits, y_new), x_new=x_new)
    dw = {k: p.detach() - w0[k] for k, p in model.named_parameters()}
    view = FlatView(dw)
    assert abs(float(view.flatten(dw).norm()) - eps) < 1e-9
    assert float(so.distance) < 1e-12  # at the anchor d = 0 before the step

    # The model q(v) = λ⟨v, v⟩_g + ⟨v, β∇L⟩ (∇d = 0 at the anchor) from independent code paths.
    def f(p):
        return torch.func.functional_call(base, p, (anchor.inputs,))

    grad = torch.func.grad(lambda p: beta * F.cross_entropy(torch.func.functional_call(base, p, (x_new,)), y_new))(w0)

    def q(v):
        return float(lam * flat_dot(v, metric_vp(f, w0, v, distance=dist)) + flat_dot(v, grad))

    assert abs(q(dw) - sol.model_value) < 1e-8 * max(1.0, abs(q(dw)))
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        r = view.unflatten(torch.randn(view.numel, generator=g, dtype=torch.float64))
        rn = float(view.flatten(r).norm())
        assert q(dw) < q({k: t * (eps / rn) for k, t in r.items()})
    # Against a gradient step of the same length it moves the memory outputs less per unit of loss gain.
    gv = view.flatten(grad)
    gstep = view.unflatten(-gv * (eps / gv.norm()))
    assert q(dw) <= q(gstep) + 1e-12


def test_metric_step_keeps_outputs_closer_than_gradient_step(net):
    """Same length, same loss direction: the metric step changes memory outputs less than −∇L."""
    base, anchor, x_new, y_new = net
    dist = get_distance("bhattacharyya")
    m1 = copy.deepcopy(base)
    metric_step(m1, anchor, distance=dist, lam=10.0, beta=1.0, radius=0.2, iters=30,
                secondary=lambda logits: F.cross_entropy(logits, y_new), x_new=x_new)
    m2 = copy.deepcopy(base)
    metric_step(m2, anchor, distance=dist, lam=0.0, beta=1.0, radius=0.2, iters=30,
                secondary=lambda logits: F.cross_entropy(logits, y_new), x_new=x_new)
    with torch.no_grad():
        d1 = float(dist(m1(anchor.inputs), anchor.logits))
        d2 = float(dist(m2(anchor.inputs), anchor.logits))
        l1 = float(F.cross_entropy(m1(x_new), y_new))
        l2 = float(F.cross_entropy(m2(x_new), y_new))
        l0 = float(F.cross_entropy(base(x_new), y_new))
    assert d1 < 0.5 * d2
    assert l1 < l0 and l2 < l0  # both make progress on the secondary objective


OPS = {
    "continual": ["continual.num_tasks=3", "continual.classes_per_task=2", "continual.memory_per_task=5",
                  "continual.baselines=[]"],
    "sparsify": ["sparsify.targets=[0.5]", "sparsify.invariance_steps=3", "sparsify.baselines=[]"],
    "ensemble": ["ensemble.members=2", "ensemble.sample_every=2", "ensemble.baselines=[base]",
                 "ensemble.eps=[0.1]", "ensemble.pgd_steps=2", "ensemble.eval_examples=20"],
}


@pytest.mark.parametrize("op", list(OPS))
def test_step_metric_runs_in_every_operation(op, tmp_path, capsys):
    import json

    from fipray.cli import main

    out = tmp_path / op
    rc = main([op, "--no-progress", "--out", str(out), "threads=1", "seeds=[0]", "model.kwargs={hidden: [16]}"
               if op != "ensemble" else "model.name=mlp", "train.steps=10", "path.steps=4", "path.step=metric",
               "path.trust_radius=0.05", "path.cg_iters=4", "path.record_every=2", "path.memory_batch_size=32",
               *OPS[op]])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["fip_path"]  # the path moved and was recorded
    straight = next(iter(s["fip_path"].values())) if op == "sparsify" else s["fip_path"]
    assert straight["fip_length"] > 0


def test_metric_step_config_validation():
    from fipray.config import ConfigError, load_config

    assert load_config(None, ["path.step=metric"]).path.step == "metric"
    with pytest.raises(ConfigError, match="path.step"):
        load_config(None, ["path.step=newton"])
    with pytest.raises(ConfigError, match="path.trust_radius"):
        load_config(None, ["path.trust_radius=0"])
    with pytest.raises(ConfigError, match="path.cg_iters"):
        load_config(None, ["path.cg_iters=0"])


@pytest.mark.parametrize("name", ["bhattacharyya", "kl", "l2"])
def test_closed_form_output_hessians_match_autodiff(name):
    from fipray.core.metric import _output_hvp, output_hessian

    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    u = torch.randn(6, 5, generator=g, dtype=torch.float64)
    d = get_distance(name)
    torch.testing.assert_close(output_hessian(d, y0)(u), _output_hvp(d, y0, u), rtol=1e-10, atol=1e-12)
    y3 = y0.reshape(2, 3, 5)  # sequence outputs: one distribution per position
    torch.testing.assert_close(output_hessian(d, y3)(u.reshape(2, 3, 5)), _output_hvp(d, y3, u.reshape(2, 3, 5)),
                               rtol=1e-10, atol=1e-12)


def test_metric_step_path_resumes_exactly(tmp_path, digits):
    """An interrupted `step: metric` path, resumed from its checkpoint, ends at the same weights."""
    from fipray.config import load_config
    from fipray.ops.continual import build_tasks, fip_continual_phases
    from fipray.path import run_path
    from fipray.runtime import build_model, train_base

    cfg = load_config(None, ["continual.num_tasks=3", "continual.classes_per_task=2", "continual.memory_per_task=5",
                             "train.steps=10", "path.steps=4", "path.step=metric", "path.cg_iters=3",
                             "path.trust_radius=0.1", "path.checkpoint_every=3", "path.record_every=2"])
    tasks = build_tasks(cfg, digits, torch.device("cpu"), 0)
    spec = {"name": "mlp", "kwargs": {"hidden": [16]}, "num_classes": 10, "input_shape": [1, 8, 8]}
    base = build_model(spec, 0, torch.device("cpu"))
    train_base(base, tasks[0].x_train, tasks[0].y_train, cfg, 0)

    def go(out, callback=None):
        m = copy.deepcopy(base)
        run_path(m, fip_continual_phases(tasks, cfg, 0), out_dir=out, record_every=2, checkpoint_every=3,
                 callback=callback)
        return m

    ref = go(tmp_path / "ref")

    class Stop(Exception):
        pass

    def cb(event, payload):
        if event == "checkpoint" and payload["global_step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        go(tmp_path / "cut", cb)
    resumed = go(tmp_path / "cut")
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
