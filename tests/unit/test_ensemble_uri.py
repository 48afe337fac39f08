"""Ensembles named by a URI (`s3://.../merged/ensemble?endpoint_override=...`), without Ray: fetched into the node
cache and verified whole (`fetch_ensemble`), and `fipray serve` / `fipray attack` refusing a bad URI, a missing
prefix or a tampered member file in one line naming the URI (no credentials, no query options), exit 2.

The bucket is moto's S3 server on 127.0.0.1 (tests/ray/_moto.py, as the storage tests use).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from _ensembles import random_ensemble

from fipray.ensemble_folder import MEMBERS_FILE, META_FILE, fetch_ensemble, load_ensemble, local_ensemble
from fipray.uri import UriError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ray"))
from _moto import BUCKET, moto_s3  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return random_ensemble(tmp_path_factory.mktemp("ens"), "mlp", {"hidden": [16]}, SHAPE, num_classes=10, members=3,
                           metadata={"operation": "ensemble", "seed": 0})


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private node cache per test (never ~/.cache)."""
    monkeypatch.setenv("FIPRAY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def upload(s3, folder: Path, prefix: str) -> str:
    """Every file of ``folder`` under ``prefix`` in the bucket; the prefix's URI."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{s3['endpoint']}")
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{f.relative_to(folder)}", Body=f.read_bytes())
    return s3["uri"](prefix)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "endpoint_override" not in msg and "testing" not in msg, msg
    return msg


def test_fetch_copies_verifies_and_reuses_the_cache(s3, folder, cache):
    uri = upload(s3, folder, "run/merged/ensemble")
    local, meta = fetch_ensemble(uri)
    assert cache in local.parents and meta["members_sha256"] == json.loads((folder / META_FILE).read_text())[
        "members_sha256"]
    assert (local / MEMBERS_FILE).read_bytes() == (folder / MEMBERS_FILE).read_bytes()
    x = torch.rand(5, *SHAPE)
    with torch.no_grad():
        assert torch.equal(load_ensemble(local)(x), load_ensemble(folder)(x))
    stamp = (local / MEMBERS_FILE).stat().st_mtime_ns
    again, _ = fetch_ensemble(uri)  # unchanged objects: the same entry, not downloaded again
    assert again == local and (again / MEMBERS_FILE).stat().st_mtime_ns == stamp
    assert local_ensemble(str(folder)) == folder  # a local path is read where it is
    assert fetch_ensemble(folder)[0] == folder


def test_a_tampered_member_file_is_refused_naming_the_uri(s3, folder):
    uri = upload(s3, folder, "tampered/ensemble")
    import boto3

    data = bytearray((folder / MEMBERS_FILE).read_bytes())
    data[-10] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    boto3.client("s3", endpoint_url=f"http://{s3['endpoint']}").put_object(
        Bucket=BUCKET, Key=f"tampered/ensemble/{MEMBERS_FILE}", Body=bytes(data))
    with pytest.raises(UriError) as e:
        fetch_ensemble(uri)
    msg = _one_line(e)
    assert f"s3://{BUCKET}/tampered/ensemble/{MEMBERS_FILE}" in msg and "SHA-256 mismatch" in msg, msg


@pytest.mark.parametrize("spec, said", [
    ("s3://{bucket}/nothing/here?endpoint_override={endpoint}&scheme=http", "does not exist"),
    ("ftp://{bucket}/ensemble", "has scheme 'ftp'"),
    ("s3:///ensemble?endpoint_override={endpoint}&scheme=http", "bucket"),  # pyarrow: "Missing bucket name"
])
def test_bad_uris_are_one_line_naming_them(s3, spec, said):
    spec = spec.format(bucket=BUCKET, endpoint=s3["endpoint"])
    with pytest.raises(UriError) as e:
        fetch_ensemble(spec)
    msg = _one_line(e)
    assert said in msg and spec.split("?")[0] in msg, msg


def test_a_prefix_without_ensemble_json_names_the_uri(s3, folder):
    uri = upload(s3, folder, "half/ensemble")
    import boto3

    boto3.client("s3", endpoint_url=f"http://{s3['endpoint']}").delete_object(Bucket=BUCKET,
                                                                              Key=f"half/ensemble/{META_FILE}")
    with pytest.raises(UriError) as e:
        fetch_ensemble(uri)
    assert f"s3://{BUCKET}/half/ensemble/{META_FILE}" in _one_line(e)


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start Ray fails the test (the refusals must come first)."""
    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("fipray.ray.local.init_local", refuse)
    monkeypatch.setattr("fipray.ray.serve_main.init_local", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize("what", ["tampered", "missing", "scheme"])
def test_serve_and_attack_refuse_a_bad_uri_in_one_line_exit_2(s3, folder, no_ray, capsys, what):
    from fipray.cli import main

    if what == "tampered":
        uri = upload(s3, folder, "cli/ensemble")
        import boto3

        data = (folder / MEMBERS_FILE).read_bytes()
        boto3.client("s3", endpoint_url=f"http://{s3['endpoint']}").put_object(
            Bucket=BUCKET, Key=f"cli/ensemble/{MEMBERS_FILE}", Body=data[: len(data) // 2])
        said = "SHA-256 mismatch"
    elif what == "missing":
        uri, said = s3["uri"]("cli/absent"), "does not exist"
    else:
        uri, said = f"gopher://{BUCKET}/cli/ensemble", "has scheme 'gopher'"
    for argv in (["serve", "--ensemble", uri, "--port", "1"],
                 ["attack", "--ensemble", uri, "--config", str(ROOT / "jobs/configs/ensemble_digits.yaml")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fipray: error: "), err
        assert said in err and uri.split("?")[0] in err and "endpoint_override" not in err, err


def test_credentials_in_the_uri_never_reach_a_message_or_metadata(s3, folder):
    from fipray.serving_requests import metadata_doc

    upload(s3, folder, "creds/ensemble")
    uri = f"s3://testing:testing@{BUCKET}/creds/ensemble?endpoint_override={s3['endpoint']}&scheme=http"
    local, meta = fetch_ensemble(uri)
    assert metadata_doc(meta, 1, uri)["ensemble"] == f"s3://{BUCKET}/creds/ensemble"
    with pytest.raises(UriError) as e:
        fetch_ensemble(uri.replace("creds/ensemble", "creds/none"))
    assert f"s3://{BUCKET}/creds/none" in _one_line(e)


def test_serve_args_keep_the_uri_and_check_shards_against_its_folder(s3, folder):
    from fipray.config import ConfigError
    from fipray.serving_args import ServeArgs

    uri = upload(s3, folder, "args/ensemble")
    assert ServeArgs.from_dict({"ensemble": uri, "shards": "3"}).ensemble == uri  # each node reads its own copy
    with pytest.raises((ConfigError, ValueError), match="shards must be in"):
        ServeArgs.from_dict({"ensemble": uri, "shards": 4})
    assert ServeArgs.from_dict({"ensemble": str(folder)}).ensemble == str(folder.resolve())


def test_attack_finds_the_run_config_two_levels_above_a_uri():
    from fipray.ray.attack import _run_config_uri

    assert _run_config_uri("s3://b/run/merged/ensemble?scheme=http") == "s3://b/run/config.yaml?scheme=http"
    assert _run_config_uri("gs://b/run/merged/ensemble/") == "gs://b/run/config.yaml"
    assert _run_config_uri("s3://b/merged/ensemble") == "s3://b/config.yaml"  # storage at the bucket's root
    assert _run_config_uri("s3://b/ensemble") is None  # nothing two levels up inside the bucket


def test_one_sha256_helper_hashes_checkpoint_samples_and_ensemble_weights(folder):
    import fipray.checkpoints as ckpt
    import fipray.ensemble_folder as ef
    from fipray.atomic import sha256_file

    want = hashlib.sha256((folder / MEMBERS_FILE).read_bytes()).hexdigest()
    assert sha256_file(folder / MEMBERS_FILE) == want == json.loads((folder / META_FILE).read_text())["members_sha256"]
    assert ckpt.sha256_file is sha256_file and ef.sha256_file is sha256_file
    assert not hasattr(ckpt, "file_sha256") and not hasattr(ef, "_sha256")
