"""Sweeps at equal budget: held-out validation data, any method as a trial, compute counted (no Ray)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from fipray.config import ConfigError, from_dict
from fipray.data import get_data
from fipray.data.core import dataset_labels
from fipray.data.holdout import holdout_bundle, holdout_size, holdout_stream, split_holdout
from fipray.job import job_from_dict
from fipray.units import run_test, run_trial, trial_context


def _cfg(**over):
    base = {"operation": "continual", "seeds": [0], "threads": 1,
            "data": {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}},
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 40},
            "path": {"lam": 10.0, "steps": 20, "record_every": 10, "checkpoint_every": 20},
            "continual": {"num_tasks": 2, "memory_per_task": 10}}
    return from_dict(base).replace(**over)


def _reports(cfg, **kw):
    out: list[dict] = []
    run_trial(cfg, out.append, **kw)
    return out


def test_holdout_is_stratified_seeded_and_disjoint():
    b = get_data("digits", seed=0, test_fraction=0.25)
    n = len(b.train)
    rest, held = split_holdout(b.train, 0.2, seed=0)
    assert len(held) == round(0.2 * n) and len(rest) + len(held) == n
    x_r, x_h = rest.tensors[0].flatten(1), held.tensors[0].flatten(1)
    assert not (torch.cdist(x_h, x_r).min(dim=1).values == 0).all()  # not the same images
    # stratified: each class's share of the held-out part is its share of the whole within one example
    y, yh = dataset_labels(b.train), dataset_labels(held)
    for c in range(10):
        assert abs(int((yh == c).sum()) - 0.2 * int((y == c).sum())) <= 1
    again, other = split_holdout(b.train, 0.2, seed=0)[1], split_holdout(b.train, 0.2, seed=1)[1]
    assert torch.equal(again.tensors[0], held.tensors[0]) and not torch.equal(other.tensors[0], held.tensors[0])
    assert len(split_holdout(b.train, 100, seed=0)[1]) == 100  # a count
    hb = holdout_bundle(b, 0.2)
    assert torch.equal(hb.test.tensors[0], held.tensors[0]) and hb.num_classes == 10


@pytest.mark.parametrize("v, match", [(0.0, "fraction in"), (1.5, "whole number"), (5000, "at least one on each"),
                                      (1e-6, "at least one on each")])
def test_holdout_size_refuses_what_cannot_be_split(v, match):
    with pytest.raises(ValueError, match=match):
        holdout_size(1000, v)


def test_a_validation_split_larger_than_the_training_data_fails_before_any_trial():
    with pytest.raises(ConfigError, match="'sweep.validation'.*holds out"):
        trial_context(_cfg(), validation=100_000)
    with pytest.raises(ConfigError, match="'sweep.validation'.*whole number"):
        job_from_dict({**_cfg().to_dict(), "sweep": {"validation": 2.5}})


def test_continual_holdout_cuts_every_task_of_the_stream():
    ctx = trial_context(_cfg(), validation=0.2)
    stream = ctx.memos["stream"][0]
    for t in stream.tasks:
        assert abs(len(t.test) - 0.25 * len(t.train)) <= 2  # 20 % held out: held = rest / 4
        assert set(dataset_labels(t.test).tolist()) == set(t.classes)


def _permuted_test(bundle):
    """The same training split; the test split's labels permuted and its inputs replaced by noise."""
    x, y = bundle.test.tensors
    g = torch.Generator().manual_seed(7)
    test = TensorDataset(torch.rand(x.shape, generator=g), y[torch.randperm(len(y), generator=g)])
    return dataclasses.replace(bundle, test=test)


def test_selection_never_reads_the_test_split():
    """Three candidate configs scored by sweep trials on digits, and on digits with a scrambled test split:
    identical scores, so the same choice; the test split matters only to `run_test` (after selection)."""
    b = get_data("digits", seed=0, test_fraction=0.25)
    scrambled = _permuted_test(b)
    cands = [{"path.lam": 1.0}, {"path.lam": 30.0}, {"path.lr": 0.01}]
    scores = [_reports(_cfg(**c), bundle=b)[-1]["acc_mean"] for c in cands]
    again = [_reports(_cfg(**c), bundle=scrambled)[-1]["acc_mean"] for c in cands]
    assert scores == again and len(set(scores)) > 1
    best = cands[scores.index(max(scores))]
    assert run_test(_cfg(**best), bundle=b)["acc_mean"] != run_test(_cfg(**best), bundle=scrambled)["acc_mean"]


@pytest.mark.parametrize("method", ["fip", "er", "derpp", "ewc", "lora_r2"])
def test_a_trial_runs_any_method_and_counts_its_compute(method):
    reps = _reports(_cfg(), method=method)
    assert [r["task"] for r in reps] == [1]
    last = reps[-1]
    assert 0 <= last["acc_mean"] <= 1 and last["trial_seconds"] > 0
    # base network (40 steps) + one task phase (20 steps): every optimizer step counted once
    assert last["grad_evals"] == 60


def test_a_baseline_trial_is_the_experiment_s_baseline():
    """The ER trial on the held-out split reproduces the experiment's ER row on the same split."""
    from fipray.experiments import run_experiment
    from fipray.ops.continual import stream_from_config

    cfg = _cfg(**{"continual.baselines": ["er"]})
    trial = _reports(cfg, method="er")[-1]["acc_mean"]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        s = run_experiment(cfg, d, progress=False, tasks=holdout_stream(stream_from_config(cfg), 0.2, 0))
    assert s["methods"]["er"]["acc_mean"] == pytest.approx(trial, abs=1e-9)


def test_unknown_method_is_refused_naming_the_ones_that_run():
    with pytest.raises(ConfigError, match="cannot run 'sgd'; they run fip, .*derpp.*lora_r<rank>"):
        _reports(_cfg(), method="sgd")
    with pytest.raises(ConfigError, match="'sweep.method'.*cannot run 'lora_rx'"):
        job_from_dict({**_cfg().to_dict(), "sweep": {"method": "lora_rx"}})


def test_a_search_over_a_baseline_knob_is_accepted():
    job = job_from_dict({**_cfg().to_dict(), "sweep": {"method": "derpp", "search": {
        "continual.der_alpha": {"uniform": [0.05, 1.0]}, "continual.der_beta": {"uniform": [0.1, 1.0]},
        "path.lr": {"loguniform": [3e-4, 3e-3]}}}})
    assert job.sweep.options()["method"] == "derpp"
