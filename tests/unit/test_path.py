"""run_path: phases in order, records, checkpoints, and exact resumption after an interruption."""

from __future__ import annotations

import copy

import pytest
import torch

from fipray.config import load_config
from fipray.core.distances import get_distance
from fipray.eval.continual import accuracy_along_path
from fipray.ops.continual import build_tasks, fip_continual_phases
from fipray.path import CHECKPOINT, load_checkpoint, run_path
from fipray.runtime import build_model, train_base

STEPS = 12  # per phase; two phases -> 24 global steps
RECORD_EVERY = 4
CHECKPOINT_EVERY = 5


class Interrupt(Exception):
    """Raised by the test callback to simulate a killed run."""


@pytest.fixture(scope="module")
def setting(digits):
    cfg = load_config(None, [
        "continual.num_tasks=3", "continual.classes_per_task=2", "continual.memory_per_task=10",
        "model.kwargs={hidden: [32]}", "train.steps=30", "train.batch_size=32",
        f"path.steps={STEPS}", "path.batch_size=32", "path.lr=0.01",
        f"path.record_every={RECORD_EVERY}", f"path.checkpoint_every={CHECKPOINT_EVERY}",
    ])
    dev = torch.device("cpu")
    tasks = build_tasks(cfg, digits, dev, 0)
    assert len(tasks) == 3
    spec = {"name": "mlp", "kwargs": {"hidden": [32]}, "num_classes": 10, "input_shape": [1, 8, 8]}
    base = build_model(spec, 0, dev)
    train_base(base, tasks[0].x_train, tasks[0].y_train, cfg, 0)
    heldout = tasks[0].x_test[:64]
    return cfg, tasks, base, heldout


def _run(setting, out_dir, callback=None, model=None, phases=None):
    cfg, tasks, base, heldout = setting
    model = copy.deepcopy(base) if model is None else model
    phases = fip_continual_phases(tasks, cfg, 0) if phases is None else phases
    return run_path(model, phases, out_dir=out_dir, record_every=cfg.path.record_every,
                    checkpoint_every=cfg.path.checkpoint_every, heldout=heldout,
                    distance=get_distance(cfg.path.distance), evaluate=accuracy_along_path(tasks),
                    callback=callback)


@pytest.fixture(scope="module")
def reference(setting, tmp_path_factory):
    """The uninterrupted run."""
    events = []
    res = _run(setting, tmp_path_factory.mktemp("ref"), callback=lambda e, p: events.append((e, dict(p))))
    return res, events


def _interrupt_after(threshold):
    seen = []

    def cb(event, payload):
        seen.append((event, payload.get("global_step")))
        if event == "checkpoint" and payload["global_step"] > threshold:
            raise Interrupt(payload["global_step"])

    return cb, seen


def _assert_same_state(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=f"tensor {k} differs")


def _assert_records_equal(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            if isinstance(g[k], float):
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), (k, g["step"])
            else:
                assert g[k] == w[k], (k, g["step"])


def test_reference_run_shape(setting, reference):
    res, events = reference
    assert res.steps == 2 * STEPS
    assert res.resumed_from is None
    steps = [r["step"] for r in res.records]
    # Every RECORD_EVERY global steps plus each phase end, never twice.
    assert steps == [4, 8, 12, 16, 20, 24]
    assert [r["phase"] for r in res.records] == ["task1"] * 3 + ["task2"] * 3
    assert set(res.phase_results) == {"task1", "task2"}
    for row in res.phase_results.values():
        assert set(row) == {"class", "task"}
        assert len(row["class"]) == 3
        assert all(0.0 <= a <= 1.0 for a in row["class"] + row["task"])
    r = res.records[-1]
    for key in ("objective", "distance", "secondary", "weight_distance", "fip_length", "heldout_distance",
                "acc_task0", "acc_task1", "acc_task2"):
        assert key in r
    # The path moved, and its length is at least the chord.
    assert r["weight_distance"] > 0
    assert r["fip_length"] >= r["weight_distance"] - 1e-6
    ck = [p["global_step"] for e, p in events if e == "checkpoint"]
    assert ck == [5, 10, 12, 15, 20, 24]  # every 5 plus each phase boundary


