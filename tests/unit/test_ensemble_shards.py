"""The serving engine without Ray: exact sharded head and gradient, request validation, app arguments."""

from __future__ import annotations

import json

import pytest
import torch
from _ensembles import random_ensemble
from torch import nn

from fipray.ensemble_folder import load_ensemble
from fipray.ray.attack import RemoteEnsemble
from fipray.serving import ShardEngine, combine_log_parts, shard_upstreams, split_members
from fipray.serving_args import ServeArgs
from fipray.serving_requests import BadRequest, parse_predict_body

SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def ens_dir(tmp_path_factory):
    return random_ensemble(tmp_path_factory.mktemp("ens"), "small_cnn", {"width": 0.25, "fc": 8}, SHAPE,
                           num_classes=3, members=5, metadata={"operation": "ensemble", "seed": 0,
                                                               "config_hash": "h", "path_ids": [0] * 5,
                                                               "steps": [1, 2, 3, 4, 5]})


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Done(self.fn(*args))


class FakeIngress:
    """The ingress's two methods over in-process shards: what a Serve handle returns, minus Ray."""

    def __init__(self, directory, shards: int):
        self.engines = [ShardEngine(directory, ids, threads=0) for ids in split_members(5, shards)]

        def parts_fn(x):
            parts = torch.stack([e.log_prob_sum(x) for e in self.engines])
            return combine_log_parts(parts, 5), parts

        def vjp_fn(x, g, parts):
            u = shard_upstreams(parts, g)
            return sum(e.log_prob_sum_vjp(x, u[i])[1] for i, e in enumerate(self.engines))

        self.log_probs_parts, self.vjp = _Method(parts_fn), _Method(vjp_fn)


