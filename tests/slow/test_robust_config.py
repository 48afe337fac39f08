"""End-to-end: `fipray ensemble --config jobs/configs/ensemble_robust_digits.yaml` and the robust FIP ensemble
folder served and attacked by `fipray attack` (opt-in: -m slow; the attack also starts Ray).

Wall times are printed (README quotes them), never asserted: a loaded machine is not a bug. What is asserted is
what the acceptance asks the run to write, and that every number is one (the goals are reported, not asserted:
whether they are met is a finding, not a property of the code).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from fipray.cli import main

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "ensemble_robust_digits.yaml"
EPS = ["0.05", "0.1", "0.2", "0.3"]
METHODS = {"fip_robust", "deep", "base", "fge", "pgd_at", "adv_deep"}


def test_ensemble_robust_digits(tmp_path, capsys):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["ensemble", "--no-progress", "--config", str(CONFIG), "--out", str(out)]) == 0
    with capsys.disabled():
        print(f"\nensemble_robust_digits: {time.perf_counter() - t0:.0f} s")
    check_run(out)


def check_run(out: Path) -> None:
    """What the acceptance asks the run folder `out` to hold."""
    s = json.loads((out / "summary.json").read_text())
    m = s["methods"]
    assert set(m) == METHODS and len(s["seeds"]) >= 2 and s["eps"] == EPS
    for name, v in m.items():
        for col in ("whitebox", "autoattack", "transfer", "transfer_independent"):
            assert list(v[col]) == EPS and not any(math.isnan(x) for x in v[col].values()), (name, col)
        assert v["gradient_evals"] > 0 and v["seconds"] > 0
        assert set(v["coherence_by_surrogate"]) == {"w0", "independent"}
        assert all(max(v["whitebox"][e], v["autoattack"][e]) <= 1.0 for e in EPS)
        assert all(v["whitebox"][e] <= v["clean_mean"] for e in EPS)
    for name in METHODS - {"base", "pgd_at"}:
        assert len(m[name]["transfer_matrix"]) == s["members"] and "mean" in m[name]["diversity_layers"]
    # The compute-matched baseline got at least the FIP's gradient evaluations (rounded up to whole updates).
    assert m["pgd_at"]["gradient_evals"] >= m["fip_robust"]["gradient_evals"]
    assert set(s["goals"]["fip_robust"]) >= {"a", "b", "clean_ok"}
    assert set(s["sanity"]) == METHODS
    assert (out / "robust_vs_compute.png").is_file() and "## Goals" in (out / "report.md").read_text()
    for seed in s["seeds"]:
        assert (out / "ensembles" / f"fip_robust_seed{seed}" / "ensemble.json").is_file()


@pytest.mark.ray
def test_robust_ensemble_is_served_and_attacked(tmp_path):
    """`fipray robust --smoke-test` writes an ensemble folder that `fipray attack` serves and attacks unchanged."""
    out = tmp_path / "run"
    assert main(["robust", "--smoke-test", "--no-progress", "--config", str(CONFIG), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert "fip_robust" in s["methods"] and s["goals"]["fip_robust"]["gradient_evals"] > 0
    folder = out / "ensembles" / "fip_robust_seed0"
    assert main(["attack", "--smoke-test", "--ensemble", str(folder), "--out", str(tmp_path / "attack")]) == 0
    rows = json.loads((tmp_path / "attack" / "summary.json").read_text())["rows"]
    assert [r["eps"] for r in rows] == [0.1] and all(0 <= r["whitebox"] <= r["clean"] for r in rows)
