"""`fipray continual|sparsify|ensemble`: exit code 2 with a clear message on bad input, tiny end-to-end runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fipray.cli import main
from fipray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "jobs" / "configs"


def _fail(capsys, argv) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert "Traceback" not in captured.err
    return captured.err


def test_bad_key_exits_2_naming_it(capsys, tmp_path):
    err = _fail(capsys, ["continual", "--no-progress", "--out", str(tmp_path / "o"), "path.lamda=1"])
    assert "fipray: error" in err
    assert "path.lamda" in err
    assert "lam" in err and "beta" in err  # valid keys listed
    assert not (tmp_path / "o").exists()  # nothing written for a rejected config


def test_bad_value_exits_2_naming_it(capsys, tmp_path):
    err = _fail(capsys, ["sparsify", "--no-progress", "--out", str(tmp_path / "o"), "path.lr=abc"])
    assert "path.lr" in err and "abc" in err
    err = _fail(capsys, ["ensemble", "--no-progress", "--out", str(tmp_path / "o"), "path.distance=cosine"])
    assert "cosine" in err and "bhattacharyya" in err


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf"])
def test_non_finite_numbers_exit_2_naming_the_key(capsys, tmp_path, value):
    err = _fail(capsys, ["continual", "--no-progress", "--out", str(tmp_path / "o"), f"path.lam={value}"])
    assert "'path.lam': expected a finite number" in err
    assert not (tmp_path / "o").exists()


def test_a_config_of_another_operation_is_refused_naming_both(capsys, tmp_path):
    err = _fail(capsys, ["sparsify", "--config", str(CONFIGS / "continual_digits.yaml"), "--no-progress",
                         "--out", str(tmp_path / "o")])
    assert "is 'continual', but this is `fipray sparsify`" in err and "fipray continual --config" in err
    bad = tmp_path / "frob.yaml"
    bad.write_text("operation: frobnicate\n")
    err = _fail(capsys, ["continual", "--config", str(bad), "--no-progress", "--out", str(tmp_path / "o")])
    assert "'frobnicate'" in err and "`fipray continual`" in err and "continual, ensemble" in err
    assert not (tmp_path / "o").exists()
    # An explicit operation= override is the user's word: the file runs as the subcommand.
    assert main(["continual", "--smoke-test", "--config", str(bad), "--no-progress", "--out", str(tmp_path / "o"),
                 "operation=continual", "path.steps=4", "train.steps=4"]) == 0


def test_bad_override_syntax_exits_2(capsys, tmp_path):
    err = _fail(capsys, ["continual", "--no-progress", "--out", str(tmp_path / "o"), "path.lam"])
    assert "key=value" in err


def test_missing_config_file_exits_2_naming_it(capsys, tmp_path):
    missing = tmp_path / "nowhere.yaml"
    err = _fail(capsys, ["continual", "--config", str(missing), "--no-progress", "--out", str(tmp_path / "o")])
    assert str(missing) in err


def test_unknown_dataset_and_model_exit_2(capsys, tmp_path):
    err = _fail(capsys, ["continual", "--no-progress", "--out", str(tmp_path / "a"), "data.name=mnist_nope"])
    assert "mnist_nope" in err and "digits" in err
    err = _fail(capsys, ["continual", "--no-progress", "--out", str(tmp_path / "b"), "model.name=resnet_nope",
                         "train.steps=1"])
    assert "resnet_nope" in err and "mlp" in err


def test_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sparsfy"])
    assert e.value.code == 2
    assert "sparsfy" in capsys.readouterr().err


def _run_ok(capsys, argv) -> str:
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0
    return out


def _finite_unit(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0


CONTINUAL = ["seeds=[0]", "train.steps=20", "path.steps=10", "continual.num_tasks=2",
             "continual.baselines=[naive]", "model.kwargs={hidden: [32]}"]


def test_continual_end_to_end(capsys, tmp_path):
    out = tmp_path / "run"
    stdout = _run_ok(capsys, ["continual", "--config", str(ROOT / "jobs/configs/continual_digits.yaml"),
                              "--no-progress", "--out", str(out), *CONTINUAL])
    for name in ("config.yaml", "summary.json", "report.md", "results.parquet", "accuracy_matrix.parquet",
                 "path.parquet", "path_accuracy.png", "accuracy_matrix.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "summary.json").read_text())
    assert s["setting"] == "class"
    assert s["memory_per_task"] == 20
    assert s["seeds"] == [0]
    assert set(s["methods"]) == {"fip", "naive"}
    assert _finite_unit(s["methods"]["fip"]["acc_mean"])
    assert _finite_unit(s["methods"]["naive"]["acc_mean"])
    # The report printed to stdout is the written one.
    assert (out / "report.md").read_text().strip() in stdout
    # The config written is the one run, with the overrides applied.
    from fipray.config import load_config

    cfg = load_config(out / "config.yaml")
    assert cfg.continual.num_tasks == 2 and cfg.path.steps == 10 and cfg.operation == "continual"
    # Accuracy matrix: 2x2 per method and setting, entries in [0, 1].
    m = pq.read_table(out / "accuracy_matrix.parquet").to_pylist()
    fip_class = [r for r in m if r["method"] == "fip" and r["setting"] == "class" and r["i"] >= 0]
    assert sorted((r["i"], r["j"]) for r in fip_class) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(0.0 <= r["acc"] <= 1.0 for r in m)
    steps = [r["step"] for r in pq.read_table(out / "path.parquet").to_pylist() if r["method"] == "fip"]
    assert steps and steps == sorted(set(steps))


def test_continual_rerun_resumes_to_the_same_summary(capsys, tmp_path):
    argv = ["continual", "--no-progress", "--out", str(tmp_path), *CONTINUAL]
    _run_ok(capsys, argv)
    first = json.loads((tmp_path / "summary.json").read_text())
    _run_ok(capsys, argv)  # the FIP path finds its finished checkpoint
    second = json.loads((tmp_path / "summary.json").read_text())
    for m in ("fip", "naive"):
        assert second["methods"][m]["acc_mean"] == first["methods"][m]["acc_mean"]
        assert second["methods"][m]["bwt_mean"] == first["methods"][m]["bwt_mean"]


def test_sparsify_end_to_end(capsys, tmp_path):
    out = tmp_path / "run"
    _run_ok(capsys, ["sparsify", "--no-progress", "--out", str(out), "seeds=[0]", "train.steps=20",
                     "path.steps=10", "sparsify.targets=[0.5, 0.9]", "sparsify.invariance_steps=5",
                     "sparsify.baselines=[magnitude]", "model.kwargs={hidden: [32]}"])
    for name in ("config.yaml", "summary.json", "report.md", "results.parquet", "path.parquet"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert set(s["methods"]) == {"fip", "magnitude"}
    for method in ("fip", "magnitude"):
        for p in ("0.5", "0.9"):
            r = s["methods"][method][p]
            assert abs(r["sparsity"] - float(p)) <= 1e-3, (method, p, r["sparsity"])
            assert _finite_unit(r["accuracy_mean"])
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert {(r["method"], r["target"]) for r in rows} == {(m, p) for m in ("fip", "magnitude") for p in (0.5, 0.9)}


def test_ensemble_end_to_end(capsys, tmp_path):
    out = tmp_path / "run"
    _run_ok(capsys, ["ensemble", "--no-progress", "--out", str(out), "seeds=[0]", "train.steps=20",
                     "path.steps=20", "ensemble.members=2", "ensemble.sample_every=5", "ensemble.eps=[0.1]",
                     "ensemble.pgd_steps=2", "ensemble.eval_examples=20", "ensemble.baselines=[base]",
                     "model.kwargs={hidden: [32]}"])
    for name in ("config.yaml", "summary.json", "report.md", "results.parquet", "path.parquet"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["members"] == 2
    assert set(s["methods"]) == {"fip", "base"}
    for m in ("fip", "base"):
        assert _finite_unit(s["methods"][m]["whitebox"]["0.1"])
        assert _finite_unit(s["methods"][m]["transfer"]["0.1"])
        assert _finite_unit(s["methods"][m]["clean_mean"])
    ens = out / "ensembles"
    assert ens.is_dir()
    folders = [p for p in ens.iterdir() if p.is_dir()]
    assert [p.name for p in folders] == ["fip_seed0"]
    assert any(folders[0].iterdir())
    from fipray.ensemble_folder import load_ensemble

    loaded = load_ensemble(folders[0])
    assert len(loaded.members) == 2


@pytest.mark.parametrize("overrides,needle", [
    (["continual.num_tasks=3"], "continual"),
    (["continual.memory_per_task=1000"], "continual.memory_per_task"),
])
def test_continual_values_checked_against_the_data_exit_2(capsys, tmp_path, overrides, needle):
    err = _fail(capsys, ["continual", "--no-progress", "--out", str(tmp_path), "train.steps=1", *overrides])
    assert needle in err


def test_ensemble_evaluates_a_loaded_folder(capsys, tmp_path):
    """`fipray ensemble --ensemble DIR` takes an existing folder's networks as the FIP candidates."""
    tiny = ["seeds=[0]", "train.steps=20", "path.steps=20", "ensemble.sample_every=5", "ensemble.eps=[0.1]",
            "ensemble.pgd_steps=2", "ensemble.eval_examples=20", "ensemble.baselines=[base]",
            "model.kwargs={hidden: [32]}"]
    first = tmp_path / "first"
    _run_ok(capsys, ["ensemble", "--no-progress", "--out", str(first), "ensemble.members=3", *tiny])
    folder = first / "ensembles" / "fip_seed0"
    again = tmp_path / "again"
    _run_ok(capsys, ["ensemble", "--no-progress", "--out", str(again), "--ensemble", str(folder),
                     "ensemble.members=2", *tiny])
    s = json.loads((again / "summary.json").read_text())
    assert s["loaded_from"] == str(folder) and s["members"] == 2
    # No walk was run: under paths/ only the base network's checkpoint folder (w0 is trained into it).
    assert {p.name for p in (again / "paths").glob("*/*")} == {"base"}
    meta = json.loads((again / "ensembles" / "fip_seed0" / "ensemble.json").read_text())
    first_steps = json.loads((folder / "ensemble.json").read_text())["metadata"]["steps"]
    assert set(meta["metadata"]["steps"]) <= set(first_steps)
    # A folder of another architecture is refused, naming the key.
    err = _fail(capsys, ["ensemble", "--no-progress", "--out", str(tmp_path / "bad"), "--ensemble", str(folder),
                         "ensemble.members=2", *tiny, "model.name=lenet_300_100", "model.kwargs={}"])
    assert "ensemble.load" in err