def test_split_members_covers_every_member_once():
    assert split_members(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_members(2, 2) == [[0], [1]]
    with pytest.raises(ValueError, match="shards must be in"):
        split_members(3, 4)
    with pytest.raises(ValueError, match="shards must be in"):
        split_members(3, 0)


@pytest.mark.parametrize("shards", [1, 2, 5])
def test_sharded_head_and_gradient_equal_in_process(ens_dir, shards):
    ens = load_ensemble(ens_dir)
    remote = RemoteEnsemble(FakeIngress(ens_dir, shards))
    torch.manual_seed(0)
    x, y = torch.rand(7, *SHAPE), torch.randint(0, 3, (7,))
    with torch.no_grad():
        assert torch.allclose(remote(x), ens(x), atol=1e-5)
    grads = []
    for model in (ens, remote):
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        # A loss with an arbitrary upstream vector, plus the attack's cross-entropy.
        loss = nn.functional.cross_entropy(out, y) + (out * torch.linspace(-1, 1, 3)).sum()
        (g,) = torch.autograd.grad(loss, xg)
        grads.append(g)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def _body(obj) -> bytes:
    return json.dumps(obj).encode()


GOOD = [[[[0.5] * 4] * 4]]  # one input of shape (1, 4, 4)
BAD = {
    "malformed JSON": (b'{"inputs": [1, 2', "malformed JSON"),
    "empty body": (b"", "empty request body"),
    "not an object": (_body([1, 2]), "JSON object"),
    "missing field": (_body({"input": GOOD}), "missing field 'inputs'"),
    "extra field": (_body({"inputs": GOOD, "x": 1}), "unexpected field"),
    "not a list": (_body({"inputs": 3}), "must be a list"),
    "empty batch": (_body({"inputs": []}), "empty batch"),
    "over max batch": (_body({"inputs": GOOD * 9}), "exceeds the maximum of 8"),
    "strings": (_body({"inputs": [[[["a"] * 4] * 4]]}), "numbers only"),
    "numeric strings": (_body({"inputs": [[[["0.5"] * 4] * 4]]}), "numbers only"),
    "booleans": (_body({"inputs": [[[[True] * 4] * 4]]}), "numbers only"),
    "nested junk": (_body({"inputs": [[{"a": 1}]]}), "numbers only"),
    "ragged": (_body({"inputs": [[[[0.5] * 4] * 3 + [[0.5] * 5]]]}), "ragged"),
    "wrong shape": (_body({"inputs": [[[[0.5] * 3] * 4]]}), r"must have shape \[1, 4, 4\]"),
    "wrong rank": (_body({"inputs": [[0.5] * 16]}), r"must have shape \[1, 4, 4\]"),
    "unbatched": (_body({"inputs": [[[0.5] * 4] * 4]}), "wrap the single input"),
    "NaN": (b'{"inputs": [[[[NaN, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]]}', "NaN"),
    "Infinity": (b'{"inputs": [[[[Infinity, 0, 0, 0]]]]}', "Infinity"),
    "overflow to inf": (b'{"inputs": [[[[1e999, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]]}',
                        "NaN or infinite"),
    "out of range": (_body({"inputs": [[[[1.5] * 4] * 4]]}), r"must lie in \[0, 1\]"),
    "negative": (_body({"inputs": [[[[-0.1] * 4] * 4]]}), r"must lie in \[0, 1\]"),
    "oversized body": (b" " * 5000, "exceeds the limit of 4096 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_bad_body_is_rejected_naming_the_problem(case):
    body, match = BAD[case]
    with pytest.raises(BadRequest, match=match) as info:
        parse_predict_body(body, SHAPE, max_inputs=8, max_body_bytes=4096)
    assert 400 <= info.value.status < 500


def test_good_body_parses_to_float32_batch():
    x = parse_predict_body(_body({"inputs": GOOD * 2}), SHAPE, max_inputs=8, max_body_bytes=4096)
    assert x.dtype == torch.float32 and x.shape == (2, *SHAPE)
    assert torch.all(x == 0.5)


def test_serve_args_validate_names_the_key(ens_dir):
    a = ServeArgs.from_dict({"ensemble": str(ens_dir), "shards": "2", "batch_wait_timeout_s": 0.01})
    assert a.shards == 2 and a.batch_wait_timeout_s == 0.01
    with pytest.raises(ValueError, match="unknown config key 'serve.shard'"):
        ServeArgs.from_dict({"ensemble": str(ens_dir), "shard": 2})
    with pytest.raises(ValueError, match="'serve.ensemble'.*required"):
        ServeArgs.from_dict({"shards": 2})
    with pytest.raises(ValueError, match="'serve.shards': expected an integer"):
        ServeArgs.from_dict({"ensemble": str(ens_dir), "shards": "two"})
    with pytest.raises(ValueError, match="shards must be in \\[1, 5\\]"):
        ServeArgs.from_dict({"ensemble": str(ens_dir), "shards": 6})
    with pytest.raises(ValueError, match="'serve.max_inputs' must be >= 1"):
        ServeArgs.from_dict({"ensemble": str(ens_dir), "max_inputs": 0})
    with pytest.raises(FileNotFoundError, match="nope"):
        ServeArgs.from_dict({"ensemble": str(ens_dir / "nope")})


@pytest.mark.parametrize("argv, match", [
    (["serve", "--ensemble", "{d}/nope"], "ensemble directory not found"),
    (["serve", "--ensemble", "{d}", "--shards", "9"], "shards must be in \\[1, 5\\]"),
    (["attack", "--ensemble", "{d}/nope", "--eps", "0.1"], "ensemble directory not found"),
    (["attack", "--ensemble", "{d}", "--eps", "0.1"], "no run config"),
    (["serve", "--ensemble", "{d}", "--direct-port", "70000"], "--direct-port must be in 1..65534, got 70000"),
    (["serve", "--ensemble", "{d}", "--direct-port", "8001", "--set", 'ingress_autoscaling={{"max_replicas": 2}}'],
     "exactly one ingress replica"),
    (["serve", "--ensemble", "{d}", "--direct-port", "8001", "--address", "auto"], "local Ray that fipray serve"),
])
def test_cli_serve_and_attack_fail_fast_with_exit_2(capsys, ens_dir, argv, match):
    import re

    from fipray.cli import main

    rc = main([a.format(d=ens_dir) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and re.search(match, err), err
