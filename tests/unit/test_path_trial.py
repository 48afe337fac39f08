"""Path trials (the unit PBT moves, no Ray): stretches resume bit-exactly, an exploit continues the leader's
path with new values and is that path replayed, the lineage travels with the checkpoint, scores never read
the test split, and a finished path trial scores what the sweep trial reports."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from fipray.config import ConfigError
from fipray.core.distances import get_distance
from fipray.job import job_from_dict
from fipray.operation import get_operation
from fipray.path import run_path
from fipray.path_trial import PathTrial, lineage_summary, run_schedule
from fipray.units import run_trial, trial_context

CONTINUAL = {"operation": "continual", "seeds": [0], "threads": 1,
             "data": {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}},
             "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 40},
             "path": {"lam": 10.0, "steps": 20, "record_every": 10, "checkpoint_every": 20},
             "continual": {"num_tasks": 5, "memory_per_task": 10}}
ENSEMBLE = {"operation": "ensemble", "seeds": [0], "threads": 1,
            "data": {"name": "digits", "kwargs": {"seed": 0, "test_fraction": 0.25}},
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 40},
            "path": {"lam": 1.0, "steps": 40},
            "ensemble": {"members": 2, "sample_every": 10, "pgd_steps": 2, "eval_examples": 50}}
SCORES = ("acc_mean", "task_acc_mean", "bwt_mean")


def _cfg(base=CONTINUAL, **over):
    return job_from_dict(base, over).cfg


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stretches_saved_and_restored_end_on_the_uninterrupted_path_and_score_the_sweep_trial(tmp_path):
    cfg = _cfg()
    whole = PathTrial(cfg, tmp_path / "whole")
    assert whole.total_steps == 80
    last = whole.advance(10**6)
    assert whole.done and last["path_step"] == 80
    # The same path in stretches of 30 steps (ending mid-phase, at a phase boundary, at the end), each stretch in
    # a fresh trial restored from the last one's save.
    t = PathTrial(cfg, tmp_path / "w0")
    mid = None
    for i in range(3):
        m = t.advance(30)
        mid = mid or t.state_dicts()[0]
        t.save(tmp_path / f"ck{i}")
        t = PathTrial(cfg, tmp_path / f"w{i + 1}")
        t.restore(tmp_path / f"ck{i}")
    assert t.done and m["path_step"] == 80
    assert _equal(t.state_dicts()[0], whole.state_dicts()[0])
    assert not _equal(mid, whole.state_dicts()[0])  # not vacuous: the stretches moved the network
    assert {k: m[k] for k in SCORES} == {k: last[k] for k in SCORES}
    # A finished path trial scores exactly what the sweep's trial (validation split) reports last.
    reports = []
    run_trial(cfg, reports.append)
    assert {k: last[k] for k in SCORES} == {k: reports[-1][k] for k in SCORES}
    assert last["grad_evals"] == reports[-1]["grad_evals"] == 40 + 80  # base network + path


def test_an_exploit_continues_the_leaders_path_with_new_values_and_keeps_adam_moments(tmp_path):
    cfg = _cfg()
    new = {"path.lam": 30.0, "path.lr": 0.004}
    leader = PathTrial(cfg, tmp_path / "a", trial_id="a", params={"path.lam": 10.0, "path.lr": 0.001})
    leader.advance(30)  # mid-phase (task 2, step 10): the optimizer state is resumed, not fresh
    leader.save(tmp_path / "a30")
    weak_cfg = cfg.replace(**{"path.lam": 1.0})
    weak = PathTrial(weak_cfg, tmp_path / "b", trial_id="b", params={"path.lam": 1.0, "path.lr": 0.001})
    weak.advance(30)
    weak.restore(tmp_path / "a30")
    assert _equal(weak.state_dicts()[0], leader.state_dicts()[0])  # the leader's path ...
    weak.set_params(new)  # ... with new values from here on
    assert [(s["trial_id"], s["parent"], s["forked_at_step"], s["params"]) for s in weak.lineage] == [
        ("a", None, 0, {"path.lam": 10.0, "path.lr": 0.001}), ("b", "a", 30, new)]
    weak.advance(10**6)
    leader.advance(10**6)
    assert not _equal(weak.state_dicts()[0], leader.state_dicts()[0])  # the new values changed the path
    # Reference built by hand: the leader's checkpoint at step 30 with only the learning rate edited in its
    # optimizer state (Adam's moments kept), resumed by run_path with the new config's phases.
    ref = tmp_path / "ref"
    shutil.copytree(tmp_path / "a30" / "seed0", ref)
    ckpt = torch.load(ref / "checkpoint.pt", weights_only=True)
    assert ckpt["optimizer"]["state"]  # Adam moments exist at the fork
    for g in ckpt["optimizer"]["param_groups"]:
        g["lr"] = new["path.lr"]
    torch.save(ckpt, ref / "checkpoint.pt")
    ncfg = cfg.replace(**new)
    ctx = trial_context(ncfg)
    model = ctx.model(0)
    phases = get_operation("continual").path(ctx, model, 0)[0]
    run_path(model, phases, out_dir=ref, record_every=10**9, checkpoint_every=10**9,
             distance=get_distance(ncfg.path.distance))
    assert _equal(model.state_dict(), weak.state_dicts()[0])
    # The lineage replayed as one path is the same path too.
    _, replayed = run_schedule(cfg, weak.lineage, tmp_path / "replay", every=25)
    assert _equal(replayed.state_dicts()[0], weak.state_dicts()[0])


def test_the_lineage_travels_with_the_checkpoint(tmp_path):
    cfg = _cfg(**{"continual.num_tasks": 2})
    a = PathTrial(cfg, tmp_path / "a", trial_id="a", params={"path.lam": 10.0})
    a.advance(10)
    a.save(tmp_path / "a10")
    b = PathTrial(cfg, tmp_path / "b", trial_id="b", params={"path.lam": 10.0})
    b.restore(tmp_path / "a10")
    b.set_params({"path.lam": 12.0})
    b.advance(10)
    b.save(tmp_path / "b20")
    b.restore(tmp_path / "b20")  # its own checkpoint again (a restarted trial): no new segment
    c = PathTrial(cfg, tmp_path / "c", trial_id="c", params={"path.lam": 12.0})
    c.restore(tmp_path / "b20")
    assert c.params == {"path.lam": 12.0} and c.step == 20
    assert [(s["trial_id"], s["parent"], s["forked_at_step"]) for s in c.lineage] == [
        ("a", None, 0), ("b", "a", 10), ("c", "b", 20)]
    assert lineage_summary(c.lineage) == {"parent": "b", "forked_at": 20, "forks": 2}
    assert lineage_summary(a.lineage) == {"parent": "", "forked_at": -1, "forks": 0}
    c.set_params({"path.lam": 12.0})  # unchanged values: nothing to record
    c.set_params({"path.lam": 8.0})
    assert c.lineage[-1] == {"trial_id": "c", "parent": "b", "forked_at_step": 20, "params": {"path.lam": 8.0}}


def test_scores_never_read_the_test_split(tmp_path):
    from fipray.data import DataBundle
    from fipray.runtime import load_bundle

    cfg = _cfg(**{"continual.num_tasks": 2})
    bundle = load_bundle(cfg)
    x, y = (torch.stack([bundle.test[i][k] if k == 0 else torch.as_tensor(bundle.test[i][k])
                         for i in range(len(bundle.test))]) for k in (0, 1))
    g = torch.Generator().manual_seed(0)
    scrambled = torch.utils.data.TensorDataset(torch.rand(x.shape, generator=g), y[torch.randperm(len(y), generator=g)])
    other = dataclasses.replace(bundle, test=scrambled)
    got = [PathTrial(cfg, tmp_path / str(i), bundle=b).advance(10**6) for i, b in enumerate((bundle, other))]
    assert {k: got[0][k] for k in SCORES} == {k: got[1][k] for k in SCORES}
    assert isinstance(other, DataBundle) and not torch.equal(scrambled.tensors[1], y)  # not vacuous


def test_an_ensemble_path_trial_in_stretches_scores_the_sweep_trial(tmp_path):
    cfg = _cfg(ENSEMBLE)
    t = PathTrial(cfg, tmp_path / "w", eps=0.1)
    for i in range(2):
        m = t.advance(20)
        t.save(tmp_path / f"ck{i}")
        t = PathTrial(cfg, tmp_path / f"w{i}", eps=0.1)
        t.restore(tmp_path / f"ck{i}")
    reports = []
    run_trial(cfg, reports.append, eps=0.1)
    assert {k: m[k] for k in ("whitebox", "clean", "transfer")} == {
        k: reports[-1][k] for k in ("whitebox", "clean", "transfer")}


@pytest.mark.parametrize("over, kw, match", [
    ({"operation": "sparsify"}, {}, "path trials run continual, ensemble"),
    ({}, {"method": "er"}, "follows FIP paths, not 'er'"),
])
def test_what_a_path_trial_refuses(tmp_path, over, kw, match):
    with pytest.raises(ConfigError, match=match):
        PathTrial(_cfg(**over), tmp_path, **kw)


def test_new_values_that_change_the_paths_schedule_are_refused(tmp_path):
    t = PathTrial(_cfg(**{"continual.num_tasks": 2}), tmp_path)
    t.advance(10)
    t.set_params({"path.steps": 30})
    with pytest.raises(ConfigError, match="change the phases of the path"):
        t.advance(10)