def test_too_few_samples_for_the_ensemble_exit_2(capsys, tmp_path):
    err = _fail(capsys, ["ensemble", "--no-progress", "--out", str(tmp_path), "path.steps=10",
                         "ensemble.members=3", "ensemble.sample_every=5"])
    assert "ensemble.members" in err and "ensemble.sample_every" in err


def test_delta_admitting_too_few_members_exit_2(capsys, tmp_path):
    err = _fail(capsys, ["ensemble", "--no-progress", "--out", str(tmp_path), "seeds=[0]", "train.steps=5",
                         "path.steps=10", "ensemble.members=2", "ensemble.sample_every=5", "ensemble.delta=1e-12",
                         "ensemble.baselines=[base]", "ensemble.eps=[0.1]", "ensemble.pgd_steps=1",
                         "ensemble.eval_examples=10", "model.kwargs={hidden: [16]}"])
    assert "ensemble.delta" in err


def test_every_command_has_a_smoke_test_flag():
    from fipray.cli import _parser, commands

    table = commands()
    assert {"continual", "sparsify", "ensemble", "spectrum", "compose", "paths", "sweep", "query", "serve",
            "attack"} <= set(table)
    parser = _parser(table)
    for name in table:
        argv = [name, "--smoke-test"] + (["--ensemble", "x"] if name in ("serve", "attack") else []) + \
            (["--set", "x", "--data", "digits"] if name == "query" else []) + (["list"] if name == "data" else [])
        assert parser.parse_args(argv).smoke_test is True


