"""Scale check of `fipray spectrum`: top-20 eigenvalues of g for a ≥ 1M-parameter CNN on 256 points
within minutes on a 2-core CPU (the issue's acceptance: under 5 minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fipray.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_spectrum_top20_of_a_1m_parameter_cnn(tmp_path):
    out = tmp_path / "cnn"
    rc = main(["spectrum", "--config", str(ROOT / "jobs/configs/spectrum_cnn1m.yaml"), "--out", str(out),
               "--no-progress", "spectrum.slq_probes=0"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_params"] >= 1_000_000 and s["num_points"] == 256
    assert len(s["top_eigenvalues"]) == 20
    print(f"top-20 spectrum of the 1M-parameter CNN: {s['top_eigen_seconds']:.1f} s")  # reported, not asserted
    # Converged: every Ritz value within 1e-3 relative of an eigenvalue.
    assert max(r / v for r, v in zip(s["residual_bounds"], s["top_eigenvalues"])) < 1e-3
