"""The robust operation (FIP with an adversarial L), its baselines' pieces and the review evaluation, on tiny nets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fipray.config import ConfigError, load_config
from fipray.deployment import attack_args, path_evals, step_evals
from fipray.ensemble import Ensemble
from fipray.ensemble_folder import load_ensemble, read_ensemble_meta
from fipray.eval.attacks import pgd_examples
from fipray.eval.diversity import coherence, coherence_by_surrogate, member_coherence
from fipray.eval.predict import accuracy
from fipray.eval.robustness import craft_transfer, robustness_curve, sanity_flags, transfer_matrix
from fipray.ops.ensemble_report import goals
from fipray.ops.robust import diversity_term, robust_fip_ensemble, robust_phase
from fipray.path import run_path
from fipray.runtime import RunContext, clone, train_base

TINY = ["operation=robust", "seeds=[0]", "model.kwargs={hidden: [32]}", "train.steps=150", "path.steps=12",
        "path.memory_batch_size=32", "path.record_every=4", "path.checkpoint_every=100", "path.lr=0.003",
        "ensemble.fip=robust", "ensemble.members=2", "ensemble.sample_every=4", "robust.attack_steps=2",
        "robust.train_eps=0.1", "threads=1"]


@pytest.fixture(scope="module")
def trained():
    cfg = load_config(None, TINY)
    ctx = RunContext.create(cfg)
    base = ctx.model(0)
    train_base(base, ctx.train_data(), None, cfg, 0)
    return ctx, base.eval()


def _adv_loss(model: nn.Module, ctx: RunContext, x: torch.Tensor, y: torch.Tensor) -> float:
    adv = pgd_examples(model, x, y, **attack_args(ctx.cfg.robust), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return float(F.cross_entropy(model(adv), y))


def test_pgd_examples_stay_in_the_ball_and_raise_the_loss(trained):
    ctx, base = trained
    x, y = ctx.train_tensors()[0][:128], ctx.train_tensors()[1][:128]
    rc = ctx.cfg.robust
    adv = pgd_examples(base, x, y, **attack_args(rc), generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= rc.train_eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(base(adv), y) > F.cross_entropy(base(x), y) + 0.1
    assert torch.equal(adv, pgd_examples(base, x, y, **attack_args(rc), generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(adv, pgd_examples(base, x, y, **attack_args(rc), generator=torch.Generator().manual_seed(1)))
    assert base.training is False  # crafting restores the mode


def test_robust_path_hardens_the_network_while_the_invariance_holds(trained):
    """λ = 1: adversarial loss falls and clean outputs stay near w0's; λ = 0 (plain PGD-AT from w0) drifts more."""
    ctx, base = trained
    xte, yte = ctx.test_tensors()
    kl = {}
    for lam in (1.0, 0.0):
        cfg = ctx.cfg.replace(**{"path.lam": lam, "path.steps": 40})
        res = run_path(clone(base), [robust_phase(ctx.train_data(), cfg, 0)], record_every=10**9,
                       checkpoint_every=10**9)
        m = res.model.eval()
        assert _adv_loss(m, ctx, xte, yte) < _adv_loss(base, ctx, xte, yte)
        with torch.no_grad():
            kl[lam] = float(F.kl_div(F.log_softmax(m(xte), 1), F.softmax(base(xte), 1), reduction="batchmean"))
    assert kl[1.0] < kl[0.0]


@pytest.mark.parametrize("diversity", ["none", "coherence", "disagreement"])
def test_phase_counts_the_gradient_evaluations_the_config_predicts(trained, diversity):
    ctx, base = trained
    over = {"robust.diversity": diversity, "robust.diversity_weight": 0.5 if diversity != "none" else 0.0,
            "robust.diversity_window": 2}
    cfg = ctx.cfg.replace(**over)
    res = run_path(clone(base), [robust_phase(ctx.train_data(), cfg, 0)], record_every=10**9,
                   checkpoint_every=10**9)
    assert len(res.samples) == 3
    assert res.phase_results["robust"]["gradient_evals"] == path_evals(cfg)
    # By hand: each step 1 (new batch) + 32/64 (memory) + 1 (PGD examples) + 2 (attack steps), plus the
    # diversity term: coherence 2 + the window (w0, then w0 and the latest sample), disagreement the window.
    extra = {"none": [0] * 12, "coherence": [3] * 4 + [4] * 8, "disagreement": [1] * 4 + [2] * 8}[diversity]
    assert path_evals(cfg) == math.ceil(sum(4.5 + e for e in extra))
    assert step_evals(cfg, 0) >= 4.5


