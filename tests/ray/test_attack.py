"""`fipray attack` on local Ray: white-box PGD through two shards reproduces `fipray ensemble`'s numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


def test_attack_cli_reproduces_fipray_ensemble_numbers(ray_2cpus, tmp_path, capsys):
    from ray import serve

    from fipray.cli import main

    run = tmp_path / "run"
    overrides = ["seeds=[0]", "ensemble.baselines=[base]", "train.steps=60", "path.steps=24",
                 "ensemble.sample_every=8", "ensemble.members=3", "ensemble.eps=[0.1,0.3]", "ensemble.pgd_steps=5",
                 "ensemble.eval_examples=40"]
    assert main(["ensemble", "--config", str(ROOT / "jobs/configs/ensemble_digits.yaml"), "--out", str(run),
                 "--no-progress", *overrides]) == 0
    capsys.readouterr()
    try:
        # No ray.shutdown here: the CLI's own shutdown would end the session fixture's Ray, so call the
        # function the CLI calls.
        from fipray.ray.attack import main_attack

        summary = main_attack(run / "ensembles" / "fip_seed0", shards=2, out=tmp_path / "attack")
    finally:
        serve.shutdown()
    ref = {r["eps"]: r for r in summary["reference_rows"]}
    assert sorted(ref) == [0.1, 0.3]
    for row in summary["rows"]:
        assert row["whitebox"] == ref[row["eps"]]["whitebox"]
        assert row["transfer"] == ref[row["eps"]]["transfer"]  # w0 retrained identically from the config
        assert row["clean"] == ref[row["eps"]]["clean"]
    in_process = json.loads((run / "summary.json").read_text())["sanity"]["fip"]
    assert summary["sanity"] == in_process
    assert (tmp_path / "attack" / "robustness.parquet").is_file()
    assert "white-box (fipray ensemble)" in (tmp_path / "attack" / "report.md").read_text()


def test_attack_on_a_robust_fip_from_an_adversarial_start(ray_2cpus, tmp_path, capsys):
    """The robust FIP folder (fip_robust_seed0) of a run whose w0 is adversarially trained, with the run's PGD step
    size: the served attack reproduces the run's rows, and w0 (the transfer surrogate) is retrained by the recipe."""
    from ray import serve

    from fipray.cli import main

    run = tmp_path / "run"
    overrides = ["seeds=[0]", "ensemble.baselines=[base]", "train.steps=60", "path.steps=24", "ensemble.sample_every=8",
                 "ensemble.members=2", "ensemble.eps=[0.1,0.3]", "ensemble.pgd_steps=5", "ensemble.pgd_alpha=0.05",
                 "ensemble.eval_examples=40", "ensemble.autoattack=false", "ensemble.review=false",
                 "robust.sample_from=0", "robust.start=adversarial", "robust.recipe_eps=0.1", "robust.recipe_alpha=0.125",
                 "ensemble.restarts=1", "path.record_every=8", "path.checkpoint_every=24"]
    assert main(["ensemble", "--config", str(ROOT / "jobs/configs/ensemble_robust_digits.yaml"), "--out", str(run),
                 "--no-progress", *overrides]) == 0
    capsys.readouterr()
    try:
        from fipray.ray.attack import main_attack

        summary = main_attack(run / "ensembles" / "fip_robust_seed0", out=tmp_path / "attack", flags=False)
    finally:
        serve.shutdown()
    ref = {r["eps"]: r for r in summary["reference_rows"]}
    assert sorted(ref) == [0.1, 0.3]
    for row in summary["rows"]:
        assert row["whitebox"] == ref[row["eps"]]["whitebox"]
        assert row["transfer"] == ref[row["eps"]]["transfer"]
