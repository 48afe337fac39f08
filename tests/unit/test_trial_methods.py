"""Sweep trials of the sparsify, robust and ensemble baselines (`sweep.method`), run without Ray on tiny digits nets:
each method reports the operation's metrics and its compute, unknown methods are refused (by the trial and by the
job layer), and the baselines' rates (`sparsify.finetune_lr`, `robust.at_lr`) are searchable knobs."""

from __future__ import annotations

import pytest

from fipray.config import ConfigError, load_config
from fipray.operation import get_operation
from fipray.units import run_trial

SPARSIFY = ["operation=sparsify", *get_operation("sparsify").smoke, "threads=1", "model.kwargs={hidden: [32]}",
            "train.steps=20", "path.steps=8", "sparsify.invariance_steps=4", "sparsify.targets=[0.5, 0.8]",
            "sparsify.exclude_head=true", "sparsify.lth.steps_per_level=3"]
ROBUST = ["operation=robust", *get_operation("robust").smoke, "threads=1", "model.kwargs={hidden: [32]}",
          "train.steps=20", "path.steps=8", "ensemble.sample_every=4", "ensemble.eval_examples=30",
          "ensemble.pgd_steps=1", "ensemble.fip=robust"]
ENSEMBLE = ["operation=ensemble", *get_operation("ensemble").smoke, "threads=1", "model.kwargs={hidden: [32]}",
            "train.steps=20", "path.steps=8", "ensemble.sample_every=4", "ensemble.eval_examples=30",
            "ensemble.pgd_steps=1", "robust.fge_cycle=4"]


def _trial(over: list[str], **options) -> list[dict]:
    reports: list[dict] = []
    run_trial(load_config(None, over), reports.append, **options)
    return reports


