"""The ensemble server on local Ray: exact predictions and gradients through shards, bad input, bounded load."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from _ensembles import free_port, processes_mentioning, random_ensemble
from torch import nn

from fipray.ensemble_folder import load_ensemble, save_ensemble
from fipray.models import create_model

pytestmark = pytest.mark.ray

SHAPE = (1, 8, 8)
MAX_INPUTS, MAX_BODY = 16, 64 * 1024


CNN = {"width": 0.5, "fc": 32}


@pytest.fixture(scope="module")
def ens_dir(tmp_path_factory):
    return random_ensemble(tmp_path_factory.mktemp("served"), "small_cnn", CNN, SHAPE, num_classes=10, members=6,
                           metadata={"operation": "ensemble", "seed": 0, "config_hash": "abc123",
                                     "path_ids": [0] * 6, "steps": [10, 20, 30, 40, 50, 60]})


@pytest.fixture(scope="module")
def served(ray_2cpus, ens_dir):
    """The app with 2 shard deployments on a free loopback port; Serve always shut down afterwards."""
    from ray import serve

    from fipray.ray.serve import start

    port = free_port()
    try:
        handle = start({"ensemble": str(ens_dir), "shards": 2, "max_inputs": MAX_INPUTS, "max_body_bytes": MAX_BODY},
                       host="127.0.0.1", port=port)
        yield {"port": port, "handle": handle, "ensemble": load_ensemble(ens_dir)}
    finally:
        serve.shutdown()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


NPY = {"Content-Type": "application/octet-stream"}


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _predict(port: int, x: torch.Tensor) -> dict:
    status, data = _request(port, "POST", "/predict", json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200, data
    return json.loads(data)


def test_predict_equals_in_process_and_metadata(served):
    torch.manual_seed(1)
    x = torch.rand(5, *SHAPE)
    out = _predict(served["port"], x)
    with torch.no_grad():
        ref = served["ensemble"](x).exp()
    assert out["members"] == 6
    assert out["labels"] == ref.argmax(-1).tolist()
    assert torch.allclose(torch.tensor(out["probs"]), ref, atol=1e-5)

    status, data = _request(served["port"], "GET", "/healthz")
    assert status == 200 and json.loads(data)["status"] == "ok"
    status, data = _request(served["port"], "GET", "/metadata")
    meta = json.loads(data)
    assert status == 200
    assert meta["input_shape"] == list(SHAPE) and meta["num_classes"] == 10 and meta["members"] == 6
    assert meta["shards"] == 2
    assert meta["source"] == {"operation": "ensemble", "path_ids": [0] * 6, "steps": [10, 20, 30, 40, 50, 60],
                              "config_hash": "abc123", "seed": 0}


def _inputs(n: int, value: float = 0.5) -> list:
    return [[[[value] * 8] * 8]] * n


BAD = [
    ("malformed JSON", b'{"inputs": [1, 2', 400, "malformed JSON"),
    ("missing field", json.dumps({"data": _inputs(1)}).encode(), 400, "missing field 'inputs'"),
    ("wrong shape", json.dumps({"inputs": [[[[0.5] * 7] * 8]]}).encode(), 400, "must have shape"),
    ("wrong rank", json.dumps({"inputs": [[0.5] * 64]}).encode(), 400, "must have shape"),
    ("strings", json.dumps({"inputs": [[[["x"] * 8] * 8]]}).encode(), 400, "numbers only"),
    ("nested junk", json.dumps({"inputs": [[{"a": [1]}, None]]}).encode(), 400, "numbers only"),
    ("NaN", b'{"inputs": [[[[NaN]]]]}', 400, "NaN"),
    ("inf", b'{"inputs": [[[[1e999]]]]}', 400, None),
    ("out of range", json.dumps({"inputs": _inputs(1, 2.0)}).encode(), 400, "must lie in"),
    ("empty batch", json.dumps({"inputs": []}).encode(), 400, "empty batch"),
    ("batch over maximum", json.dumps({"inputs": _inputs(MAX_INPUTS + 1)}).encode(), 413, "exceeds the maximum"),
    ("oversized body", b"[" + b" " * (MAX_BODY + 10) + b"]", 413, "exceeds the limit"),
]


def test_bad_inputs_get_4xx_naming_the_problem_and_server_stays_up(served):
    port = served["port"]
    for name, body, status, match in BAD:
        got, data = _request(port, "POST", "/predict", body)
        assert got == status, (name, got, data)
        msg = json.loads(data)["error"]
        assert match is None or match in msg, (name, msg)
    # Wrong method and unknown path are answered too.
    assert _request(port, "GET", "/predict")[0] == 405
    assert _request(port, "POST", "/nope", b"{}")[0] == 404
    # A chunked oversized body (no Content-Length) is cut off at the limit.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/predict")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b" " * 16384
    for _ in range(MAX_BODY // len(chunk) + 2):
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 413 and "exceeds the limit" in json.loads(resp.read())["error"]
    conn.close()
    # The next valid request is answered correctly.
    x = torch.rand(3, *SHAPE)
    out = _predict(port, x)
    with torch.no_grad():
        assert torch.allclose(torch.tensor(out["probs"]), served["ensemble"](x).exp(), atol=1e-5)


def test_whitebox_gradient_from_shards_equals_in_process(served):
    from fipray.ray.attack import RemoteEnsemble

    remote, ens = RemoteEnsemble(served["handle"]), served["ensemble"]
    torch.manual_seed(2)
    x, y = torch.rand(9, *SHAPE), torch.randint(0, 10, (9,))
    grads = []
    for model in (ens, remote):
        xg = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xg), y)  # what torchattacks' PGD differentiates
        (g,) = torch.autograd.grad(loss, xg)
        grads.append(g)
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max() <= 1e-5


def test_pgd_through_shards_matches_in_process(served):
    from fipray.eval.robustness import robustness_curve
    from fipray.ray.attack import RemoteEnsemble

    torch.manual_seed(3)
    x = torch.rand(24, *SHAPE)
    with torch.no_grad():
        y = served["ensemble"](x).argmax(-1)  # all clean-correct, so the attack has work to do
    kw = {"steps": 5, "seed": 7}
    local = robustness_curve(served["ensemble"], x, y, [0.05, 0.2], **kw)
    remote = robustness_curve(RemoteEnsemble(served["handle"]), x, y, [0.05, 0.2], **kw)
    assert [r["whitebox"] for r in remote] == [r["whitebox"] for r in local]
    assert local[0]["clean"] == remote[0]["clean"] == 1.0


def test_single_deployment_app_equals_in_process(served, ens_dir):
    from ray import serve

    from fipray.ray.serve import start

    handle = start({"ensemble": str(ens_dir), "shards": 1, "name": "one"}, http=False)
    try:
        x = torch.rand(4, *SHAPE)
        logp, parts = handle.log_probs_parts.remote(x).result()
        assert parts.shape == (1, 4, 10)
        with torch.no_grad():
            assert torch.allclose(logp, served["ensemble"](x), atol=1e-5)
    finally:
        serve.delete("one")


@pytest.mark.heavy  # README's tier stays within ~6 min; .ci/run's heavy tier runs it
def test_bounded_load_test_has_no_errors(served):
    from fipray.ray.serve_load import load_test

    torch.manual_seed(4)
    bodies = [json.dumps({"inputs": torch.rand(1, *SHAPE).tolist()}).encode() for _ in range(16)]
    res = load_test(f"http://127.0.0.1:{served['port']}/predict", bodies, requests=500, concurrency=8,
                    time_limit_s=90)
    assert res["errors"] == 0, res["error_samples"]
    assert res["ok"] == 500 and not res["stopped_by_time_limit"]
    assert res["p50_ms"] <= res["p99_ms"]
    with pytest.raises(ValueError, match="loopback"):
        load_test("http://10.0.0.1:8000/predict", bodies)


def test_npy_body_equals_in_process_and_bad_npy_is_4xx(served, ens_dir):
    port, ens = served["port"], served["ensemble"]
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 256, (4, *SHAPE), dtype=np.uint8)
    f32 = rng.random((3, *SHAPE), dtype=np.float32)
    for arr, x in ((u8, torch.from_numpy(u8.astype(np.float32) / 255)), (f32, torch.from_numpy(f32))):
        status, data = _request(port, "POST", "/predict", _npy(arr), NPY)
        assert status == 200, data
        with torch.no_grad():
            assert torch.allclose(torch.tensor(json.loads(data)["probs"]), ens(x).exp(), atol=1e-5)
    for arr, match in [(np.zeros((1, *SHAPE)), "dtype <f8"), (np.array([1, "a"], dtype=object), "unpickl"),
                       (np.zeros((2, 1, 8, 7), np.float32), "must have shape"),
                       (np.full((1, *SHAPE), 1.5, np.float32), "must lie in")]:
        status, data = _request(port, "POST", "/predict", _npy(arr), NPY)
        assert status == 400 and match in json.loads(data)["error"], data
    status, data = _request(port, "POST", "/predict", _npy(u8)[:-5], NPY)
    assert status == 400 and "header declares shape" in json.loads(data)["error"]
    status, data = _request(port, "POST", "/predict", b"not numpy", NPY)
    assert status == 400 and "not an .npy file" in json.loads(data)["error"]
    meta = json.loads(_request(port, "GET", "/metadata")[1])
    assert meta["ensemble"] == str(ens_dir.resolve()) and "npy" in meta["inputs"]["payloads"]


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A second ensemble of the same input shape: 4 members, other seeds."""
    return random_ensemble(tmp_path_factory.mktemp("other"), "small_cnn", CNN, SHAPE, num_classes=10, members=4,
                           seed=100, metadata={"operation": "paths", "seed": 1})


