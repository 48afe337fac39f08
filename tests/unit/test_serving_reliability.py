"""A server never starts on, nor switches to, a folder it cannot serve; smoke reports raise no false alarms.

Without Ray: ``verify_ensemble`` (what ``fipray serve``, ``fipray attack`` and a live switch check before
touching anything), the start-up refusals of the command line (the folder, a taken ``--port``) before Ray
could start, and the sanity-flag verdicts of smoke-size runs.
"""

from __future__ import annotations

import json
import math
import socket
import time

import pytest
import torch
from _ensembles import random_ensemble

from fipray.ensemble_folder import MEMBERS_FILE, META_FILE, load_ensemble, verify_ensemble
from fipray.eval.robustness import NOT_EVALUATED, SANITY_FLAGS, mark_not_evaluated, smoke_size

SHAPE = (1, 8, 8)
CNN = {"width": 0.5, "fc": 32}


@pytest.fixture
def folder(tmp_path):
    return random_ensemble(tmp_path / "ens", "small_cnn", CNN, SHAPE, num_classes=10, members=3)


def _truncate(folder, keep: float = 0.6) -> None:
    path = folder / MEMBERS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_verify_accepts_a_good_folder_and_matches_load(folder):
    meta = verify_ensemble(folder)
    assert meta["num_members"] == 3
    assert len(load_ensemble(folder).members) == 3  # the shared reading code still loads


