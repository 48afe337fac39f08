"""A new operation defined in this file alone runs through every entry point (the Operation protocol).

The toy operation shrinks the weights along a FIP: L = ‖w‖² (weight `toy_shrink.weight`), invariance on
the training inputs. It is registered here, run through `run_experiment`, the per-path unit that
`fipray paths` runs in each Ray worker (without Ray), the sweep trial function and the CLI, and
unregistered afterwards. No other file knows it exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fipray.config import ConfigError, knob, load_config
from fipray.eval.predict import accuracy
from fipray.operation import Operation, Report, get_operation, register_operation, unregister_operation
from fipray.path import Phase, run_path
from fipray.phases import fip_phase
from fipray.runtime import RunContext, clone, train_base, write_outputs

TINY = ["seeds=[0, 1]", "model.kwargs={hidden: [32]}", "train.steps=150", "path.steps=40", "path.lr=0.003",
        "path.record_every=10", "path.checkpoint_every=20", "path.beta=0.002", "path.memory_batch_size=128",
        "threads=1"]


@dataclass(frozen=True)
class ShrinkConfig:
    weight: float = knob(1.0, gt=0)


def sq_norm(model: nn.Module) -> float:
    return float(sum(p.detach().pow(2).sum() for p in model.parameters()))


@torch.no_grad()
def scaling_drift(base: nn.Module, ratio: float, x: Tensor) -> float:
    """Output distance of w0 scaled uniformly to the same squared norm: the naive way to shrink."""
    from fipray.core.distances import get_distance

    scaled = clone(base)
    for p in scaled.parameters():
        p.mul_(ratio ** 0.5)
    return float(get_distance("bhattacharyya")(scaled(x), base(x)))


def shrink_phase(ctx: RunContext, x: Tensor, seed: int) -> Phase:
    w = ctx.cfg.toy_shrink.weight

    def secondary(model: nn.Module, logits: Any, xb: Any, yb: Any, state: dict) -> Tensor:
        return w * sum(p.pow(2).sum() for p in model.parameters())

    return fip_phase("shrink", ctx.cfg.path, seed, memory=x, secondary=secondary)


class Shrink(Operation):
    name = "toy_shrink"
    help = "shrink the weights along a FIP (a test operation)"
    section = ShrinkConfig
    metrics = ("norm_ratio", "accuracy")
    smoke = ("seeds=[0]", "train.steps=20", "path.steps=10", "path.record_every=5", "path.checkpoint_every=5")
    supports_paths = True

    def run(self, ctx: RunContext) -> dict:
        rows = []
        (x, y), (xt, yt) = ctx.train_tensors(), ctx.test_tensors()
        with ctx.progress(len(ctx.cfg.seeds) * (ctx.cfg.train.steps + ctx.cfg.path.steps), self.name):
            for seed in ctx.cfg.seeds:
                base = ctx.model(seed)
                train_base(base, x, y, ctx.cfg, seed, progress=ctx.bar)
                model = clone(base)
                res = run_path(model, [shrink_phase(ctx, x, seed)], out_dir=ctx.checkpoint_dir(f"seed{seed}"),
                               **ctx.path_kwargs(xt[:64], lambda m: {"accuracy": accuracy(m, xt, yt)}))
                rows.append({"seed": seed, "norm_before": sq_norm(base), "norm_after": sq_norm(model),
                             "accuracy_before": accuracy(base, xt, yt), "accuracy_after": accuracy(model, xt, yt),
                             "drift": res.records[-1]["heldout_distance"],
                             "scaling_drift": scaling_drift(base, sq_norm(model) / sq_norm(base), xt[:64])})
        summary = {"operation": self.name, "rows": rows}
        write_outputs(ctx.out, ctx.cfg, summary, {"results": rows}, "# toy shrink\n")
        return summary

    def brief(self, summary: dict) -> dict:
        return {"norm_after": [round(r["norm_after"], 3) for r in summary["rows"]]}

    def path(self, ctx: RunContext, model: nn.Module, seed: int, *, rank: int = 0, world: int = 1):
        x = ctx.train_tensors()[0][rank::world]
        return [shrink_phase(ctx, x, seed)], {"heldout": ctx.test_tensors()[0][:64]}

    def trial(self, ctx: RunContext, report: Report, **options: Any) -> None:
        (x, y), (xt, yt) = ctx.train_tensors(), ctx.test_tensors()
        for seed in ctx.cfg.seeds:
            base = ctx.model(seed)
            train_base(base, x, y, ctx.cfg, seed)
            model = clone(base)
            run_path(model, [shrink_phase(ctx, x, seed)], record_every=10**9, checkpoint_every=10**9)
            report({"norm_ratio": sq_norm(model) / sq_norm(base), "accuracy": accuracy(model, xt, yt), "seed": seed})


@pytest.fixture
def toy():
    register_operation(Shrink)
    try:
        yield Shrink
    finally:
        unregister_operation(Shrink)
    with pytest.raises(ConfigError, match="unknown operation 'toy_shrink'"):
        get_operation("toy_shrink")


def test_config_gains_and_validates_the_toy_section(toy):
    cfg = load_config(None, ["operation=toy_shrink", "toy_shrink.weight=0.5"])
    assert cfg.toy_shrink.weight == 0.5
    with pytest.raises(ConfigError, match="'toy_shrink.weight' must be > 0"):
        load_config(None, ["operation=toy_shrink", "toy_shrink.weight=0"])
    # The default of the new section leaves every other config's run id alone.
    assert load_config(None, ["operation=toy_shrink"]).run_id() == load_config(
        None, ["operation=toy_shrink", "toy_shrink.weight=1.0"]).run_id()


def test_toy_runs_through_run_experiment(toy, tmp_path):
    from fipray.experiments import run_experiment

    cfg = load_config(None, ["operation=toy_shrink", *TINY])
    summary = run_experiment(cfg, tmp_path, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text())["operation"] == "toy_shrink"
    assert (tmp_path / "results.parquet").is_file() and (tmp_path / "config.yaml").is_file()
    for r in summary["rows"]:
        assert r["norm_after"] < 0.6 * r["norm_before"]  # L pulled the weights in ...
        assert r["drift"] < 0.02  # ... while the outputs stayed near w0's (Bhattacharyya on held-out inputs),
        assert r["scaling_drift"] > 5 * r["drift"]  # far nearer than shrinking w0 uniformly to the same norm
        assert r["accuracy_after"] > r["accuracy_before"] - 0.1


def test_toy_runs_through_the_path_unit(toy, tmp_path):
    from fipray.units import load_final, load_path_result, run_one_path, train_shared_base

    cfg = load_config(None, ["operation=toy_shrink", *TINY])
    base_file = train_shared_base(cfg, tmp_path / "storage")
    for k in (0, 1):
        res = run_one_path(cfg, k, base_file, tmp_path / f"path{k}")
        assert res["seed"] == cfg.seeds[0] + k and res["steps"] == cfg.path.steps
        assert load_path_result(tmp_path / f"path{k}")["records"] == res["records"] > 0
    from safetensors.torch import load_file

    w0 = load_file(str(base_file))
    finals = [load_final(tmp_path / f"path{k}") for k in (0, 1)]
    for fin in finals:
        assert sum(float(v.pow(2).sum()) for v in fin.values()) < sum(float(v.pow(2).sum()) for v in w0.values())
    # Paths k = 0, 1 have their own seeds (batches), so they end at different weights.
    assert any(not torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


def test_toy_runs_through_the_sweep_trial(toy):
    from fipray.units import run_trial, trial_iterations

    cfg = load_config(None, ["operation=toy_shrink", *TINY])
    got: list[dict] = []
    run_trial(cfg, got.append, eps=0.0, target=0.0)
    assert len(got) == trial_iterations(cfg) == 2
    assert all(0 < r["norm_ratio"] < 0.9 for r in got)


def test_toy_is_a_cli_command_with_a_smoke_test(toy, tmp_path, capsys):
    from fipray.cli import main

    assert main(["toy_shrink", "--smoke-test", "--no-progress", "--out", str(tmp_path), "model.kwargs={hidden: [16]}"]) == 0
    out = capsys.readouterr().out
    assert "norm_after" in out
    assert load_config(tmp_path / "config.yaml").seeds == (0,)  # the smoke overrides were applied


def test_sweep_config_validates_the_toy_metrics(toy):
    from fipray.job import job_from_dict

    job = job_from_dict({"operation": "toy_shrink", "sweep": {"metric": "norm_ratio",
                                                              "search": {"path.beta": {"choice": [0.1, 0.2]}}}})
    assert job.sweep.metric == "norm_ratio"
    with pytest.raises(ConfigError, match="never report 'acc_mean'; they report norm_ratio, accuracy"):
        job_from_dict({"operation": "toy_shrink", "sweep": {"metric": "acc_mean"}})
