"""Checkpoints that survive damage, divergence stops, resume messages, the base network resumed, path.steps=0.

A tiny MLP walks 12 steps on digits (checkpoints every 4, a sample every 3); each test damages, interrupts or
diverges it and compares with the uninterrupted walk, tensor for tensor (torch.equal).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fipray.checkpoints import CHECKPOINT, read_checkpoint
from fipray.config import ConfigError, load_config
from fipray.core.distances import get_distance
from fipray.eval.compute import StepCounter
from fipray.ops.ensemble import undirected_phase
from fipray.path import PathDiverged, load_checkpoint, run_path
from fipray.runtime import build_model, train_base

STEPS, EVERY, SAMPLE = 12, 4, 3


class Interrupt(Exception):
    """Raised from the callback: a killed run."""


@pytest.fixture(scope="module")
def setting(digits):
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.kwargs={hidden: [16]}", "train.steps=20", "train.batch_size=32",
                             f"path.steps={STEPS}", "path.beta=0", "path.lr=0.01", "path.memory_batch_size=64",
                             f"ensemble.sample_every={SAMPLE}"])
    x, y = digits.train.tensors if hasattr(digits.train, "tensors") else _tensors(digits)
    spec = {"name": "mlp", "kwargs": {"hidden": [16]}, "num_classes": 10, "input_shape": [1, 8, 8]}
    base = build_model(spec, 0, torch.device("cpu"))
    train_base(base, x[:400], y[:400], cfg, 0)
    return cfg, x[:400], y[:400], base


def _tensors(bundle):
    from fipray.data import as_tensors

    x, y = as_tensors(bundle.train)
    return x, y.long()


def _walk(setting, out_dir, callback=None, cfg=None, progress=None, keep=2):
    cfg0, x, y, base = setting
    cfg = cfg or cfg0
    return run_path(copy.deepcopy(base), [undirected_phase(x, y, cfg, 3)], out_dir=out_dir, record_every=EVERY,
                    checkpoint_every=EVERY, distance=get_distance("bhattacharyya"), callback=callback,
                    progress=progress, keep_checkpoints=keep)


def _stop_at(step):
    def cb(event, payload):
        if event == "checkpoint" and payload["global_step"] >= step:
            raise Interrupt(payload["global_step"])
    return cb


def _interrupted(setting, out_dir, step=8):
    with pytest.raises(Interrupt):
        _walk(setting, out_dir, callback=_stop_at(step))


@pytest.fixture(scope="module")
def reference(setting, tmp_path_factory):
    return _walk(setting, tmp_path_factory.mktemp("ref"))


def _assert_equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _assert_same_samples(res, ref):
    assert [s["step"] for s in res.samples] == [s["step"] for s in ref.samples] == [3, 6, 9, 12]
    for i in range(len(ref.samples)):
        a, b = res.sample_state(i), ref.sample_state(i)
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_keeps_the_last_checkpoints(setting, tmp_path):
    _interrupted(setting, tmp_path)
    files = sorted(p.name for p in tmp_path.glob("checkpoint*"))
    assert files == ["checkpoint.1.pt", CHECKPOINT]
    assert read_checkpoint(tmp_path / CHECKPOINT)["global_step"] == 8
    assert read_checkpoint(tmp_path / "checkpoint.1.pt")["global_step"] == 4
    _walk(setting, tmp_path / "three", keep=3)
    steps = [read_checkpoint(tmp_path / "three" / n)["global_step"] for n in (CHECKPOINT, "checkpoint.1.pt",
                                                                              "checkpoint.2.pt")]
    assert steps == [12, 8, 4]
    _walk(setting, tmp_path / "one", keep=1)
    assert [p.name for p in (tmp_path / "one").glob("checkpoint*")] == [CHECKPOINT]


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "emptied": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "text": (lambda p: p.write_text("model: my weights\n"), "not a fipray checkpoint"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_one_before(setting, reference, tmp_path, capsys, damage):
    _interrupted(setting, tmp_path)
    hurt, reason = DAMAGE[damage]
    hurt(tmp_path / CHECKPOINT)
    capsys.readouterr()
    res = _walk(setting, tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    named = [ln for ln in lines if str(tmp_path / CHECKPOINT) in ln and reason in ln]
    assert len(named) == 1, lines  # one line names the file and why
    assert "weights_only" not in "\n".join(lines) and "Traceback" not in "\n".join(lines)
    assert any("resuming path" in ln and "from step 4 of 12" in ln for ln in lines), lines
    assert (tmp_path / (CHECKPOINT + ".corrupt")).is_file()
    assert res.resumed_from == 4
    _assert_equal_models(res.model, reference.model)
    _assert_same_samples(res, reference)
    assert res.records == reference.records


@pytest.mark.parametrize("which", ["newest only", "both checkpoints"])
def test_damaged_sample_moves_its_checkpoints_aside(setting, reference, tmp_path, capsys, which):
    _interrupted(setting, tmp_path)  # checkpoint.pt (step 8) lists samples 3 and 6; checkpoint.1.pt (4) sample 3
    sample = tmp_path / "samples" / ("undirected-6.safetensors" if which == "newest only" else
                                     "undirected-3.safetensors")
    _truncate(sample)
    capsys.readouterr()
    res = _walk(setting, tmp_path)
    err = capsys.readouterr().err
    assert f"sample {sample}" in err and "truncated" in err
    assert sample.with_name(sample.name + ".corrupt").is_file()
    assert (tmp_path / (CHECKPOINT + ".corrupt")).is_file()
    if which == "newest only":
        assert res.resumed_from == 4 and "from step 4 of 12" in err
    else:
        assert res.resumed_from is None and "starting the path over" in err
    _assert_equal_models(res.model, reference.model)
    _assert_same_samples(res, reference)


def test_checksum_catches_a_changed_checkpoint(setting, reference, tmp_path, capsys):
    _interrupted(setting, tmp_path)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name] + 1.0  # loads fine, but is not what was written
    torch.save(ckpt, tmp_path / CHECKPOINT)
    assert load_checkpoint(tmp_path)["global_step"] == 4  # the public reader skips it too (moving nothing)
    capsys.readouterr()
    res = _walk(setting, tmp_path)
    assert "checksum mismatch" in capsys.readouterr().err
    assert res.resumed_from == 4
    _assert_equal_models(res.model, reference.model)


def _diverging(setting, out_dir):
    from fipray.phases import cross_entropy_secondary, fip_phase

    cfg, x, y, base = setting
    cfg = cfg.replace(**{"path.lr": 1e12, "path.optimizer": "sgd", "path.lam": 2.0, "path.beta": 1.0})
    phase = fip_phase("task1", cfg.path, 3, memory=x, secondary=cross_entropy_secondary, new_data=(x, y))
    return run_path(copy.deepcopy(base), [phase], out_dir=out_dir, record_every=1, checkpoint_every=1)


def test_divergence_stops_with_one_line_and_keeps_the_checkpoints(setting, tmp_path):
    with pytest.raises(PathDiverged) as exc:
        _diverging(setting, tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "diverged at step 2" in msg and "λ=2" in msg and "β=1" in msg and "η=1e+12" in msg
    assert "seed 3" in msg and "'task1'" in msg and str(tmp_path) in msg
    assert isinstance(exc.value, ConfigError)  # the CLI prints it as `fipray: error: ...`, exit 2
    assert [r["step"] for r in exc.value.result.records] == [1]  # the records so far
    ckpt = load_checkpoint(tmp_path)  # the checkpoint before the divergence is kept, finite; none after it
    assert ckpt is not None and ckpt["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    with pytest.raises(PathDiverged, match="diverged at step 2"):  # a rerun resumes there and stops the same
        _diverging(setting, tmp_path)


class _Bar:
    disable = False

    def __init__(self):
        self.lines = []

    def update(self, n):
        pass

    def set_postfix(self, d):
        pass

    def write(self, line, file=None):
        self.lines.append(line)


def test_a_resumed_run_says_so(setting, tmp_path, capsys):
    _interrupted(setting, tmp_path)
    bar = _Bar()
    _walk(setting, tmp_path, progress=bar)
    assert bar.lines == [f"resuming path {tmp_path} from step 8 of {STEPS}"]
    again = _Bar()
    _walk(setting, tmp_path, progress=again)
    assert again.lines == [f"path {tmp_path} already finished ({STEPS} steps): loaded"]
    capsys.readouterr()
    _walk(setting, tmp_path)  # no progress display: nothing printed
    assert capsys.readouterr().err == ""


def test_base_network_resumes_instead_of_retraining(setting, tmp_path):
    cfg, x, y, _ = setting
    cfg = cfg.replace(**{"path.checkpoint_every": 5})
    spec = {"name": "mlp", "kwargs": {"hidden": [16]}, "num_classes": 10, "input_shape": [1, 8, 8]}
    ref = build_model(spec, 1, torch.device("cpu"))
    train_base(ref, x, y, cfg, 1)

    class Stop(Exception):
        pass

    class Killer(_Bar):
        def __init__(self):
            super().__init__()
            self.n = 0

        def update(self, n):
            self.n += n
            if self.n == 12:
                raise Stop

    cut = build_model(spec, 1, torch.device("cpu"))
    with pytest.raises(Stop):  # killed at step 12 of 20: checkpoint at 10
        train_base(cut, x, y, cfg, 1, progress=Killer(), out_dir=tmp_path)
    with StepCounter() as c:
        again = build_model(spec, 1, torch.device("cpu"))
        train_base(again, x, y, cfg, 1, out_dir=tmp_path)
    assert c.steps == 10  # the missing steps only
    _assert_equal_models(again, ref)
    with StepCounter() as c:  # finished: loaded, nothing trained
        third = build_model(spec, 1, torch.device("cpu"))
        train_base(third, x, y, cfg, 1, out_dir=tmp_path)
    assert c.steps == 0
    _assert_equal_models(third, ref)


def test_an_experiment_rerun_does_not_retrain_its_base(tmp_path):
    from fipray.experiments import run_experiment

    cfg = load_config(None, ["operation=continual", "threads=1", "model.kwargs={hidden: [16]}", "train.steps=15",
                             "path.steps=6", "path.checkpoint_every=4", "continual.num_tasks=2",
                             "continual.baselines=[]", "continual.memory_per_task=5", "path.heldout=16"])
    with StepCounter() as first:
        a = run_experiment(cfg, tmp_path, progress=False)
    assert first.steps == 15 + 6
    assert (tmp_path / "paths" / cfg.run_id() / "base" / "seed0" / CHECKPOINT).is_file()
    with StepCounter() as second:
        b = run_experiment(cfg, tmp_path, progress=False)
    assert second.steps == 0
    assert a["methods"]["fip"]["acc_mean"] == b["methods"]["fip"]["acc_mean"]


@pytest.mark.parametrize("overrides, ok", [
    (["operation=continual", "path.steps=0"], False),
    (["operation=sparsify", "path.steps=0"], False),
    (["operation=continual", "path.steps=0", "continual.epochs=1"], True),  # tasks last epochs, not steps
    (["path.steps=0"], True),  # no operation yet: nothing runs
    (["operation=continual", "path.keep_checkpoints=0"], False),
])
def test_path_steps_zero_is_refused_where_paths_have_work(overrides, ok):
    if ok:
        load_config(None, overrides)
        return
    with pytest.raises(ConfigError, match="path.steps|path.keep_checkpoints"):
        load_config(None, overrides)