def _switch_under_load(port: int, args: dict) -> tuple[dict, float]:
    """Run bounded load tests back to back while the app switches to ``args["ensemble"]``."""
    from fipray.ray.serve import update_ensemble
    from fipray.ray.serve_load import load_test

    torch.manual_seed(6)
    bodies = [json.dumps({"inputs": torch.rand(1, *SHAPE).tolist()}).encode() for _ in range(8)]
    done = threading.Event()
    totals = {"requests": 0, "ok": 0, "errors": 0, "samples": [], "rounds": 0, "slowest_ms": 0.0}

    def load():
        while not done.is_set():
            res = load_test(f"http://127.0.0.1:{port}/predict", bodies, requests=40, concurrency=4, time_limit_s=60)
            for k in ("requests", "ok", "errors"):
                totals[k] += res[k]
            totals["samples"] += res["error_samples"]
            totals["rounds"] += 1
            totals["slowest_ms"] = max(totals["slowest_ms"], res["max_any_ms"])

    t = threading.Thread(target=load, daemon=True)
    t.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    update_ensemble(args)
    switch_s = time.perf_counter() - t0
    time.sleep(1.0)  # requests after the switch too
    done.set()
    t.join(120)
    return totals, switch_s


def _replica_pids() -> dict[int, str]:
    """pid -> deployment name of every fipray Serve replica running."""
    import psutil

    out = {}
    for p in processes_mentioning("ServeReplica:fipray:"):
        try:
            out[p.pid] = " ".join(p.cmdline()).split("ServeReplica:fipray:")[1].split()[0]
        except (psutil.Error, IndexError):  # gone meanwhile
            continue
    return out


