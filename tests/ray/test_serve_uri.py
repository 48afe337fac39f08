"""Serving and attacking an ensemble read from a bucket (moto's S3 server on 127.0.0.1), on the tier's local Ray.

`fipray serve --ensemble s3://...` answers what the local folder answers; a live switch (what SIGHUP does) to
another URI loads it, to a tampered one keeps the old version answering; `fipray attack --ensemble s3://...`
runs with the run config found two levels up in the bucket. The URIs carry the (fake) keys as user:password so
the Ray replicas, started before these tests without AWS variables, read the bucket too; no printed line or
/metadata answer shows them. Refusals before Ray starts: tests/unit/test_ensemble_uri.py.
"""

from __future__ import annotations

import http.client
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _ensembles import free_port, random_ensemble

from fipray.ensemble_folder import MEMBERS_FILE, load_ensemble

sys.path.insert(0, str(Path(__file__).parent))
from _moto import BUCKET, moto_s3  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """This process's node cache in a temporary folder (the replicas keep their default one)."""
    import os

    old = os.environ.get("FIPRAY_CACHE_DIR")
    os.environ["FIPRAY_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("FIPRAY_CACHE_DIR", None)
    else:
        os.environ["FIPRAY_CACHE_DIR"] = old

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (1, 8, 8)
MLP = {"hidden": [32]}


def _upload(client, folder: Path, prefix: str) -> None:
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{f.relative_to(folder)}", Body=f.read_bytes())


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """Two ensembles and a run config in the bucket: ``run/merged/ensemble``, ``other/merged/ensemble``,
    ``run/config.yaml``; a tampered copy of the first at ``bad/merged/ensemble``."""
    import boto3

    tmp = tmp_path_factory.mktemp("uri")
    ens = random_ensemble(tmp / "ens", "mlp", MLP, SHAPE, num_classes=10, members=4,
                          metadata={"operation": "ensemble", "seed": 0})
    other = random_ensemble(tmp / "other", "mlp", MLP, SHAPE, num_classes=10, members=2, seed=10)
    cfg = yaml.safe_load((ROOT / "jobs/configs/ensemble_digits.yaml").read_text())
    cfg.update(seeds=[0], model={"name": "mlp", "kwargs": MLP}, train={**cfg["train"], "steps": 20})
    with moto_s3() as s3:
        client = boto3.client("s3", endpoint_url=f"http://{s3['endpoint']}")
        _upload(client, ens, "run/merged/ensemble")
        _upload(client, other, "other/merged/ensemble")
        _upload(client, ens, "bad/merged/ensemble")
        data = bytearray((ens / MEMBERS_FILE).read_bytes())
        data[-10] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=f"bad/merged/ensemble/{MEMBERS_FILE}", Body=bytes(data))
        client.put_object(Bucket=BUCKET, Key="run/config.yaml", Body=yaml.safe_dump(cfg).encode())

        def uri(prefix: str) -> str:  # keys in the URI: the tier's Ray workers have no AWS variables
            return f"s3://testing:testing@{BUCKET}/{prefix}?endpoint_override={s3['endpoint']}&scheme=http"

        yield {"uri": uri, "ens": ens, "other": other}


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _labels(port: int, x: torch.Tensor) -> list[int]:
    status, out = _request(port, "POST", "/predict", json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200, out
    return out["labels"]


def _local_labels(folder: Path, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return load_ensemble(folder)(x).argmax(-1).tolist()


def test_fipray_serve_smoke_test_from_a_bucket(ray_2cpus, bucket, capsys):
    """README's tier: one deployment (its replica reads its node's cached copy); shards: the heavy test below."""
    from fipray.cli import main

    uri = bucket["uri"]("run/merged/ensemble")
    assert main(["serve", "--smoke-test", "--ensemble", uri, "--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    answer = json.loads(next(line for line in out.splitlines() if '"smoke_test"' in line))
    assert answer["members"] == 4 and answer["labels"] == _local_labels(bucket["ens"], torch.zeros(1, *SHAPE))
    assert "testing:testing" not in out


@pytest.mark.heavy  # 18 s (two shards, three switches): README's tier stays within ~6 min; .ci/run's heavy tier runs it
def test_served_uri_answers_like_the_local_folder_and_switches_by_uri(ray_2cpus, bucket, capsys):
    from ray import serve

    from fipray.ray.serve import start
    from fipray.ray.serve_main import switch_to_current_folder

    port, x = free_port(), torch.rand(12, *SHAPE)
    args = {"ensemble": bucket["uri"]("run/merged/ensemble"), "shards": 2}
    try:
        start(args, host="127.0.0.1", port=port)
        assert _labels(port, x) == _local_labels(bucket["ens"], x)
        assert _request(port, "GET", "/metadata")[1]["ensemble"] == f"s3://{BUCKET}/run/merged/ensemble"

        def switch(prefix: str) -> dict:
            capsys.readouterr()
            switch_to_current_folder({**args, "ensemble": bucket["uri"](prefix)})  # what SIGHUP does
            out = capsys.readouterr().out
            assert "testing:testing" not in out and "endpoint_override" not in out, out
            return json.loads(next(ln for ln in out.splitlines() if ln.startswith('{"switch')))

        said = switch("other/merged/ensemble")
        assert said["switched_to"] == f"s3://{BUCKET}/other/merged/ensemble", said
        assert _labels(port, x) == _local_labels(bucket["other"], x)
        said = switch("bad/merged/ensemble")  # a tampered member file: refused, the old version answers
        assert "SHA-256 mismatch" in said["switch_failed"] and f"s3://{BUCKET}/bad/merged/ensemble" in said[
            "switch_failed"], said
        assert said["serving"] == f"s3://{BUCKET}/other/merged/ensemble"
        assert _labels(port, x) == _local_labels(bucket["other"], x)
    finally:
        serve.shutdown()


@pytest.mark.heavy  # 14 s (w0 retrained, Serve started): README's tier stays within ~6 min; .ci/run's heavy tier
def test_fipray_attack_on_a_bucket_ensemble_finds_its_run_config(ray_2cpus, bucket, tmp_path, capsys):
    from fipray.cli import main

    uri = bucket["uri"]("run/merged/ensemble")
    assert main(["attack", "--smoke-test", "--ensemble", uri, "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ensemble"] == f"s3://{BUCKET}/run/merged/ensemble" and s["members"] == 4
    assert s["eval_examples"] == 20 and [r["eps"] for r in s["rows"]] == [0.1]
    assert 0.0 <= s["rows"][0]["whitebox"] <= s["rows"][0]["clean"]
    assert "testing:testing" not in capsys.readouterr().out
