"""`--smoke-test` of the Ray commands (`fipray paths|serve|attack`) through the one CLI runner.

`jobs/sweep.py --smoke-test` runs in test_job_submit.py (through `ray job submit`).

The session's Ray is already running (fixture), so each command joins it and leaves it running
(a command stops only the Ray it started itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _ensembles import free_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "jobs" / "configs"


@pytest.fixture(scope="module")
def paths_run(ray_2cpus, tmp_path_factory):
    """`fipray paths --smoke-test` on the shipped ensemble config: 2 paths, merged table and ensemble."""
    from fipray.cli import main

    out = tmp_path_factory.mktemp("paths")
    assert main(["paths", "--smoke-test", "--no-progress", "--config", str(CONFIGS / "ensemble_digits.yaml"),
                 "--out", str(out)]) == 0
    return out


def test_paths_smoke_test(paths_run, ray_2cpus):
    s = json.loads((paths_run / "summary.json").read_text())
    assert s["num_paths"] == 2 and s["seeds"] == [0, 1]
    assert s["ensemble_members"] == 4  # 2 paths x (40 steps / sample_every 20)
    assert s["streamed_rows_match_table"] is True
    assert ray_2cpus.is_initialized()  # the command joined the session's Ray and left it running


def test_serve_smoke_test_answers_one_request(paths_run, ray_2cpus, capsys):
    from fipray.cli import main

    assert main(["serve", "--smoke-test", "--ensemble", str(paths_run / "ensemble"), "--shards", "2",
                 "--port", str(free_port())]) == 0
    # Ray may print its own log lines to stdout too; the answer is the line the command printed.
    answer = json.loads(next(line for line in capsys.readouterr().out.splitlines() if '"smoke_test"' in line))
    assert answer["smoke_test"] == "ok" and len(answer["labels"]) == 1 and answer["members"] == 4
    assert ray_2cpus.is_initialized()


def test_attack_smoke_test(paths_run, ray_2cpus, tmp_path, capsys):
    from fipray.cli import main

    # The paths' ensemble folder sits beside the run's config.yaml; the smoke test attacks 20 examples.
    assert main(["attack", "--smoke-test", "--ensemble", str(paths_run / "ensemble"),
                 "--config", str(paths_run / "config.yaml"), "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["eval_examples"] == 20 and s["pgd_steps"] == 2 and [r["eps"] for r in s["rows"]] == [0.1]
    assert 0.0 <= s["rows"][0]["whitebox"] <= s["rows"][0]["clean"]
    assert ray_2cpus.is_initialized()


def test_paths_refuses_an_operation_without_paths(ray_2cpus, tmp_path, capsys):
    from fipray.cli import main

    assert main(["paths", "--config", str(CONFIGS / "spectrum_digits.yaml"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'spectrum' has no FIP paths" in err and "continual" in err
