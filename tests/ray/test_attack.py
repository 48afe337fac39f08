"""`fipray attack` on local Ray: white-box PGD through two shards reproduces `fipray ensemble`'s numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


def _run_then_attack(config: str, overrides: list[str], folder: str, tmp_path: Path, capsys, **attack) -> dict:
    """`fipray ensemble` on the shipped `config`, then the served attack on its ensemble `folder` (no
    ray.shutdown: the CLI's own shutdown would end the session fixture's Ray, so call the function it calls)."""
    from ray import serve

    from fipray.cli import main
    from fipray.ray.attack import main_attack

    run = tmp_path / "run"
    assert main(["ensemble", "--config", str(ROOT / "jobs/configs" / config), "--out", str(run), "--no-progress",
                 *overrides]) == 0
    capsys.readouterr()
    try:
        return main_attack(run / "ensembles" / folder, out=tmp_path / "attack", **attack)
    finally:
        serve.shutdown()


def _rows_equal_the_run(summary: dict) -> None:
    """Every served row equals the run's own row at that ε (white-box, and transfer from w0 rebuilt from the config)."""
    ref = {r["eps"]: r for r in summary["reference_rows"]}
    assert sorted(ref) == [0.1, 0.3]
    for row in summary["rows"]:
        assert row["whitebox"] == ref[row["eps"]]["whitebox"]
        assert row["transfer"] == ref[row["eps"]]["transfer"]


def test_attack_cli_reproduces_fipray_ensemble_numbers(ray_2cpus, tmp_path, capsys):
    overrides = ["seeds=[0]", "ensemble.baselines=[base]", "train.steps=60", "path.steps=24",
                 "ensemble.sample_every=8", "ensemble.members=3", "ensemble.eps=[0.1,0.3]", "ensemble.pgd_steps=5",
                 "ensemble.eval_examples=40"]
    summary = _run_then_attack("ensemble_digits.yaml", overrides, "fip_seed0", tmp_path, capsys, shards=2)
    _rows_equal_the_run(summary)
    ref = {r["eps"]: r for r in summary["reference_rows"]}
    for row in summary["rows"]:
        assert row["clean"] == ref[row["eps"]]["clean"]
    in_process = json.loads((tmp_path / "run" / "summary.json").read_text())["sanity"]["fip"]
    assert summary["sanity"] == in_process
    assert (tmp_path / "attack" / "robustness.parquet").is_file()
    assert "white-box (fipray ensemble)" in (tmp_path / "attack" / "report.md").read_text()


@pytest.mark.heavy  # ~18 s: README's tier stays under 6 minutes
def test_attack_on_a_robust_fip_from_an_adversarial_start(ray_2cpus, tmp_path, capsys):
    """The robust FIP folder (fip_robust_seed0) of a run whose w0 is adversarially trained, with the run's PGD step
    size: the served attack reproduces the run's rows, and w0 (the transfer surrogate) is retrained by the recipe."""
    overrides = ["seeds=[0]", "ensemble.baselines=[base]", "train.steps=60", "path.steps=24", "ensemble.sample_every=8",
                 "ensemble.members=2", "ensemble.eps=[0.1,0.3]", "ensemble.pgd_steps=5", "ensemble.pgd_alpha=0.05",
                 "ensemble.eval_examples=40", "ensemble.autoattack=false", "ensemble.review=false",
                 "robust.sample_from=0", "robust.start=adversarial", "robust.recipe_eps=0.1", "robust.recipe_alpha=0.125",
                 "ensemble.restarts=1", "path.record_every=8", "path.checkpoint_every=24"]
    summary = _run_then_attack("ensemble_robust_digits.yaml", overrides, "fip_robust_seed0", tmp_path, capsys,
                               flags=False)
    _rows_equal_the_run(summary)