@pytest.mark.heavy
def test_live_switch_under_load_drops_no_request(served, ens_dir, other_dir):
    port = served["port"]
    args = {"ensemble": str(other_dir), "shards": 2, "max_inputs": MAX_INPUTS, "max_body_bytes": MAX_BODY}
    replicas = _replica_pids()
    assert len(replicas) == 3, replicas  # the ingress and two shards
    totals, switch_s = _switch_under_load(port, args)
    # Only user_config changed: Serve reconfigured the running replicas instead of replacing them.
    assert _replica_pids() == replicas
    print(json.dumps({"live_switch": {k: totals[k] for k in ("requests", "ok", "errors", "rounds", "slowest_ms")},
                      "switch_seconds": round(switch_s, 2)}))
    assert totals["errors"] == 0, totals["samples"][:3]
    assert totals["ok"] > 40 and totals["requests"] == totals["ok"]
    meta = json.loads(_request(port, "GET", "/metadata")[1])
    assert meta["ensemble"] == str(other_dir.resolve()) and meta["members"] == 4
    x = torch.rand(3, *SHAPE)
    out = _predict(port, x)
    with torch.no_grad():
        assert torch.allclose(torch.tensor(out["probs"]), load_ensemble(other_dir)(x).exp(), atol=1e-5)
    # And back, for the tests after this one (also a switch under load).
    totals, _ = _switch_under_load(port, {**args, "ensemble": str(ens_dir)})
    assert totals["errors"] == 0, totals["samples"][:3]
    assert json.loads(_request(port, "GET", "/metadata")[1])["ensemble"] == str(ens_dir.resolve())


def _switch(args: dict, capsys) -> dict:
    """What ``fipray serve`` does on SIGHUP (switch_to_current_folder), and the one line it printed."""
    from fipray.ray.serve_main import switch_to_current_folder

    capsys.readouterr()
    switch_to_current_folder(args)
    said = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith('{"switch')]
    assert len(said) == 1, said
    return said[0]


