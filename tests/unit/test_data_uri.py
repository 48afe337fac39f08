"""Datasets named by URIs: `parquet`, `text_parquet`, `text_csv` read from an S3 bucket (moto's server on
127.0.0.1, tests/ray/_moto.py) give exactly what the same files give locally, through every layout
(`train=`/`test=` files, `path=` a prefix of split files, `path=` one file with a split column); the node cache is
filled once and safely by two processes at once; bad URIs fail in one line naming them; and `fipray sparsify` /
`fipray continual` runs on `data.kwargs.path=s3://...` report the numbers of the local files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch

from fipray.config import ConfigError, load_config
from fipray.data import get_data
from fipray.experiments import run_experiment
from fipray.runtime import load_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ray"))
from _moto import BUCKET, moto_s3  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["ball", "goal", "match", "vote", "law", "party", "film", "song", "stage", "chip", "phone", "web"]


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private node cache per test (never ~/.cache)."""
    monkeypatch.setenv("FIPRAY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _put(s3: dict, local: Path, key: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=f"http://{s3['endpoint']}").upload_file(str(local), BUCKET, key)
    return s3["uri"](key)


@pytest.fixture(scope="module")
def digits(tmp_path_factory, s3):
    """sklearn digits (1,000 train / 300 test rows) as local files in three layouts, and the same in the bucket."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data[:1300].astype(np.float32), d.target[:1300].astype(np.int64)
    cols = {f"p{i}": x[:, i] for i in range(64)}
    root = tmp_path_factory.mktemp("digits")
    (root / "split" / "data").mkdir(parents=True)
    part = {"train": slice(0, 1000), "test": slice(1000, 1300)}
    for name, s in part.items():
        table = pa.table({**{k: v[s] for k, v in cols.items()}, "label": y[s]})
        pq.write_table(table, root / "split" / f"{name}.parquet", row_group_size=256)
    # sharded under data/ (the Hub's layout): train in two files
    for i, s in enumerate((slice(0, 600), slice(600, 1000))):
        pq.write_table(pa.table({**{k: v[s] for k, v in cols.items()}, "label": y[s]}),
                       root / "split" / "data" / f"train-0000{i}-of-00002.parquet")
    pq.write_table(pa.table({**{k: v[part["test"]] for k, v in cols.items()}, "label": y[part["test"]]}),
                   root / "split" / "data" / "test-00000-of-00001.parquet")
    split = np.array(["train"] * 1000 + ["test"] * 300)
    pq.write_table(pa.table({**cols, "label": y, "split": split}), root / "all.parquet", row_group_size=256)
    uris = {"train": _put(s3, root / "split" / "train.parquet", "digits/train.parquet"),
            "test": _put(s3, root / "split" / "test.parquet", "digits/test.parquet"),
            "all": _put(s3, root / "all.parquet", "digits-all.parquet"),
            "prefix": s3["uri"]("digits"), "sharded": s3["uri"]("digits-sharded")}
    for f in sorted((root / "split" / "data").iterdir()):
        _put(s3, f, f"digits-sharded/data/{f.name}")
    return {"root": root, "uris": uris}


@pytest.fixture(scope="module")
def texts(tmp_path_factory, s3):
    """Short texts of three topics as one CSV with a split column, train/test CSVs and parquet files."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(150):
        topic = i % 3
        words = rng.choice(WORDS[4 * topic: 4 * topic + 4], size=6)
        rows.append({"text": " ".join(words), "label": ["sport", "politics", "tech"][topic],
                     "split": "train" if i < 120 else "test"})
    table = pa.Table.from_pylist(rows)
    root = tmp_path_factory.mktemp("texts")
    pcsv.write_csv(table, root / "all.csv")
    for name in ("train", "test"):
        part = table.filter(pa.compute.equal(table.column("split"), name)).drop(["split"])
        pcsv.write_csv(part, root / f"{name}.csv")
        pq.write_table(part, root / f"{name}.parquet")
    uris = {"all_csv": _put(s3, root / "all.csv", "texts/all.csv")}
    for name in ("train", "test"):
        uris[f"{name}_csv"] = _put(s3, root / f"{name}.csv", f"texts/csv/{name}.csv")
        uris[f"{name}_parquet"] = _put(s3, root / f"{name}.parquet", f"texts/pq/{name}.parquet")
    uris["pq_prefix"] = s3["uri"]("texts/pq")
    return {"root": root, "uris": uris}


def _same(a, b) -> None:
    assert (a.num_classes, a.input_shape, a.class_names) == (b.num_classes, b.input_shape, b.class_names)
    for sa, sb in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(sa.tensors[0], sb.tensors[0]) and torch.equal(sa.tensors[1], sb.tensors[1])


def test_parquet_from_the_bucket_equals_the_local_files_in_every_layout(digits):
    root, u = digits["root"], digits["uris"]
    kw = {"input_shape": [1, 8, 8], "scale": 16.0}
    local = get_data("parquet", train=root / "split" / "train.parquet", test=root / "split" / "test.parquet", **kw)
    assert (len(local.train), len(local.test)) == (1000, 300)
    _same(get_data("parquet", train=u["train"], test=u["test"], **kw), local)
    _same(get_data("parquet", path=u["prefix"], **kw), local)  # <split>.parquet under a prefix
    _same(get_data("parquet", path=u["sharded"], **kw), local)  # data/<split>-*.parquet shards, in name order
    _same(get_data("parquet", path=u["all"], **kw), local)  # one file, a split column
    _same(get_data("parquet", path=root / "all.parquet", **kw), local)
    _same(get_data("parquet", path=f"file://{root / 'split'}", **kw), local)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_text_tables_from_the_bucket_equal_the_local_files(texts, kind):
    root, u = texts["root"], texts["uris"]
    kw = {"max_length": 8}
    local = get_data(f"text_{kind}", train=root / f"train.{kind}", test=root / f"test.{kind}", **kw)
    assert tuple(local.class_names) == ("politics", "sport", "tech") and len(local.test) == 30
    _same(get_data(f"text_{kind}", train=u[f"train_{kind}"], test=u[f"test_{kind}"], **kw), local)
    if kind == "csv":
        _same(get_data("text_csv", path=u["all_csv"], **kw), local)
        _same(get_data("text_csv", path=root / "all.csv", **kw), local)
    else:
        _same(get_data("text_parquet", path=u["pq_prefix"], **kw), local)


def test_the_node_cache_is_filled_once(digits, cache, monkeypatch):
    import fipray.uri as uri

    copies = []
    real = uri._copy
    monkeypatch.setattr(uri, "_copy", lambda *a: (copies.append(a[-1]), real(*a))[1])
    u = digits["uris"]
    for _ in range(2):
        get_data("parquet", train=u["train"], test=u["test"], input_shape=[1, 8, 8], scale=16.0)
    assert len(copies) == 2, copies  # train and test, each once
    assert sorted(p.name for p in cache.rglob("*.parquet")) == ["test.parquet", "train.parquet"]


_FILL = r"""
import sys, time
from fipray.uri import cached_file
t = float(sys.argv[2])
while time.time() < t:
    time.sleep(0.005)
p = cached_file(sys.argv[1])
print(p)
"""


def test_two_processes_filling_the_cache_at_once_get_one_whole_copy(s3, tmp_path, cache):
    import hashlib
    import os
    import time

    blob = np.random.default_rng(1).bytes(24 << 20)  # 24 MiB: three of the copy's chunks, a fill takes a while
    (tmp_path / "blob.bin").write_bytes(blob)
    spec = _put(s3, tmp_path / "blob.bin", "big/blob.bin")
    env = {**os.environ, **s3["env"], "FIPRAY_CACHE_DIR": str(cache)}
    start = str(time.time() + 3.0)  # both interpreters are up by then (~2 s); they start the fill together
    procs = [subprocess.Popen([sys.executable, "-c", _FILL, spec, start], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1, paths
    got = Path(paths.pop())
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(blob).digest()
    # one entry, no half-filled temporaries left behind
    assert [p.name for p in cache.rglob("*") if p.is_file() and p.suffix == ".bin"] == ["blob.bin"]
    assert not [p for p in cache.rglob(".fill-*")]


def test_bad_uris_fail_in_one_line_naming_them(s3, digits, texts):
    def err(**kwargs) -> str:
        cfg = load_config(None, ["data.name=parquet"])
        cfg = replace(cfg, data=replace(cfg.data, kwargs={"input_shape": [1, 8, 8], "scale": 16.0, **kwargs}))
        with pytest.raises((ConfigError, FileNotFoundError)) as e:  # the CLI's user errors: exit 2, this line
            load_bundle(cfg)
        msg = str(e.value)
        assert "\n" not in msg and "endpoint_override" not in msg and "testing" not in msg, msg
        return msg

    missing = s3["uri"]("nowhere/train.parquet")
    assert "s3://fipray-test/nowhere/train.parquet" in err(train=missing, test=digits["uris"]["test"])
    assert "no 'train' split under s3://fipray-test/texts" in err(path=s3["uri"]("texts"))
    msg = err(path=digits["uris"]["all"], split_column="part")
    assert "no split column 'part'" in msg and "s3://fipray-test/digits-all.parquet" in msg
    assert "s3://no-such-bucket" in err(path=s3["uri"]("x.parquet", bucket="no-such-bucket"))
    assert "'ftp://host/x.parquet' has scheme 'ftp'; fipray reads s3://" in err(path="ftp://host/x.parquet")


COMMON = ["seeds=[0]", "threads=1", "model.name=mlp", "model.kwargs={hidden: [16]}", "train.steps=150",
          "train.lr=0.01", "path.steps=30", "path.lr=0.01", "path.lam=10", "path.record_every=10",
          "path.checkpoint_every=10", "data.name=parquet"]
OPS = {"sparsify": ["operation=sparsify", "sparsify.targets=[0.8]", "sparsify.invariance_steps=5",
                    "sparsify.baselines=[magnitude]"],
       "continual": ["operation=continual", "continual.num_tasks=2", "continual.memory_per_task=8",
                     "continual.baselines=[er]"]}


def _numbers(summary: dict) -> dict:
    """The summary without wall-clock fields (seconds differ from run to run)."""
    if isinstance(summary, dict):
        return {k: _numbers(v) for k, v in summary.items() if "second" not in k and k not in ("wall", "time")}
    if isinstance(summary, list):
        return [_numbers(v) for v in summary]  # type: ignore[return-value]
    return summary


@pytest.mark.parametrize("op", ["sparsify", "continual"])
def test_runs_on_a_bucket_report_the_numbers_of_the_local_files(digits, tmp_path, op):
    shape = "data.kwargs={path: %s, input_shape: [1, 8, 8], scale: 16.0}"
    got = {}
    for where, spec in (("local", digits["root"] / "all.parquet"), ("s3", digits["uris"]["all"])):
        cfg = load_config(None, [*COMMON, *OPS[op], shape % json.dumps(str(spec))])
        got[where] = run_experiment(cfg, tmp_path / where, progress=False)
    assert _numbers(got["s3"]["methods"]) == _numbers(got["local"]["methods"])
    fip = got["s3"]["methods"]["fip"]
    acc = fip["acc_mean"] if op == "continual" else fip["0.8"]["accuracy_mean"]
    assert acc > 0.5, fip  # a real run on the bucket's data (digits, 2 tasks / 80% sparse)


TEXT = ["seeds=[0]", "threads=1", "data.name=text_csv", "model.name=hf_bert",
        "model.kwargs={config: {vocab_size: 30522, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, "
        "intermediate_size: 32}}", "train.steps=40", "train.lr=0.01", "train.batch_size=16", "path.steps=10",
        "path.lr=0.001", "path.memory_batch_size=16", "path.record_every=5", "path.checkpoint_every=5",
        "path.heldout=16", "sparsify.targets=[0.5]", "sparsify.invariance_steps=2", "sparsify.baselines=[magnitude]"]


@pytest.mark.heavy  # ~20 s: two CLI runs of a tiny BERT; the in-process runs above cover the same code
def test_fipray_sparsify_on_a_text_csv_in_the_bucket_reports_the_local_numbers(texts, s3, tmp_path, cache):
    """The CLI itself (`fipray sparsify ... data.kwargs.path=s3://...csv`): exit 0 and the local file's numbers."""
    import os

    env = {**os.environ, **s3["env"], "FIPRAY_CACHE_DIR": str(cache)}
    got = {}
    for where, spec in (("local", texts["root"] / "all.csv"), ("s3", texts["uris"]["all_csv"])):
        cmd = [sys.executable, "-m", "fipray.cli", "sparsify", "--out", str(tmp_path / where), "--no-progress",
               *TEXT, "data.kwargs={max_length: 8}", f"data.kwargs.path={spec}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[where] = json.loads((tmp_path / where / "summary.json").read_text())
    assert _numbers(got["s3"]["methods"]) == _numbers(got["local"]["methods"])
    assert got["s3"]["dense_accuracy"] == got["local"]["dense_accuracy"] > 0.34  # above chance on 3 topics