@pytest.mark.parametrize("method", ["fip", "magnitude_ft", "imp", "lth"])
def test_sparsify_trial_runs_each_method_at_the_target(method):
    reports = _trial(SPARSIFY, method=method, target=0.8)
    r = reports[-1]
    assert len(reports) == 1 and r["seed"] == 0
    assert 0 <= r["accuracy"] <= 1 and r["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert r["grad_evals"] > 0 and r["trial_seconds"] > 0


def test_sparsify_finetune_lr_defaults_to_the_training_rate():
    from fipray.baselines.sparsify import finetune_train

    cfg = load_config(None, SPARSIFY)
    assert cfg.sparsify.finetune_lr == 0 and finetune_train(cfg) == cfg.train
    assert finetune_train(cfg.replace(**{"sparsify.finetune_lr": 0.02})).lr == 0.02
    default = _trial(SPARSIFY, method="magnitude_ft")[-1]
    same = _trial([*SPARSIFY, f"sparsify.finetune_lr={cfg.train.lr}"], method="magnitude_ft")[-1]
    other = _trial([*SPARSIFY, "sparsify.finetune_lr=0.05"], method="magnitude_ft")[-1]
    assert same["accuracy"] == default["accuracy"]
    assert other["accuracy"] != default["accuracy"]


def test_sparsify_lth_trial_checks_the_head_as_the_experiment_does():
    with pytest.raises(ConfigError, match="prune_head"):
        _trial([*SPARSIFY, "sparsify.exclude_head=false"], method="lth")


@pytest.mark.parametrize("over", [[], ["robust.validation=100"]], ids=["sweep_validation", "robust_validation"])
def test_robust_trial_runs_pgd_at(over):
    r = _trial([*ROBUST, *over], method="pgd_at", eps=0.1)[-1]
    assert {"whitebox_floor", "whitebox", "transfer", "clean", "base_clean", "seed", "eps"} <= set(r)
    assert 0 <= r["whitebox"] <= 1 and 0 <= r["clean"] <= 1 and r["eps"] == 0.1
    assert r["grad_evals"] > 0


def test_robust_pgd_at_trial_learns_at_its_rate():
    """robust.at_lr is the knob the trial tunes: another rate, another network."""
    a = _trial(ROBUST, method="pgd_at", eps=0.1)[-1]
    b = _trial([*ROBUST, "robust.at_lr=0.05"], method="pgd_at", eps=0.1)[-1]
    assert a["base_clean"] == b["base_clean"]  # the same w0
    assert (a["clean"], a["whitebox"]) != (b["clean"], b["whitebox"])


def test_ensemble_trial_runs_fge():
    r = _trial(ENSEMBLE, method="fge", eps=0.1)[-1]
    assert {"whitebox", "transfer", "clean"} <= set(r) and r["grad_evals"] > 0


@pytest.mark.parametrize(("over", "method", "names"), [
    (SPARSIFY, "wanda", "fip, magnitude_ft, imp, lth"),
    (ROBUST, "base", "fip, .*pgd_at"),
    (ENSEMBLE, "nope", "fip, .*fge"),
])
def test_unregistered_methods_are_refused(over, method, names):
    with pytest.raises(ConfigError, match=f"cannot run '{method}'; they run {names}"):
        _trial(over, method=method)


def _job(operation: str, **sweep):
    from fipray.job import job_from_dict

    sections = {"sparsify": {"targets": [0.5]}, "robust": {"sample_from": 0}}
    return job_from_dict({"operation": operation, "threads": 1, "path": {"memory_batch_size": 32},
                          "ensemble": {"fip": "robust", "members": 2} if operation == "robust" else {},
                          **{k: v for k, v in sections.items() if k == operation}, "sweep": sweep})


def test_the_job_layer_checks_sweep_method_and_the_rate_knobs():
    job = _job("sparsify", method="magnitude_ft", search={"sparsify.finetune_lr": {"loguniform": [1e-4, 1e-2]}})
    assert job.sweep.options()["method"] == "magnitude_ft"
    assert _job("robust", method="pgd_at", search={"robust.at_lr": {"loguniform": [1e-4, 1e-2]}}).sweep.method == "pgd_at"
    assert _job("ensemble", method="adv_deep").sweep.method == "adv_deep"
    with pytest.raises(ConfigError, match="sweep.method.*magnitude_ft, imp, lth"):
        _job("sparsify", method="magnitude")
    with pytest.raises(ConfigError, match="sweep.method.*pgd_at"):
        _job("robust", method="pgd")
    with pytest.raises(ConfigError, match="sparsify.finetune_lr"):
        _job("sparsify", search={"sparsify.finetune_lr": {"uniform": [-1.0, 0.01]}})



def test_a_sparsify_baseline_trial_is_the_experiment_s_baseline():
    """On the trial's held-out split, magnitude_ft and lth at 0.5 (lth passing only the targets up to it) give
    the experiment's rows for the same split: the same network at that target."""
    from fipray.ops.sparsify import Sparsify
    from fipray.units import trial_context

    cfg = load_config(None, SPARSIFY)
    rows = Sparsify().run_seed(trial_context(cfg), 0, ["magnitude_ft", "lth"])["results"]
    for method in ("magnitude_ft", "lth"):
        row = next(r for r in rows if r["method"] == method and r["target"] == 0.5)
        assert _trial(SPARSIFY, method=method, target=0.5)[-1]["accuracy"] == row["accuracy"]


def test_a_robust_baseline_trial_is_the_experiment_s_baseline():
    """pgd_at's trial attacks the network the experiment deploys for pgd_at on the same split (same clean
    accuracy over the whole held-out part)."""
    from fipray.ops.ensemble import RobustEnsemble
    from fipray.units import trial_context

    cfg = load_config(None, [*ROBUST, "ensemble.baselines=[pgd_at]", "ensemble.eps=[0.1]"])
    rows = RobustEnsemble().run_seed(trial_context(cfg), 0, ["fip_robust", "pgd_at"])["results"]
    row = next(r for r in rows if r["method"] == "pgd_at")
    assert _trial(ROBUST, method="pgd_at", eps=0.1)[-1]["clean"] == row["clean_full_test"]


def test_copies_of_a_loaded_w0_are_not_trial_methods():
    """With w0 loaded from robust.base_weights, deep and adv_deep would train copies of one network: refused."""
    from fipray.config import from_dict

    cfg = from_dict({"operation": "robust", "ensemble": {"fip": "robust", "baselines": ["pgd_at"]},
                     "path": {"memory_batch_size": 32},
                     "robust": {"start": "adversarial", "base_weights": "w0.safetensors"}})
    names = get_operation("robust").trial_methods(cfg)
    assert "pgd_at" in names and "deep" not in names and "adv_deep" not in names
    with pytest.raises(ConfigError, match="cannot run 'adv_deep'"):
        from fipray.operation import check_trial_method

        check_trial_method(get_operation("robust"), cfg, "adv_deep")