def test_diversity_terms_are_one_against_the_same_network_and_lower_against_another(trained):
    ctx, base = trained
    x, y = ctx.train_tensors()[0][:64], ctx.train_tensors()[1][:64]
    adv = pgd_examples(base, x, y, **attack_args(ctx.cfg.robust), generator=torch.Generator().manual_seed(0))
    same = [{k: v.clone() for k, v in base.state_dict().items()}]
    other = [ctx.model(5).state_dict()]
    for kind in ("coherence", "disagreement"):
        assert float(diversity_term(base, same, x, y, adv, kind).detach()) == pytest.approx(1.0, abs=1e-5)
        assert float(diversity_term(base, other, x, y, adv, kind).detach()) < 0.9


def test_robust_ensemble_folder_is_an_ordinary_ensemble(trained, tmp_path):
    """The robust FIP ensemble saved by the experiment loads with load_ensemble (what serve / attack read)."""
    ctx, base = trained
    ctx = RunContext.create(ctx.cfg, out=tmp_path)
    out = {"path": [], "geometry": []}
    d = robust_fip_ensemble(ctx, base, 0, 1.0, out)
    folder = tmp_path / "ensembles" / "fip_robust_seed0"
    loaded = load_ensemble(folder)
    assert len(loaded.members) == 2 and read_ensemble_meta(folder)["metadata"]["operation"] == "robust"
    x = ctx.test_tensors()[0][:16]
    with torch.no_grad():
        assert torch.allclose(loaded(x), d.target(x), atol=1e-5)
    assert d.evals > ctx.cfg.train.steps + 2 * path_evals(ctx.cfg) // 2  # attack steps are counted
    assert accuracy(d.target, *ctx.test_tensors()) > 0.8


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="robust.diversity_weight"):
        load_config(None, [*TINY, "robust.diversity=coherence"])
    with pytest.raises(ConfigError, match="ensemble.members"):
        load_config(None, [*TINY, "ensemble.members=4"])
    with pytest.raises(ConfigError, match="ensemble.focus_eps"):
        load_config(None, [*TINY, "ensemble.review=true", "ensemble.focus_eps=0.15"])
    with pytest.raises(ConfigError, match="robust.objective"):
        load_config(None, [*TINY, "robust.objective=kl"])


