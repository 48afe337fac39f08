"""Robust FIP from an adversarially trained start: the published recipes, the compute counted from scratch, the
adversarial invariance, the weight-averaging and equal-compute baselines, and the strong-ε evaluation knobs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fipray.baselines.ensemble import (
    ENSEMBLE_BASELINES,
    fgsm_rs_examples,
    recipe_lr,
    recipe_phase,
    train_w0,
)
from fipray.config import ConfigError, load_config
from fipray.deployment import base_evals, fip_budget, path_evals, step_evals
from fipray.eval.robustness import robustness_curve
from fipray.models import create_model
from fipray.ops.ensemble_report import goals
from fipray.ops.robust import robust_phase
from fipray.path import run_path
from fipray.runtime import RunContext, clone

TINY = ["operation=robust", "seeds=[0]", "model.kwargs={hidden: [32]}", "train.steps=60", "train.batch_size=32",
        "path.steps=12", "path.memory_batch_size=32", "path.record_every=4", "path.checkpoint_every=100",
        "path.lr=0.003", "ensemble.fip=robust", "ensemble.members=2", "ensemble.sample_every=4",
        "robust.attack_steps=1", "robust.train_eps=0.1", "robust.start=adversarial", "robust.recipe_eps=0.1",
        "robust.recipe_alpha=0.125", "ensemble.baselines=[base,pgd_at]", "threads=1"]


@pytest.fixture(scope="module")
def ctx():
    return RunContext.create(load_config(None, TINY))


def test_recipe_rate_is_wongs_triangle():
    steps, lr = 100, 0.005
    rates = [recipe_lr(t, steps, lr, "cyclic") for t in range(steps)]
    assert rates[39] == pytest.approx(lr) and max(rates) == pytest.approx(lr)
    assert rates[0] == pytest.approx(lr / 40) and rates[-1] == pytest.approx(0.0)
    assert all(a < b for a, b in zip(rates[:39], rates[1:40])) and all(a > b for a, b in zip(rates[39:], rates[40:]))
    assert recipe_lr(7, steps, lr, "flat") == lr


def test_fgsm_from_a_random_start_is_one_signed_step_clipped_to_the_ball(ctx):
    """Wong et al.'s crafting: the examples right at the random start take the step, the others keep the start."""
    model = ctx.model(0).eval()
    x, y = ctx.train_tensors()[0][:64], ctx.train_tensors()[1][:64]
    adv = fgsm_rs_examples(model, x, y, eps=0.1, alpha=0.125, generator=torch.Generator().manual_seed(3))
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # By hand: the same random start, its gradient's sign, the clips.
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    start = (x + 0.1 * noise).clamp(0, 1)
    s = start.clone().requires_grad_(True)
    out = model(s)
    (g,) = torch.autograd.grad(F.cross_entropy(out, y), s)
    right = out.argmax(1) == y
    assert 0 < int(right.sum()) < 64  # an untrained network: both kinds present
    expect = (x + (start - x + 0.125 * g.sign()).clamp(-0.1, 0.1)).clamp(0, 1)
    assert torch.allclose(adv[right], expect[right], atol=1e-6)
    assert torch.allclose(adv[~right], start[~right], atol=1e-6)


def test_adversarial_start_trains_w0_by_the_recipe_and_counts_it(ctx, tmp_path):
    cfg = ctx.cfg
    assert base_evals(cfg) == 60 * 2  # fast-FGSM: the attack's one gradient and the update
    assert base_evals(cfg.replace(**{"robust.recipe": "pgd", "robust.recipe_steps": 5})) == 60 * 6
    assert base_evals(cfg.replace(**{"robust.start": "w0"})) == 60
    w0 = ctx.model(0)
    before = clone(w0)
    train_w0(ctx, w0, 0)
    same = ctx.model(0)
    run_path(same, [recipe_phase(ctx, 0)], record_every=60, checkpoint_every=10**9)
    for a, b, c in zip(w0.parameters(), same.parameters(), before.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c)  # the recipe, deterministic, and it moved
    # Loaded weights: taken as they are, counted as 0 (trained elsewhere).
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in w0.state_dict().items()}, str(file))
    loaded_ctx = RunContext.create(cfg.replace(**{"robust.base_weights": str(file)}))
    fresh = loaded_ctx.model(5)
    train_w0(loaded_ctx, fresh, 5)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), w0.parameters()))
    assert base_evals(loaded_ctx.cfg) == 0


def test_base_weights_errors_name_the_key(ctx, tmp_path):
    with pytest.raises(ConfigError, match="robust.base_weights.*start"):
        load_config(None, [*TINY, "robust.start=w0", "robust.base_weights=x.safetensors"])
    bad = RunContext.create(ctx.cfg.replace(**{"robust.base_weights": str(tmp_path / "none.safetensors")}))
    with pytest.raises(ConfigError, match="robust.base_weights.*not a file"):
        train_w0(bad, bad.model(0), 0)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(3)}, str(wrong))
    bad = RunContext.create(ctx.cfg.replace(**{"robust.base_weights": str(wrong)}))
    with pytest.raises(ConfigError, match="does not fit the model"):
        train_w0(bad, bad.model(0), 0)
    bad = RunContext.create(ctx.cfg.replace(**{"robust.base_weights": "cached:no_such_set/w.safetensors"}))
    with pytest.raises(ConfigError, match="robust.base_weights.*no_such_set"):
        train_w0(bad, bad.model(0), 0)