@pytest.mark.parametrize("threshold", [0, 11, 12])
def test_resumed_run_matches_uninterrupted(setting, reference, tmp_path, threshold):
    # threshold 0: killed mid phase 1 (step 5); 11: at the phase-1 boundary checkpoint (12);
    # 12: mid phase 2 (global 15).
    ref, _ = reference
    cb, seen = _interrupt_after(threshold)
    with pytest.raises(Interrupt) as exc:
        _run(setting, tmp_path, callback=cb)
    stopped = exc.value.args[0]
    assert stopped == {0: 5, 11: 12, 12: 15}[threshold]
    ck = load_checkpoint(tmp_path)
    assert ck is not None and ck["global_step"] == stopped

    cfg, tasks, base, _ = setting
    fresh = copy.deepcopy(base)  # a new process would start from w0 again
    phases = fip_continual_phases(tasks, cfg, 0)
    calls = []
    for ph in phases:
        inner = ph.step
        ph.step = lambda m, o, t, st, inner=inner, name=ph.name: calls.append((name, t)) or inner(m, o, t, st)
    res = _run(setting, tmp_path, model=fresh, phases=phases)
    assert len(calls) == 2 * STEPS - stopped  # only the missing steps run
    assert len(set(calls)) == len(calls)
    assert res.resumed_from == stopped
    assert res.steps == ref.steps
    assert res.model is fresh
    _assert_same_state(fresh, ref.model, atol=0)
    steps = [r["step"] for r in res.records]
    assert all(b > a for a, b in zip(steps, steps[1:])), steps  # no repeated rows
    _assert_records_equal(res.records, ref.records)
    assert [r["fip_length"] for r in res.records] == [r["fip_length"] for r in ref.records]  # to the last bit
    assert res.phase_results == ref.phase_results


def test_finished_run_rerun_is_a_noop(setting, reference, tmp_path):
    ref, _ = reference
    first = _run(setting, tmp_path)
    _assert_same_state(first.model, ref.model)
    calls = []
    cfg, tasks, base, _ = setting
    phases = fip_continual_phases(tasks, cfg, 0)
    for ph in phases:
        inner = ph.step
        ph.step = lambda *a, inner=inner: calls.append(1) or inner(*a)
        ph.prepare = lambda m: calls.append("prepare") or {}
    events = []
    again = _run(setting, tmp_path, model=copy.deepcopy(base), phases=phases,
                 callback=lambda e, p: events.append(e))
    assert calls == []  # no step, no prepare
    assert events == []
    assert again.steps == first.steps == 2 * STEPS
    _assert_records_equal(again.records, first.records)
    assert again.phase_results == first.phase_results
    _assert_same_state(again.model, first.model, atol=0)


def test_checkpoint_from_other_phase_list_is_refused(setting, tmp_path):
    cfg, tasks, base, _ = setting
    _run(setting, tmp_path)
    assert (tmp_path / CHECKPOINT).is_file()
    other = fip_continual_phases(tasks, cfg, 0)[:1]  # only "task1"
    with pytest.raises(RuntimeError, match="phases"):
        _run(setting, tmp_path, phases=other)
    renamed = fip_continual_phases(tasks, cfg, 0)
    renamed[1].name = "task9"
    with pytest.raises(RuntimeError, match="task9"):
        _run(setting, tmp_path, phases=renamed)


def test_duplicate_phase_names_are_refused(setting):
    cfg, tasks, base, _ = setting
    phases = fip_continual_phases(tasks, cfg, 0)
    phases[1].name = phases[0].name
    with pytest.raises(ValueError, match="unique"):
        _run(setting, None, phases=phases)


def test_without_out_dir_nothing_is_written_and_result_is_same(setting, reference, tmp_path, monkeypatch):
    ref, _ = reference
    monkeypatch.chdir(tmp_path)
    events = []
    res = _run(setting, None, callback=lambda e, p: events.append(e))
    assert "checkpoint" not in events
    assert list(tmp_path.iterdir()) == []
    _assert_same_state(res.model, ref.model)


def test_foreign_checkpoint_is_moved_aside_and_the_path_starts_over(setting, reference, tmp_path, capsys):
    # The only checkpoint is not one (tests/unit/test_checkpoints.py: damage to one of several).
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    res = _run(setting, tmp_path)
    err = capsys.readouterr().err
    assert "not a fipray checkpoint" in err and "starting the path over" in err
    assert "weights_only" not in err
    assert (tmp_path / (CHECKPOINT + ".corrupt")).read_bytes() == b"not a checkpoint"
    assert res.resumed_from is None
    _assert_same_state(res.model, reference[0].model, atol=0)