def test_fge_schedule():
    from fipray.baselines.ensemble import fge_lr

    c, top = 10, 0.05
    lrs = [fge_lr(i, c, top) for i in range(3 * c)]
    assert lrs[c // 2 - 1] == pytest.approx(top / 100) and min(lrs) == pytest.approx(top / 100)
    assert max(lrs) <= top + 1e-12 and lrs[:c] == lrs[c: 2 * c]


# The review evaluation ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nets(trained):
    ctx, base = trained
    cfg = ctx.cfg
    others = []
    for s in (1, 2):
        m = ctx.model(s)
        train_base(m, ctx.train_data(), None, cfg, s)
        others.append(m.eval())
    xte, yte = ctx.test_tensors()
    return base, others, xte[:120], yte[:120]


def test_precrafted_transfer_equals_crafting_on_the_surrogate(nets):
    base, others, x, y = nets
    target = Ensemble(others)
    eps = [0.05, 0.1]
    plain = robustness_curve(target, x, y, eps, surrogate=base, steps=5, seed=3, batch_size=50)
    sets = craft_transfer(base, x, y, eps, steps=5, seed=3, batch_size=50)
    pre = robustness_curve(target, x, y, eps, steps=5, seed=3, batch_size=50, transfer_from={"w0": sets})
    assert [r["transfer"] for r in plain] == [r["transfer_w0"] for r in pre]
    assert [r["whitebox"] for r in plain] == [r["whitebox"] for r in pre]
    more = robustness_curve(target, x, y, eps, steps=5, seed=3, batch_size=50, restarts=3)
    assert all(m["whitebox"] <= p["whitebox"] for m, p in zip(more, plain))
    assert any(m["whitebox"] < p["whitebox"] for m, p in zip(more, plain))  # restarts find more


def test_transfer_matrix_diagonal_is_white_box(nets):
    base, others, x, y = nets
    ms = [base, *others]
    mat = transfer_matrix(ms, x, y, 0.1, steps=5, seed=2, batch_size=60)
    for i, m in enumerate(ms):
        assert mat[i][i] == robustness_curve(m, x, y, [0.1], steps=5, seed=2, batch_size=60)[0]["whitebox"]
    assert any(mat[i][j] > mat[i][i] for i in range(3) for j in range(3) if i != j)  # transfer is weaker


def test_coherence_by_surrogate_and_member_coherence(nets):
    base, others, x, y = nets
    c = coherence_by_surrogate(others, {"w0": base, "self": others[0]}, x, y)
    assert c["self"] == pytest.approx(1.0, abs=1e-5) and c["w0"] == pytest.approx(coherence(others, base, x, y))
    assert member_coherence([base, clone(base)], x, y) == pytest.approx(1.0, abs=1e-5)
    assert member_coherence(others, x, y) < 0.99


def test_whitebox_le_transfer_checks_every_transfer_column(nets):
    base, _, x, y = nets
    rows = [{"eps": 0.1, "whitebox": 0.5, "transfer": 0.6, "transfer_independent": 0.3},
            {"eps": 0.3, "whitebox": 0.0, "transfer": 0.1, "transfer_independent": 0.0}]
    assert sanity_flags(rows, target=base, x=x[:20], y=y[:20], eps=0.1, steps_list=(1, 2))["flags"][
        "whitebox_le_transfer"] is False
    rows[0]["transfer_independent"] = 0.55
    assert sanity_flags(rows, target=base, x=x[:20], y=y[:20], eps=0.1, steps_list=(1, 2))["flags"][
        "whitebox_le_transfer"] is True


def test_goals_verdicts():
    def m(wb: float, evals: int, clean: float) -> dict:
        return {"whitebox": {"0.1": wb}, "gradient_evals": evals, "clean_full_test_mean": clean}

    pm = {"fip_robust": m(0.8, 1000, 0.95), "deep": m(0.6, 2500, 0.97), "base": m(0.3, 400, 0.955),
          "pgd_at": m(0.85, 1000, 0.9)}
    g = goals(pm, "0.1")["fip_robust"]
    assert g["clean_ok"] and g["a"] and not g["b"]
    assert g["a_measured"]["evals_ratio"] == pytest.approx(0.4)
    pm["fip_robust"] = m(0.9, 1000, 0.94)  # more robust than PGD-AT but 1.5 points below the base
    g = goals(pm, "0.1")["fip_robust"]
    assert not g["clean_ok"] and not g["a"] and not g["b"]
    pm["fip_robust"] = m(0.9, 1300, 0.95)  # more than half the deep ensemble's compute, more than PGD-AT's
    g = goals(pm, "0.1")["fip_robust"]
    assert not g["a"] and not g["b"]


def test_sweep_trial_reports_the_floored_metric():
    """`fipray sweep`'s trial (run here without Ray): whitebox_floor equals white-box accuracy above the clean
    floor, and is negative below it (a floor no ensemble can meet)."""
    from fipray.units import run_trial

    over = [*TINY, "train.steps=100", "ensemble.eval_examples=60", "ensemble.pgd_steps=5"]
    for floor, above in ((0.5, True), (0.0, None)):
        reports: list[dict] = []
        cfg = load_config(None, [*over, f"robust.clean_floor={floor}"])
        run_trial(cfg, reports.append, eps=0.1)
        r = reports[-1]
        assert len(reports) == 1 and r["eps"] == 0.1 and 0 <= r["whitebox"] <= r["clean"]
        met = r["clean"] >= r["base_clean"] - floor
        assert met or not above
        assert (r["whitebox_floor"] == r["whitebox"]) == met and (met or r["whitebox_floor"] < 0)


def test_sweep_config_loads():
    from fipray.job import load_job, sweep_metric

    job = load_job("jobs/configs/sweep_robust_digits.yaml")
    assert job.cfg.operation == "robust" and sweep_metric(job) == "whitebox_floor"
    assert job.sweep.options()["eps"] == 0.1


def test_fipray_paths_unit_runs_robust_paths(tmp_path):
    """The per-path unit `fipray paths` runs in each Ray worker (here without Ray): robust paths from one w0."""
    from fipray.units import load_samples, run_one_path, train_shared_base

    cfg = load_config(None, [*TINY, "train.steps=60"])
    base_file = train_shared_base(cfg, tmp_path)
    results = [run_one_path(cfg, k, base_file, tmp_path / f"p{k}") for k in range(2)]
    assert [len(r["samples"]) for r in results] == [3, 3]
    assert all(r["phase_results"]["robust"]["gradient_evals"] == path_evals(cfg) for r in results)
    a, b = load_samples(tmp_path / "p0")[-1], load_samples(tmp_path / "p1")[-1]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # path k has its own batches and attack starts


def test_ensemble_operation_hands_robust_paths_to_the_robust_operation(trained):
    """`fipray paths` on a config with operation: ensemble and ensemble.fip: robust runs robust paths."""
    from fipray.operation import get_operation

    ctx, base = trained
    cfg = ctx.cfg.replace(operation="ensemble")
    phases, _ = get_operation("ensemble").path(RunContext.create(cfg), clone(base), 0)
    assert [p.name for p in phases] == ["robust"]
    with pytest.raises(ConfigError, match="ensemble.fip"):
        get_operation("ensemble").check_sweep(cfg)


# The goal-(b) knobs: no clean pass, burn-in, cyclic rate, PGD-AT's rate, validation split -----------------------
def test_no_clean_pass_takes_the_same_path_for_fewer_counted_evaluations(trained):
    """objective ce never uses the new batch's clean outputs: without that pass the path is the same (same
    batches, same attack starts) and each step costs one gradient evaluation less."""
    ctx, base = trained
    cfg_off = ctx.cfg.replace(**{"robust.clean_pass": False})
    res = {}
    for name, cfg in (("on", ctx.cfg), ("off", cfg_off)):
        res[name] = run_path(clone(base), [robust_phase(ctx.train_data(), cfg, 0)], record_every=10**9,
                             checkpoint_every=10**9)
        assert res[name].phase_results["robust"]["gradient_evals"] == path_evals(cfg)
    for i in range(len(res["on"].samples)):
        a, b = res["on"].sample_state(i), res["off"].sample_state(i)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert path_evals(ctx.cfg) - path_evals(cfg_off) == ctx.cfg.path.steps
    assert step_evals(cfg_off, 0) == pytest.approx(3.5)
    with pytest.raises(ConfigError, match="robust.clean_pass"):
        load_config(None, [*TINY, "robust.clean_pass=false", "robust.objective=trades"])


def test_sample_from_keeps_only_late_samples_and_the_budget_counts_them(trained):
    from fipray.deployment import candidates_per_path, fip_budget, sample_steps

    ctx, base = trained
    cfg = ctx.cfg.replace(**{"robust.sample_from": 6})  # samples at 4, 8, 12: candidates 8 and 12
    assert sample_steps(cfg) == [8, 12] and candidates_per_path(cfg) == 2
    assert fip_budget(cfg) == path_evals(cfg) + 2 * math.ceil(256 / cfg.path.batch_size)
    assert fip_budget(ctx.cfg) == path_evals(ctx.cfg) + 3 * math.ceil(256 / cfg.path.batch_size)
    out = {"path": [], "geometry": []}
    d = robust_fip_ensemble(RunContext.create(cfg), base, 0, 0.0, out)
    assert d.evals == cfg.train.steps + fip_budget(cfg)
    last = run_path(clone(base), [robust_phase(ctx.train_data(), cfg, 0)], record_every=10**9,
                    checkpoint_every=10**9)
    kept = [last.sample_state(1), last.sample_state(2)]  # steps 8 and 12
    for m in d.members:
        sd = m.state_dict()
        assert any(all(torch.allclose(sd[k], s[k], atol=1e-6) for k in sd) for s in kept)
    with pytest.raises(ConfigError, match="robust.sample_from"):
        load_config(None, [*TINY, "robust.sample_from=9"])  # one candidate < 2 members


def test_cyclic_rate_schedule_and_its_effect(trained):
    from fipray.ops.robust import path_lr

    ctx, base = trained
    cfg = ctx.cfg.replace(**{"robust.lr_cycle": 4, "robust.lr_peak": 3.0, "robust.sample_from": 4})
    lr = cfg.path.lr
    assert [path_lr(cfg, t) for t in range(4)] == [lr] * 4  # burn-in: the path's rate
    cycle = [path_lr(cfg, t) for t in range(4, 8)]
    assert cycle == [path_lr(cfg, t) for t in range(8, 12)]
    assert cycle[-1] == pytest.approx(lr / 100) and lr * 3 > cycle[0] > cycle[1] > cycle[2] > cycle[3]
    late = ctx.cfg.replace(**{"robust.lr_cycle": 4, "robust.lr_peak": 3.0, "robust.sample_from": 8})
    runs = {name: run_path(clone(base), [robust_phase(ctx.train_data(), c, 0)], record_every=10**9,
                           checkpoint_every=10**9) for name, c in (("plain", ctx.cfg), ("late", late))}
    for i, same in ((0, True), (1, True), (2, False)):  # samples at steps 4, 8 (before the cycles), 12
        a, b = runs["plain"].sample_state(i), runs["late"].sample_state(i)
        assert all(torch.equal(a[k], b[k]) for k in a) == same


def test_pgd_at_rate_knob(trained):
    from fipray.baselines.ensemble import adversarial_training

    ctx, base = trained
    sd = {}
    for name, over in (("recipe", {}), ("same", {"robust.at_lr": ctx.cfg.train.lr}), ("other", {"robust.at_lr": 0.01})):
        c = RunContext.create(ctx.cfg.replace(**over))
        sd[name] = adversarial_training(c, clone(base), 0, 5).state_dict()
    assert all(torch.equal(sd["recipe"][k], sd["same"][k]) for k in sd["recipe"])
    assert any(not torch.allclose(sd["recipe"][k], sd["other"][k]) for k in sd["recipe"])


def test_validation_split_is_held_out_training_data(trained):
    from fipray.ops.robust import validation_context

    ctx, _ = trained
    v = validation_context(ctx, 100)
    xtr, _ = ctx.train_tensors()
    xv, yv = v.test_tensors()
    xr, _ = v.train_tensors()
    assert len(xv) == 100 and len(xr) == len(xtr) - 100
    rows = {tuple(r.tolist()) for r in xtr.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in xv.flatten(1))  # drawn from the training split
    test_rows = {tuple(r.tolist()) for r in ctx.test_tensors()[0].flatten(1)}
    assert not any(tuple(r.tolist()) in test_rows for r in xv.flatten(1)[:50])  # not the test split
    assert torch.equal(validation_context(ctx, 100).test_tensors()[1], yv)  # fixed
    with pytest.raises(ConfigError, match="robust.validation"):
        validation_context(ctx, len(xtr))


def test_shipped_config_and_its_smoke_tests_load():
    """The shipped config takes late samples only; `--smoke-test` (a 20/40-step path) must reset the burn-in."""
    from fipray.deployment import fip_budget
    from fipray.operation import get_operation

    cfg = load_config("jobs/configs/ensemble_robust_digits.yaml", [])
    assert not cfg.robust.clean_pass and cfg.robust.at_lr == cfg.path.lr
    assert fip_budget(cfg) == path_evals(cfg) + 9 * math.ceil(256 / cfg.path.batch_size)  # 9 candidates from 96
    for op in ("robust", "ensemble"):
        smoke = load_config("jobs/configs/ensemble_robust_digits.yaml", list(get_operation(op).smoke))
        assert smoke.robust.sample_from == 0