def _answers_like(port: int, folder, x: torch.Tensor) -> None:
    """The server answers ``x`` with ``folder``'s predictions and names it in /metadata."""
    out = _predict(port, x)
    with torch.no_grad():
        assert torch.allclose(torch.tensor(out["probs"]), load_ensemble(folder)(x).exp(), atol=1e-5)
    meta = json.loads(_request(port, "GET", "/metadata")[1])
    assert meta["ensemble"] == str(folder.resolve()), meta


def _corrupt_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    data = (dst / "members.safetensors").read_bytes()
    (dst / "members.safetensors").write_bytes(data[: len(data) // 2])  # truncated, as by a crashed copy
    return dst


def test_switch_to_a_corrupt_folder_keeps_the_old_ensemble_answering(served, ens_dir, tmp_path, capsys):
    port, x = served["port"], torch.rand(4, *SHAPE)
    bad = _corrupt_copy(ens_dir, tmp_path / "bad")
    said = _switch({"ensemble": str(bad), "shards": 2, "max_inputs": MAX_INPUTS, "max_body_bytes": MAX_BODY}, capsys)
    assert "members.safetensors" in said["switch_failed"] and "SHA-256 mismatch" in said["switch_failed"], said
    assert said["serving"] == str(ens_dir.resolve())
    _answers_like(port, ens_dir, x)


def test_switch_to_the_same_folder_changed_in_place_reloads_or_fails(served, ens_dir, other_dir, tmp_path, capsys):
    """Same path, new files: a truncated member file is refused (old members answer), a valid rewrite is
    really loaded (the new members answer), never a claimed switch that did not happen."""
    import shutil

    port, x = served["port"], torch.rand(4, *SHAPE)
    live = tmp_path / "live"
    shutil.copytree(ens_dir, live)
    args = {"ensemble": str(live), "shards": 2, "max_inputs": MAX_INPUTS, "max_body_bytes": MAX_BODY}
    try:
        assert _switch(args, capsys)["switched_to"] == str(live.resolve())
        data = (live / "members.safetensors").read_bytes()
        (live / "members.safetensors").write_bytes(data[: len(data) // 2])
        said = _switch(args, capsys)
        assert "SHA-256 mismatch" in said.get("switch_failed", ""), said
        out = _predict(port, x)  # the members loaded before answer, under the checksum they had
        with torch.no_grad():
            assert torch.allclose(torch.tensor(out["probs"]), load_ensemble(ens_dir)(x).exp(), atol=1e-5)
        meta = json.loads(_request(port, "GET", "/metadata")[1])
        assert meta["members_sha256"] == json.loads((ens_dir / "ensemble.json").read_text())["members_sha256"]
        shutil.rmtree(live)
        shutil.copytree(other_dir, live)  # rewritten in place: same path, other members
        said = _switch(args, capsys)
        assert said == {"switched_to": str(live.resolve()),
                        "members_sha256": json.loads((live / "ensemble.json").read_text())["members_sha256"]}
        _answers_like(port, live, x)
        with torch.no_grad():
            assert torch.allclose(torch.tensor(_predict(port, x)["probs"]), load_ensemble(other_dir)(x).exp(), atol=1e-5)
    finally:
        assert "switched_to" in _switch({**args, "ensemble": str(ens_dir)}, capsys)  # back, for the tests after


def test_overload_gets_503_with_retry_after_and_a_json_body(served, ens_dir):
    """Beyond max_ongoing_requests running and max_queued_requests waiting, the ingress refuses in JSON."""
    from ray import serve

    from fipray.ray.serve import start

    port = served["port"]
    start({"ensemble": str(ens_dir), "name": "tight", "max_ongoing_requests": 1, "max_queued_requests": 1,
           "batch_wait_timeout_s": 0.5, "retry_after_s": 3}, port=port, route_prefix="/tight")
    try:
        body = json.dumps({"inputs": torch.rand(1, *SHAPE).tolist()}).encode()
        got: list = []

        def one():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/tight/predict", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            got.append((resp.status, resp.getheader("Retry-After"), resp.getheader("Content-Type"), resp.read()))
            conn.close()

        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        refused = [g for g in got if g[0] == 503]
        assert len(got) == 10 and refused and any(g[0] == 200 for g in got), [g[:3] for g in got]
        for _status, retry, ctype, data in refused:
            assert retry == "3" and ctype == "application/json", (retry, ctype, data)
            assert "at capacity" in json.loads(data)["error"]
    finally:
        serve.delete("tight")


TEXT_LEN = 16


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    """Two MiniLM-L6 members (pretrained encoder, heads initialised by seed): the folder records the tokenizer."""
    return random_ensemble(tmp_path_factory.mktemp("minilm"), "hf_bert", {"pretrained_dir": "minilm-l6"},
                           (TEXT_LEN,), num_classes=3, members=2)


@pytest.mark.heavy  # README's tier stays within ~6 min; .ci/run's heavy tier runs it
def test_texts_on_a_minilm_ensemble_equal_in_process(served, minilm_dir):
    from ray import serve

    from fipray.data.tokenizer import tokenize
    from fipray.ensemble_folder import tokenizer_dir
    from fipray.ray.serve import start

    assert tokenizer_dir(minilm_dir) is not None  # recorded from the members' pretrained_dir
    port = served["port"]
    start({"ensemble": str(minilm_dir), "name": "text", "max_inputs": 4}, port=port, route_prefix="/text")
    try:
        texts = ["Shares rose after the bank's results.", "The striker scored twice in the final."]
        status, data = _request(port, "POST", "/text/predict", json.dumps({"texts": texts}).encode())
        assert status == 200, data
        x = tokenize(texts, None, tokenizer_dir(minilm_dir), TEXT_LEN)
        with torch.no_grad():
            ref = load_ensemble(minilm_dir)(x).exp()
        out = json.loads(data)
        assert torch.allclose(torch.tensor(out["probs"]), ref, atol=1e-5) and out["labels"] == ref.argmax(-1).tolist()
        status, data = _request(port, "POST", "/text/predict", _npy(x.numpy().astype(np.int32)), NPY)
        assert status == 200 and torch.allclose(torch.tensor(json.loads(data)["probs"]), ref, atol=1e-5)
        for body, match in [({"texts": ["word " * 40]}, "over the model's maximum of 16"),
                            ({"texts": []}, "empty batch"), ({"texts": [""]}, "is empty"),
                            ({"inputs": [[40000] * TEXT_LEN]}, "vocabulary range [0, 30522)"),
                            ({"inputs": [[101] * 20]}, "exceeds the model's maximum"),
                            ({"texts": ["a"] * 5}, "exceeds the maximum of 4")]:
            status, data = _request(port, "POST", "/text/predict", json.dumps(body).encode())
            assert 400 <= status < 500 and match in json.loads(data)["error"], (body, data)
        meta = json.loads(_request(port, "GET", "/text/metadata")[1])
        assert meta["inputs"]["max_length"] == TEXT_LEN and "json texts" in meta["inputs"]["payloads"]
        assert _request(port, "POST", "/text/predict", json.dumps({"texts": texts}).encode())[0] == 200
    finally:
        serve.delete("text")


@pytest.mark.heavy  # README's tier stays within ~6 min; .ci/run's heavy tier runs it
def test_vit_members_serve_and_give_exact_gradients_through_shards(served):
    """Transformer members (timm ViT) through 2 shards: predictions and the input gradient PGD uses."""
    import tempfile

    from ray import serve

    from fipray.ray.attack import RemoteEnsemble
    from fipray.ray.serve import start

    kwargs = {"patch_size": 2, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
    ms = []
    for i in range(4):
        torch.manual_seed(i)
        ms.append(create_model("timm:vit_tiny_patch16_224", num_classes=10, input_shape=SHAPE, **kwargs))
    with tempfile.TemporaryDirectory(prefix="vit") as d:
        spec = {"name": "timm:vit_tiny_patch16_224", "kwargs": kwargs, "num_classes": 10, "input_shape": list(SHAPE)}
        save_ensemble(ms, d, model_spec=spec, metadata={"operation": "ensemble"})
        ens = load_ensemble(d)
        handle = start({"ensemble": d, "shards": 2, "name": "vit"}, http=False)
        try:
            remote = RemoteEnsemble(handle)
            torch.manual_seed(3)
            x, y = torch.rand(6, *SHAPE), torch.randint(0, 10, (6,))
            with torch.no_grad():
                assert torch.allclose(remote(x), ens(x), atol=1e-5)
            grads = []
            for model in (ens, remote):
                xg = x.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xg), y), xg)
                grads.append(g)
            assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() <= 1e-5
        finally:
            serve.delete("vit")
