"""End-to-end runs of the configs on real networks: pretrained MiniLM-L6 on BBC News, a timm ViT and a
BatchNorm CNN on digits (opt-in: -m slow; about 40 minutes in all on the 2-core CPU box).

Each test runs its shipped config as it stands and checks properties that must hold whatever the
numbers: exact sparsity, a well-formed spectrum, passing sanity flags, a metric-step phase that runs to
the end. Wall times are printed (benchmarks/results/real_configs.md quotes them), never asserted.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from fipray.config import load_config
from fipray.experiments import run_experiment

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

# The MiniLM continual check of real_configs.md: two tasks of two BBC topics, a few metric steps.
METRIC_STEP_CHECK = ("seeds=[0]", "continual.num_tasks=2", "continual.classes_per_task=2",
                     "continual.memory_per_task=16", "continual.baselines=[naive]", "train.steps=10",
                     "path.step=metric", "path.cg_iters=3", "path.trust_radius=0.2", "path.steps=20",
                     "path.batch_size=8", "path.memory_batch_size=8", "path.heldout=32", "path.record_every=5")


def _run(name: str, out: Path, *overrides: str, operation: str | None = None) -> dict:
    over = list(overrides) + ([f"operation={operation}"] if operation else [])
    t0 = time.perf_counter()
    run_experiment(load_config(ROOT / "jobs/configs" / f"{name}.yaml", over), out, progress=False)
    print(f"{name}{' ' + ' '.join(over) if over else ''}: {time.perf_counter() - t0:.0f} s")
    return json.loads((out / "summary.json").read_text())


def test_sparsify_bbc_minilm(tmp_path):
    s = _run("sparsify_bbc_minilm", tmp_path)
    assert set(s["methods"]) == {"fip", "magnitude", "magnitude_ft", "wanda"} and len(s["seeds"]) == 2
    # The counted tensors are exactly the encoder's 36 Linear weights (6 layers x q, k, v, o, up, down).
    assert len(s["counted"]) == 36 and all(n.startswith("model.bert.encoder.layer.") for n in s["counted"])
    assert s["dense_accuracy"] > 0.85
    for method, per_p in s["methods"].items():
        assert list(per_p) == s["targets"] == ["0.5", "0.7", "0.9"]
        for p, v in per_p.items():
            # Every seed's network is exactly p-sparse over the 10.6M counted weights (min and max over seeds).
            assert abs(v["sparsity"] - float(p)) <= 1e-6 and abs(v["sparsity_max"] - float(p)) <= 1e-6, (method, p)
            assert 0.0 <= v["accuracy_mean"] <= 1.0


def test_spectrum_minilm(tmp_path):
    s = _run("spectrum_minilm", tmp_path)
    top = s["top_eigenvalues"]
    assert s["num_params"] > 22_000_000 and s["num_points"] == load_config(
        ROOT / "jobs/configs/spectrum_minilm.yaml").spectrum.points
    assert len(top) == 10 and all(math.isfinite(v) for v in top)
    assert top == sorted(top, reverse=True) and top[0] > 0
    assert all(math.isfinite(r) and r >= 0 for r in s["residual_bounds"])


def test_continual_minilm_metric_step(tmp_path):
    """One FIP phase with the metric step (Krylov trust region, 3 g·v products a step) on MiniLM runs to the
    end: 20 steps of ‖dw‖ = 0.2 from the network trained on two topics, learning two more."""
    s = _run("sparsify_bbc_minilm", tmp_path, *METRIC_STEP_CHECK, operation="continual")
    assert s["num_tasks"] == 2 and set(s["methods"]) == {"fip", "naive"}
    for method, v in s["methods"].items():
        assert 0.0 <= v["acc_mean"] <= 1.0 and math.isfinite(v["bwt_mean"]), method
    # Every metric step has ‖dw‖ = trust_radius, so the recorded length (records every 5 steps) is at most 20 x 0.2.
    assert 0 < s["fip_path"]["fip_length"] <= 20 * 0.2 + 1e-3
    assert math.isfinite(s["fip_path"]["heldout_distance_mean"])


def test_ensemble_digits_vit(tmp_path):
    s = _run("ensemble_digits_vit", tmp_path)
    m = s["methods"]
    assert set(m) == {"fip", "deep", "base"} and s["members"] == 10
    for name, v in m.items():
        assert s["sanity"][name] and all(s["sanity"][name].values()), (name, s["sanity"][name])
        wb = [v["whitebox"][e] for e in s["eps"]]
        assert all(a >= b - 0.01 for a, b in zip(wb, wb[1:])) and wb[0] <= v["clean_mean"], (name, wb)
    # The walk keeps the function: every FIP member is about as accurate as w0 (full test set).
    assert abs(m["fip"]["member_clean_mean"] - m["base"]["clean_full_test_mean"]) <= 0.02
    assert m["fip"]["member_clean_min"] >= m["base"]["clean_full_test_mean"] - 0.03
    assert (tmp_path / "ensembles" / "fip_seed0" / "ensemble.json").is_file()


def test_continual_digits_bn(tmp_path):
    s = _run("continual_digits_bn", tmp_path)
    m = s["methods"]
    assert s["setting"] == "class" and set(m) == {"fip", "naive", "er", "ewc"} and len(s["seeds"]) == 3
    assert m["fip"]["acc_mean"] > m["naive"]["acc_mean"]


def test_continual_bbc_minilm(tmp_path):
    s = _run("continual_bbc_minilm", tmp_path)
    m = s["methods"]
    assert s["stream"] == "datasets" and s["head"] == "multi" and s["num_tasks"] == 2 and len(s["seeds"]) == 2
    assert list(m) == ["fip", "naive", "er", "derpp", "lora_r8", "lora_r2", "joint"]
    for name, v in m.items():
        assert len(v["final_task_accuracy"]) == 2 and v["weight_change"]["all"] > 0, name
    # The base network learned task 0 (3 topics), and every method learned something of task 1 (2 topics).
    R0 = m["joint"]["final_task_accuracy"]
    assert R0[0] >= 0.8 and R0[1] >= 0.7
    assert (tmp_path / "weight_pca.png").is_file()
