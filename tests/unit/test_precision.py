"""Mixed precision and gradient accumulation in the supervised and FIP phases (CPU autocast)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fipray.config import load_config
from fipray.core.distances import get_distance
from fipray.path import run_path
from fipray.phases import fip_phase, supervised_phase
from fipray.runtime import build_model

SPEC = {"name": "mlp", "kwargs": {"hidden": [32]}, "num_classes": 10, "input_shape": [1, 8, 8]}


@pytest.fixture(scope="module")
def data(digits):
    from fipray.data import as_tensors

    x, y = as_tensors(digits.train)
    return x, y.long()


def _train(data, overrides, steps=20):
    x, y = data
    cfg = load_config(None, [f"train.steps={steps}", "train.batch_size=64", "train.lr=0.01", *overrides])
    model = build_model(SPEC, 0, torch.device("cpu"))
    res = run_path(model, [supervised_phase("base", x, y, cfg.train, 0)], record_every=1)
    return model, res


def _fip(data, base, overrides, steps=10, **kw):
    x, y = data
    cfg = load_config(None, [f"path.steps={steps}", "path.batch_size=64", "path.memory_batch_size=96", "path.lr=0.01",
                             *overrides])
    model = copy.deepcopy(base)
    phase = fip_phase("fip", cfg.path, 0, memory=x[:300], new_data=(x, y),
                      secondary=lambda m, lg, xb, yb, s: F.cross_entropy(lg, yb))
    return model, run_path(model, [phase], record_every=1, distance=get_distance("bhattacharyya"), **kw)


def _max_diff(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_accumulation_is_the_same_update_in_fp32(data):
    one, r1 = _train(data, [])
    four, r4 = _train(data, ["train.accumulate=4"])
    assert _max_diff(one, four) < 1e-5  # same batch, summed in 4 micro-batches: rounding only
    assert r4.records[-1]["secondary"] == pytest.approx(r1.records[-1]["secondary"], rel=1e-4)
    f1, s1 = _fip(data, one, [])
    f3, s3 = _fip(data, one, ["path.accumulate=3"])
    assert _max_diff(f1, f3) < 1e-5
    assert s3.records[-1]["distance"] == pytest.approx(s1.records[-1]["distance"], rel=1e-3)
    assert s3.records[-1]["secondary"] == pytest.approx(s1.records[-1]["secondary"], rel=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_close_to_fp32(data, precision):
    ref, rr = _train(data, [], steps=40)
    half, rh = _train(data, [f"train.precision={precision}"], steps=40)
    assert all(p.dtype == torch.float32 for p in half.parameters())  # master weights stay float32
    assert rh.records[-1]["secondary"] == pytest.approx(rr.records[-1]["secondary"], rel=0.1)
    assert _max_diff(ref, half) > 0  # not vacuous: autocast really changed the arithmetic
    f, rf = _fip(data, half, [f"path.precision={precision}", "path.accumulate=2"])
    assert torch.isfinite(torch.tensor(rf.records[-1]["objective"]))
    assert rf.records[-1]["distance"] >= 0


def test_fp16_resume_keeps_the_grad_scaler_state(data, tmp_path):
    base, _ = _train(data, [])

    class Stop(Exception):
        pass

    def cut(event, payload):
        if event == "checkpoint" and payload["global_step"] == 6:
            raise Stop

    fp16 = ["path.precision=fp16"]
    ref, _ = _fip(data, base, fp16, out_dir=tmp_path / "ref", checkpoint_every=3)
    with pytest.raises(Stop):
        _fip(data, base, fp16, out_dir=tmp_path / "cut", checkpoint_every=3, callback=cut)
    from fipray.path import load_checkpoint

    scaler_state = load_checkpoint(tmp_path / "cut")["phase_state"]["grad_scaler"]  # checkpointed with the phase
    assert scaler_state["scale"] > 0
    resumed, res = _fip(data, base, fp16, out_dir=tmp_path / "cut", checkpoint_every=3)
    assert res.resumed_from == 6
    assert _max_diff(ref, resumed) == 0.0