def _shipped_config(op: str) -> Path:
    """The shipped digits config of operation `op`: `<op>_digits.yaml`, else the digits config (not a sweep)
    that names it as its `operation` or as its `ensemble.fip` (robust: ensemble_robust_digits.yaml)."""
    if (CONFIGS / f"{op}_digits.yaml").is_file():
        return CONFIGS / f"{op}_digits.yaml"
    from fipray.config import read_yaml_mapping

    for f in sorted(CONFIGS.glob("*digits*.yaml")):
        raw = read_yaml_mapping(f)
        if "sweep" not in raw and op in (raw.get("operation"), (raw.get("ensemble") or {}).get("fip")):
            return f
    raise AssertionError(f"operation {op!r} is registered but ships no digits config in {CONFIGS}")


def _registered_operations() -> list[str]:
    from fipray.operation import operation_classes

    return sorted(operation_classes())


@pytest.mark.parametrize("op", _registered_operations())
def test_operation_smoke_test_on_the_shipped_config(op, capsys, tmp_path):
    """`fipray <op> --smoke-test --config <shipped>` for every registered operation (discovered from the
    registry): the whole command in seconds, one seed."""
    from fipray.config import read_yaml_mapping

    config = _shipped_config(op)
    out = tmp_path / op
    assert main([op, "--smoke-test", "--no-progress", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    brief = json.loads(printed.strip().splitlines()[-1])
    assert brief
    summary = json.loads((out / "summary.json").read_text())
    # `robust` runs the ensemble comparison with its FIP (the summary is the ensemble operation's).
    assert summary["operation"] in (op, read_yaml_mapping(config)["operation"])
    if op == "robust":
        assert "fip_robust" in brief, brief
    assert load_config(out / "config.yaml").seeds == (0,)
    if op == "compose":  # the smoke test still builds a set with sparse end nodes, which query can rank
        assert summary["num_nodes"] > 1
        assert all(abs(v["sparsity"] - load_config(out / "config.yaml").compose.target) < 1e-3
                   for v in summary["orders"].values())
        assert main(["query", "--smoke-test", "--set", str(out / "set"), "--data", "digits"]) == 0
        ranking = json.loads((out / "set" / "query-digits" / "summary.json").read_text())
        assert ranking["num_points"] == 50 and ranking["num_networks"] == summary["num_nodes"]