def test_adversarial_invariance_is_counted_and_changes_the_path(ctx):
    base = ctx.model(0)
    train_w0(ctx, base, 0)
    cfg = ctx.cfg.replace(**{"robust.adv_invariance": 1.0})
    assert step_evals(cfg, 0) == step_evals(ctx.cfg, 0) + 1
    runs = {}
    for name, c in (("off", ctx.cfg), ("on", cfg)):
        res = run_path(clone(base), [robust_phase(ctx.train_data(), c, 0)], record_every=10**9, checkpoint_every=10**9)
        assert res.phase_results["robust"]["gradient_evals"] == path_evals(c)
        runs[name] = res.model
    x = ctx.train_tensors()[0][:256]
    with torch.no_grad():
        moved = {k: float((F.softmax(m(x), 1) - F.softmax(base(x), 1)).abs().mean()) for k, m in runs.items()}
    assert moved["on"] != moved["off"]


def test_equal_compute_and_weight_averaging_baselines(ctx):
    base = ctx.model(0)
    train_w0(ctx, base, 0)
    total = base_evals(ctx.cfg) + fip_budget(ctx.cfg)
    deep = ENSEMBLE_BASELINES.get("adv_deep_equal")(ctx, base, 0, 0.0)
    assert len(deep.members) == 2 and deep.evals <= total and deep.evals > total - 2 * 2 * 2
    fge = ENSEMBLE_BASELINES.get("adv_fge")(ctx, base, 0, 0.0)
    swa = ENSEMBLE_BASELINES.get("adv_swa")(ctx, base, 0, 0.0)
    assert len(fge.members) == 2 and fge.evals == swa.evals >= base_evals(ctx.cfg) + fip_budget(ctx.cfg)
    assert fge.evals - base_evals(ctx.cfg) - fip_budget(ctx.cfg) < 2 * 2  # rounded up to whole cycle steps
    for name, p in swa.target.named_parameters():
        mean = torch.stack([dict(m.named_parameters())[name] for m in fge.members]).mean(0)
        assert torch.allclose(p, mean)
    scratch = ENSEMBLE_BASELINES.get("fast_fgsm")(ctx, base, 0, 0.0)
    assert scratch.evals == 60 * 2 and not torch.equal(next(scratch.target.parameters()), next(base.parameters()))


def test_strong_eps_restricts_restarts_and_autoattack():
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, input_shape=(4,), hidden=(8,)).eval()
    x, y = torch.rand(12, 4), torch.randint(0, 3, (12,))
    rows = robustness_curve(model, x, y, [0.05, 0.2], steps=3, restarts=2, autoattack=True, autoattack_version="apgd",
                            strong_eps=[0.2], alpha=0.02)
    assert rows[0]["restarts"] == 1 and math.isnan(rows[0]["autoattack"]) and rows[0]["autoattack_n"] == 0
    assert rows[1]["restarts"] == 2 and not math.isnan(rows[1]["autoattack"]) and rows[1]["autoattack_n"] == 12
    with pytest.raises(ConfigError, match="strong_eps"):
        load_config(None, [*TINY, "ensemble.strong_eps=[0.7]"])


def test_goal_c_compares_autoattack_within_1_2x_compute():
    def m(aa: float, evals: int) -> dict:
        return {"whitebox": {"0.3": 0.5}, "autoattack": {"0.3": aa}, "gradient_evals": evals,
                "clean_full_test_mean": 0.98}

    pm = {"fip_robust": m(0.86, 1150), "pgd_at": m(0.85, 1000), "base": m(0.8, 900)}
    g = goals(pm, "0.3")["fip_robust"]
    assert g["c"] and g["c_measured"]["evals_ratio"] == pytest.approx(1.15)
    pm["fip_robust"] = m(0.855, 1150)  # half a point: not enough
    assert not goals(pm, "0.3")["fip_robust"]["c"]
    pm["fip_robust"] = m(0.9, 1300)  # 1.3× the compute
    assert not goals(pm, "0.3")["fip_robust"]["c"]
    pm["pgd_at"]["autoattack"] = {"0.3": float("nan")}  # not run: no verdict
    assert "c" not in goals(pm, "0.3")["fip_robust"]


def test_loaded_w0_refuses_networks_trained_like_it():
    with pytest.raises(ConfigError, match="robust.base_weights.*deep.*ensemble.review"):
        load_config(None, [*TINY, "robust.base_weights=w.safetensors", "ensemble.baselines=[deep,base]",
                           "ensemble.review=true", "ensemble.focus_eps=0.1", "ensemble.eps=[0.1]"])
    load_config(None, [*TINY, "robust.base_weights=w.safetensors", "ensemble.baselines=[base,pgd_at,adv_swa]"])
