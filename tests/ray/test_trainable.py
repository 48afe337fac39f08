"""Users' own Tuners over a fipray config (`fipray.ray.trainable`): Optuna's searcher and Tune's
BasicVariantGenerator drive `fipray_trainable`, and every result is exactly the sweep trial of its values."""

from __future__ import annotations

import sys

import pytest

from fipray.job import job_from_dict
from fipray.units import run_trial

pytestmark = pytest.mark.ray

BASE = {"operation": "continual", "seeds": [0], "threads": 1,
        "data": {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}},
        "model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "train": {"steps": 20},
        "path": {"lam": 10.0, "steps": 20}, "continual": {"num_tasks": 2, "memory_per_task": 10},
        "sweep": {"metric": "acc_mean", "validation": 0.25, "search": {"path.lam": {"uniform": [1.0, 2.0]}}}}


def _last_report(cfg, **options) -> dict:
    reports: list[dict] = []
    run_trial(cfg, reports.append, **options)
    return reports[-1]


def _fit(trainable, space, tmp_path, **tune_config):
    from ray import tune

    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=2, **tune_config),
                       run_config=tune.RunConfig(name="t", storage_path=str(tmp_path), verbose=0))
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    return grid


def test_an_optuna_tuner_runs_path_trials_with_checkpoints(ray_2cpus, tmp_path):
    pytest.importorskip("optuna")
    from ray import tune

    from fipray.ray.trainable import fipray_trainable, optuna_search

    job = job_from_dict(BASE)
    grid = _fit(fipray_trainable(job, interval=10), {"path.lam": tune.loguniform(1.0, 100.0)}, tmp_path,
                num_samples=2, search_alg=optuna_search(metric="acc_mean", mode="max", seed=0))
    assert len(grid) == 2
    for r in grid:
        lam = r.config["path.lam"]
        assert 1.0 <= lam <= 100.0 and r.metrics["path_step"] == 20 and r.checkpoint is not None
        assert r.metrics["parent"] == "" and r.metrics["forks"] == 0
        # Scored on sweep.validation of the job, exactly as `fipray sweep`'s trial of these values.
        assert r.metrics["acc_mean"] == _last_report(job.cfg.replace(**{"path.lam": lam}),
                                                     **job.sweep.options())["acc_mean"]
    assert len({r.config["path.lam"] for r in grid}) == 2


@pytest.mark.heavy  # README's tier stays within ~6 min; .ci/run's heavy tier runs it
def test_a_basic_variant_tuner_runs_plain_trials(ray_2cpus, tmp_path):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from fipray.ray.trainable import fipray_trainable

    cfg = job_from_dict(BASE).cfg
    # Nested keys are dotted config keys too; checkpoint=False: the operation's plain sweep trial.
    grid = _fit(fipray_trainable(cfg, checkpoint=False), {"path": {"lam": tune.grid_search([1.0, 20.0])}}, tmp_path,
                search_alg=BasicVariantGenerator(random_state=0))
    got = sorted((r.config["path"]["lam"], r.metrics["acc_mean"], r.metrics["training_iteration"]) for r in grid)
    want = [(lam, _last_report(cfg.replace(**{"path.lam": lam}))["acc_mean"], 1) for lam in (1.0, 20.0)]
    assert got == want


def test_optuna_search_names_the_extra_when_optuna_is_missing(monkeypatch):
    from fipray.ray.trainable import optuna_search

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(ImportError, match=r"optional extra 'optuna': pip install 'fipray\[optuna\]'"):
        optuna_search(metric="acc_mean", mode="max")