def _interrupted_then_resumed(build_model_copy, build_phases, out_dir, threshold, **kw):
    cb, _ = _interrupt_after(threshold)
    with pytest.raises(Interrupt) as exc:
        run_path(build_model_copy(), build_phases(), out_dir=out_dir, callback=cb, **kw)
    return exc.value.args[0], run_path(build_model_copy(), build_phases(), out_dir=out_dir, **kw)


def test_undirected_walk_resumes_with_the_same_samples(setting, tmp_path):
    from fipray.ops.ensemble import undirected_phase

    cfg0, tasks, base, heldout = setting
    cfg = cfg0.replace(**{"path.steps": 20, "path.beta": 0.0, "ensemble.sample_every": 5,
                          "path.memory_batch_size": 64})
    x, y = tasks[0].x_train, tasks[0].y_train
    kw = dict(record_every=4, checkpoint_every=7, heldout=heldout, distance=get_distance("bhattacharyya"))
    ref = run_path(copy.deepcopy(base), [undirected_phase(x, y, cfg, 3)], out_dir=tmp_path / "ref", **kw)
    stopped, res = _interrupted_then_resumed(lambda: copy.deepcopy(base), lambda: [undirected_phase(x, y, cfg, 3)],
                                             tmp_path / "cut", 7, **kw)
    assert stopped == 14
    assert [s["step"] for s in res.samples] == [s["step"] for s in ref.samples] == [5, 10, 15, 20]
    for i in range(len(ref.samples)):
        a, b = res.sample_state(i), ref.sample_state(i)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # Samples are files beside the checkpoint, which lists them instead of embedding their weights.
    assert all((tmp_path / "cut" / s["file"]).is_file() and "state" not in s for s in res.samples)
    ckpt = load_checkpoint(tmp_path / "cut")
    assert [s["file"] for s in ckpt["samples"]] == [s["file"] for s in res.samples]
    _assert_same_state(res.model, ref.model, atol=1e-6)
    _assert_records_equal(res.records, ref.records)
    # The walk really moved (so the comparison is not trivially between copies of w0).
    assert ref.records[-1]["weight_distance"] > 1e-3


def test_masked_sparsify_phase_resumes_with_the_same_masks(setting, tmp_path):
    from fipray.core.step import Anchor
    from fipray.eval.sparsity import sparsity
    from fipray.ops.sparsify import counted, fip_sparsify_phases

    cfg0, tasks, base, heldout = setting
    cfg = cfg0.replace(**{"path.steps": 6, "sparsify.invariance_steps": 8})
    x = tasks[0].x_train
    names = counted(base)
    anchor = Anchor.from_model(base, x)

    def phases():
        return fip_sparsify_phases(x, anchor, 0.7, cfg, 0, names)

    kw = dict(record_every=3, checkpoint_every=4)
    ref = run_path(copy.deepcopy(base), phases(), out_dir=tmp_path / "ref", **kw)
    stopped, res = _interrupted_then_resumed(lambda: copy.deepcopy(base), phases, tmp_path / "cut", 6, **kw)
    assert stopped == 8  # inside the masked phase, whose masks come from the checkpoint
    _assert_same_state(res.model, ref.model, atol=1e-6)
    assert sparsity(res.model, names) == sparsity(ref.model, names)
    assert abs(sparsity(ref.model, names) - 0.7) < 1e-3
    assert res.phase_results == ref.phase_results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda(setting, tmp_path, digits):
    cfg, _, base, _ = setting
    dev = torch.device("cuda")
    tasks = build_tasks(cfg, digits, dev, 0)
    heldout = tasks[0].x_test[:64]

    def go(callback=None):
        return run_path(copy.deepcopy(base).to(dev), fip_continual_phases(tasks, cfg, 0), out_dir=tmp_path,
                        record_every=cfg.path.record_every, checkpoint_every=cfg.path.checkpoint_every,
                        heldout=heldout, distance=get_distance(cfg.path.distance), callback=callback)

    cb, _ = _interrupt_after(12)
    with pytest.raises(Interrupt):
        go(cb)
    res = go()
    assert res.steps == 2 * STEPS