def test_verify_names_the_file_and_cause_of_a_truncated_or_flipped_member_file(folder):
    _truncate(folder)
    with pytest.raises(ValueError) as e:
        verify_ensemble(folder)
    msg = _one_line_error(e)
    assert str(folder / MEMBERS_FILE) in msg and "SHA-256 mismatch" in msg
    # A flipped byte of an otherwise complete file: the same cause.
    good = random_ensemble(folder.parent / "b", "small_cnn", CNN, SHAPE, num_classes=10, members=2)
    data = bytearray((good / MEMBERS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (good / MEMBERS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        verify_ensemble(good)


def test_verify_refuses_a_spec_the_members_do_not_fit_in_one_line(folder):
    meta = json.loads((folder / META_FILE).read_text())
    meta["model_spec"]["kwargs"]["fc"] = 48  # the weights were saved for fc=32
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        verify_ensemble(folder)
    msg = _one_line_error(e)
    assert "member 0" in msg and "does not fit model 'small_cnn'" in msg and "size mismatch" in msg


def test_verify_refuses_a_recorded_tokenizer_that_is_missing(folder):
    meta = json.loads((folder / META_FILE).read_text())
    meta["tokenizer"] = "tokenizer"
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        verify_ensemble(folder)


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start Ray fails the test (the refusals must come first)."""
    import fipray.ray.local

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(fipray.ray.local, "init_local", refuse)
    monkeypatch.setattr("fipray.ray.serve_main.init_local", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_serve_and_attack_refuse_a_corrupt_folder_before_ray_in_one_line(folder, no_ray, capsys):
    from fipray.cli import main

    _truncate(folder)
    for argv in (["serve", "--ensemble", str(folder), "--port", "1"],
                 ["attack", "--ensemble", str(folder), "--config", "jobs/configs/ensemble_digits.yaml"]):
        t0 = time.perf_counter()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fipray: error: "), err
        assert MEMBERS_FILE in err and "SHA-256 mismatch" in err
        assert time.perf_counter() - t0 < 10


def test_serve_refuses_a_taken_port_before_ray(folder, no_ray, capsys):
    from fipray.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--ensemble", str(folder), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err, err


# Smoke-size sanity flags ----------------------------------------------------------------------------------------
def test_smoke_size_is_too_few_examples_or_too_weak_an_attack():
    assert "50 examples < 100" in smoke_size(50, 20)
    assert "2-step PGD" in smoke_size(300, 2)
    assert smoke_size(100, 10) is None and smoke_size(250, 20) is None


def _flags(**over) -> dict:
    return {"flags": {k: over.get(k, True) for k in SANITY_FLAGS}, "measured": {"tol": 0.01}}


def test_marked_flags_are_none_with_the_reason_and_gradients_still_judged():
    out = mark_not_evaluated(_flags(acc_decreases_with_eps=False, nonzero_input_gradients=False), "tiny")
    assert out["flags"]["acc_decreases_with_eps"] is None and out["flags"]["nonzero_input_gradients"] is False
    assert out["measured"]["not_evaluated"]["reason"] == "tiny" and out["measured"]["tol"] == 0.01


def _ensemble_rows(n: int, steps: int, deep_flags: dict) -> tuple:
    from fipray.config import load_config

    cfg = load_config("jobs/configs/ensemble_digits.yaml", ["seeds=[0]", "ensemble.members=2",
                                                             f"ensemble.pgd_steps={steps}", f"ensemble.eval_examples={n}"])
    eps = list(cfg.ensemble.eps)
    result = {"clean": 0.3, "clean_full_test": 0.3, "member_clean_mean": 0.3, "member_clean_min": 0.3,
              "diversity": 0.0, "coherence": 1.0, "disagreement": 0.0, "seconds": 1.0, "gradient_steps": 1,
              **{f"member_whitebox_{e:g}": 0.1 for e in eps}}
    rows = {"results": [{"method": m, "seed": 0, **result} for m in ("fip", "deep")],
            "robustness": [{"method": m, "seed": 0, "eps": e, "whitebox": 0.1, "transfer": 0.2, "autoattack": math.nan,
                            "n": n, "steps": steps} for m in ("fip", "deep") for e in eps],
            "sanity": [("fip", _flags()), ("deep", deep_flags)], "geometry": [], "path": [], "review": []}
    return cfg, rows


def test_ensemble_smoke_report_has_no_failed_flag_and_a_full_run_keeps_its_verdicts(tmp_path):
    from fipray.ops.ensemble_report import aggregate, write_report
    from fipray.runtime import RunContext

    deep = _flags(acc_decreases_with_eps=False)  # what a 50-example smoke run measured (one example = 0.02)
    cfg, rows = _ensemble_rows(50, 2, deep)
    summary = aggregate(cfg, ["fip", "deep"], rows, 50)
    assert summary["sanity"]["deep"]["acc_decreases_with_eps"] is None
    assert summary["sanity"]["deep"]["nonzero_input_gradients"] is True
    assert "50 examples < 100" in summary["sanity_not_evaluated"]
    ctx = RunContext.create(cfg, out=tmp_path, device="cpu")
    write_report(ctx, summary, rows)
    md = (tmp_path / "report.md").read_text()
    flags_md = md.split("## Sanity flags")[1]
    assert "FAILED" not in flags_md and NOT_EVALUATED in flags_md

    cfg, rows = _ensemble_rows(250, 20, deep)  # the same measurement in a full-size run is a real failure
    summary = aggregate(cfg, ["fip", "deep"], rows, 250)
    assert summary["sanity"]["deep"]["acc_decreases_with_eps"] is False and "sanity_not_evaluated" not in summary


def test_attack_smoke_table_lists_every_flag_as_not_evaluated():
    from fipray.ray.attack import attack_table

    rows = [{"eps": 0.1, "clean": 0.9, "whitebox": 0.5, "transfer": 0.6, "steps": 2, "n": 20}]
    flags = mark_not_evaluated({"flags": {}, "measured": {}}, "not computed in a smoke test", SANITY_FLAGS)
    md = attack_table(rows, flags, None).split("## Sanity flags")[1]
    assert all(f"| {k} | {NOT_EVALUATED} |" in md for k in SANITY_FLAGS), md
    assert "not computed in a smoke test" in md and "FAILED" not in md
    assert "| acc_decreases_with_eps | FAILED |" in attack_table(rows, _flags(acc_decreases_with_eps=False), None)


def test_verify_holds_one_member_at_a_time(folder, monkeypatch):
    """verify_ensemble builds members in turn (a server checks a large ensemble without holding it twice)."""
    import fipray.ensemble_folder as ef

    alive: list = []
    real = ef._build_member

    def counting(*a, **k):
        alive[:] = [r for r in alive if r() is not None]
        assert not alive, "a member built earlier is still held"
        import weakref

        m = real(*a, **k)
        alive.append(weakref.ref(m))
        return m

    monkeypatch.setattr(ef, "_build_member", counting)
    torch.manual_seed(0)
    verify_ensemble(folder)
