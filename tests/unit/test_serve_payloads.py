"""Request payloads without Ray: binary .npy bodies, token ids and texts; every bad one is a 4xx naming it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from _ensembles import random_ensemble

from fipray.ensemble_folder import load_ensemble, read_ensemble_meta, save_ensemble, tokenizer_dir
from fipray.models import create_model
from fipray.serving import EngineCache, ShardEngine
from fipray.serving_requests import BadRequest, InputSpec, parse_request

SHAPE = (1, 4, 4)
IMG = InputSpec(SHAPE, max_inputs=8, max_body_bytes=4096)
L = 12
TINY_BERT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
             "max_position_embeddings": 32, "vocab_size": 30522, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def parse(body: bytes, spec: InputSpec = IMG, ctype: str | None = "application/octet-stream") -> torch.Tensor:
    return parse_request(body, ctype, spec)


def test_npy_uint8_is_scaled_and_float32_passes_through():
    u8 = np.arange(32, dtype=np.uint8).reshape(2, *SHAPE) * 8
    x = parse(npy(u8))
    assert x.dtype == torch.float32 and x.shape == (2, *SHAPE)
    assert torch.allclose(x, torch.from_numpy(u8.astype(np.float32) / 255))
    f = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)
    assert torch.equal(parse(npy(f)), torch.from_numpy(f))
    # Fortran order and big-endian floats mean the same numbers; the magic alone marks a binary body.
    assert torch.equal(parse(npy(np.asfortranarray(f))), torch.from_numpy(f))
    assert torch.equal(parse(npy(f.astype(">f4")), ctype=None), torch.from_numpy(f))


def _header_lie() -> bytes:
    body = npy(np.zeros((2, *SHAPE), np.float32))
    return body.replace(b"(2, 1, 4, 4)", b"(9, 1, 4, 4)")


NPY_BAD = {
    "float64": (npy(np.zeros((1, *SHAPE))), 400, "dtype <f8"),
    "int32 image": (npy(np.zeros((1, *SHAPE), np.int32)), 400, "dtype <i4"),
    "object array (pickle)": (npy(np.array([[1, "a"]], dtype=object)), 400, "unpickl"),
    "structured dtype": (npy(np.zeros(2, dtype=[("a", "<f4"), ("b", "<f4")])), 400, "structured"),
    "not npy": (b"PK\x03\x04 a zip file", 400, "not an .npy file"),
    "truncated data": (npy(np.zeros((2, *SHAPE), np.float32))[:-7], 400, "holds"),
    "header lies about shape": (_header_lie(), 400, "header declares shape"),
    "malformed header": (b"\x93NUMPY\x01\x00\x10\x00{'descr': oops}   \n", 400, "malformed .npy header"),
    "unsupported version": (b"\x93NUMPY\x07\x00" + b"\x00" * 20, 400, "version"),
    "wrong shape": (npy(np.zeros((2, 1, 4, 5), np.float32)), 400, "must have shape [1, 4, 4]"),
    "unbatched": (npy(np.zeros(SHAPE, np.float32)), 400, "wrap the single input"),
    "empty batch": (npy(np.zeros((0, *SHAPE), np.float32)), 400, "empty batch"),
    "over max batch": (npy(np.zeros((9, *SHAPE), np.uint8)), 413, "exceeds the maximum of 8"),
    "NaN": (npy(np.full((1, *SHAPE), np.nan, np.float32)), 400, "NaN"),
    "out of range": (npy(np.full((1, *SHAPE), 2.0, np.float32)), 400, "must lie in [0, 1]"),
    "oversized": (npy(np.zeros((80, *SHAPE), np.float32)), 413, "exceeds the limit of 4096 bytes"),
    "empty body": (b"", 400, "empty request body"),
}


@pytest.mark.parametrize("case", sorted(NPY_BAD))
def test_every_bad_npy_body_is_a_4xx_naming_the_problem(case):
    body, status, match = NPY_BAD[case]
    with pytest.raises(BadRequest) as info:
        parse(body)
    assert info.value.status == status, str(info.value)
    assert match in str(info.value), str(info.value)


def test_a_huge_declared_shape_is_refused_before_allocating():
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12, *SHAPE)})
    with pytest.raises(BadRequest, match="header declares shape"):
        parse(buf.getvalue() + b"\x00" * 64)


def test_unknown_content_type_is_415_and_curl_form_type_is_json():
    body = json.dumps({"inputs": [np.zeros(SHAPE).tolist()]}).encode()
    with pytest.raises(BadRequest) as info:
        parse(body, ctype="image/png")
    assert info.value.status == 415 and "application/octet-stream" in str(info.value)
    assert parse(body, ctype="application/x-www-form-urlencoded").shape == (1, *SHAPE)
    assert parse(body, ctype="application/json; charset=utf-8").shape == (1, *SHAPE)


# --- token ids and texts ----------------------------------------------------------------------------
TOK = InputSpec((L,), max_inputs=4, max_body_bytes=1 << 16, tokens=True, vocab_size=100, type_vocab_size=2)
PAIR = InputSpec((2, L), max_inputs=4, max_body_bytes=1 << 16, tokens=True, vocab_size=100, type_vocab_size=2)


def jbody(obj) -> bytes:
    return json.dumps(obj).encode()


def test_token_ids_as_json_and_npy():
    ids = np.arange(2 * L).reshape(2, L) % 100
    for body, ctype in ((jbody({"inputs": ids.tolist()}), "application/json"), (npy(ids.astype(np.int32)), None)):
        x = parse_request(body, ctype, TOK)
        assert x.dtype == torch.int64 and torch.equal(x, torch.from_numpy(ids))
    pair = np.stack([ids, np.zeros_like(ids)], axis=1)
    assert parse_request(jbody({"inputs": pair.tolist()}), "application/json", PAIR).shape == (2, 2, L)


TOKEN_BAD = {
    "out of vocabulary": (jbody({"inputs": [[5] * (L - 1) + [100]]}), TOK, "vocabulary range [0, 100)"),
    "negative id": (jbody({"inputs": [[-1] + [5] * (L - 1)]}), TOK, "vocabulary range"),
    "too long": (jbody({"inputs": [[5] * (L + 3)]}), TOK, f"sequence length {L + 3} exceeds the model's maximum"),
    "too short": (jbody({"inputs": [[5] * (L - 2)]}), TOK, f"exactly {L} token ids"),
    "float ids": (jbody({"inputs": [[5.5] * L]}), TOK, "integer token ids"),
    "float npy ids": (npy(np.zeros((1, L), np.float32)), TOK, "not accepted for token ids"),
    "bad token type": (jbody({"inputs": [[[5] * L, [2] * L]]}), PAIR, "token type ids"),
    "texts on an image model": (jbody({"texts": ["hello"]}), IMG, "'texts' is for text ensembles"),
    "texts without tokenizer": (jbody({"texts": ["hello"]}), TOK, "records no tokenizer"),
    "missing both fields": (jbody({"text": ["hello"]}), TOK, "missing field 'inputs' or 'texts'"),
}


@pytest.mark.parametrize("case", sorted(TOKEN_BAD))
def test_every_bad_token_body_is_a_4xx_naming_the_problem(case):
    body, spec, match = TOKEN_BAD[case]
    with pytest.raises(BadRequest, match=None) as info:
        parse_request(body, None, spec)
    assert 400 <= info.value.status < 500 and match in str(info.value), str(info.value)


@pytest.fixture(scope="module")
def text_ens(tmp_path_factory):
    """Three tiny from-scratch BERTs with the real MiniLM tokenizer recorded in the folder."""
    return random_ensemble(tmp_path_factory.mktemp("text_ens"), "hf_bert", {"config": TINY_BERT}, (L,),
                           num_classes=3, members=3, tokenizer="minilm-l6")


def test_text_ensemble_records_its_tokenizer_and_image_ensembles_do_not(text_ens, tmp_path):
    meta = read_ensemble_meta(text_ens)
    assert meta["tokenizer"] == "tokenizer" and (tokenizer_dir(text_ens) / "tokenizer_config.json").is_file()
    img = [create_model("mlp", num_classes=2, input_shape=SHAPE, hidden=[4]) for _ in range(2)]
    spec = {"name": "mlp", "kwargs": {"hidden": [4]}, "num_classes": 2, "input_shape": list(SHAPE)}
    save_ensemble(img, tmp_path / "img", model_spec=spec, metadata={})
    assert "tokenizer" not in json.loads((tmp_path / "img" / "ensemble.json").read_text())
    assert tokenizer_dir(tmp_path / "img") is None


def test_texts_tokenised_server_side_give_the_in_process_answer(text_ens):
    from fipray.data.tokenizer import tokenize

    engine = ShardEngine(text_ens, threads=1)
    facts = engine.input_facts()
    assert facts == {"tokens": True, "vocab_size": 30522, "type_vocab_size": 2}
    spec = InputSpec((L,), 4, 1 << 16, **facts, tokenizer=str(tokenizer_dir(text_ens)))
    texts = ["markets rallied on friday", "the team won the cup"]
    x = parse_request(jbody({"texts": texts}), "application/json", spec)
    assert torch.equal(x, tokenize(texts, None, "minilm-l6", L))
    with torch.no_grad():
        ref = load_ensemble(text_ens)(x)
    assert torch.allclose(engine.log_prob_sum(x) - np.log(3), ref, atol=1e-5)

    long_text = "word " * 40
    for body, match in [
        (jbody({"texts": [long_text]}), f"over the model's maximum of {L}"),
        (jbody({"texts": [""]}), "item 0 is empty"),
        (jbody({"texts": ["ok", 3]}), "strings only"),
        (jbody({"texts": []}), "empty batch"),
        (jbody({"texts": "one string"}), "must be a list"),
        (jbody({"texts": ["a"] * 5}), "exceeds the maximum of 4"),
        (jbody({"texts": ["a"], "text_pairs": ["b"]}), "sentence-pair models"),
        (jbody({"texts": ["a"], "extra": 1}), "unexpected field"),
    ]:
        with pytest.raises(BadRequest) as info:
            parse_request(body, "application/json", spec)
        assert 400 <= info.value.status < 500 and match in str(info.value), (match, str(info.value))
    cut = InputSpec((L,), 4, 1 << 16, **facts, tokenizer=spec.tokenizer, truncate_texts=True)
    assert parse_request(jbody({"texts": [long_text]}), None, cut).shape == (1, L)


def test_engine_cache_keeps_two_versions_and_refuses_a_rewritten_folder(text_ens):
    cache = EngineCache(keep=2, threads=1)
    sha = read_ensemble_meta(text_ens)["members_sha256"]
    a = cache.get(str(text_ens), sha, [0])
    assert cache.get(str(text_ens), sha, [0]) is a  # cached
    cache.get(str(text_ens), sha, [1])
    cache.get(str(text_ens), sha, [2])
    assert len(cache.versions()) == 2 and (str(text_ens), sha, (0,)) not in cache.versions()
    with pytest.raises(ValueError, match="changed on disk"):
        cache.get(str(text_ens), "0" * 64, [0])


def test_serve_args_from_command_line_strings_and_bad_keys(text_ens, capsys):
    from fipray.cli import main
    from fipray.serving_args import ServeArgs

    a = ServeArgs.from_dict({"ensemble": str(text_ens), "truncate_texts": "true", "max_queued_requests": "8",
                             "shard_autoscaling": '{"min_replicas": 1, "max_replicas": 3}', "retry_after_s": "2"})
    assert a.truncate_texts is True and a.max_queued_requests == 8 and a.retry_after_s == 2.0
    assert a.shard_autoscaling == {"min_replicas": 1, "max_replicas": 3}
    with pytest.raises(ValueError, match="'serve.max_queued_requests' must be >= 1"):
        ServeArgs.from_dict({"ensemble": str(text_ens), "max_queued_requests": 0})
    with pytest.raises(ValueError, match="'serve.shard_autoscaling': expected a mapping"):
        ServeArgs.from_dict({"ensemble": str(text_ens), "shard_autoscaling": "{not json"})
    # The CLI validates before Ray starts: a bad --set exits 2 naming the key.
    assert main(["serve", "--ensemble", str(text_ens), "--set", "nope=1"]) == 2
    assert "unknown config key 'serve.nope'" in capsys.readouterr().err
    assert main(["serve", "--ensemble", str(text_ens), "--set", "shards"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err


def test_autoscaling_and_backpressure_options_reach_the_deployments(text_ens):
    from fipray.config import ConfigError
    from fipray.ray.serve import REFUSAL_ROOM, build_app

    app = build_app({"ensemble": str(text_ens), "shards": 3, "max_queued_requests": 7, "retry_after_s": 2,
                     "shard_autoscaling": {"min_replicas": 1, "max_replicas": 2}})
    ingress = app._bound_deployment
    cfg = ingress._deployment_config
    # The checksum is part of the version asked for: a folder rewritten in place is a new user_config.
    assert cfg.user_config == {"ensemble": str(text_ens.resolve()),
                               "members_sha256": read_ensemble_meta(text_ens)["members_sha256"]}
    # The ingress queues (max_queued_requests) and refuses (JSON 503) itself; Serve's limits are a backstop above.
    assert cfg.max_queued_requests == cfg.max_ongoing_requests == 32 + 7 + REFUSAL_ROOM
    assert cfg.backpressure_config.retry_after_s == 2 and cfg.num_replicas == 1
    shards = ingress.init_args[1]
    assert len(shards) == 3
    shard_cfg = shards[0]._bound_deployment._deployment_config
    assert shard_cfg.autoscaling_config.max_replicas == 2 and shard_cfg.max_queued_requests == 7
    with pytest.raises(ConfigError, match="serve.shard_autoscaling"):
        build_app({"ensemble": str(text_ens), "shards": 2, "shard_autoscaling": {"max_replica": 2}})


@pytest.mark.parametrize("value, want", [(None, None), (True, None), ("false", False)])
def test_access_log_option_reaches_every_deployment(text_ens, value, want):
    """access_log false turns Serve's access log off in every deployment; on (the default) leaves their
    logging_config unset, so an app-level one (a Serve config's log level) still applies."""
    from fipray.ray.serve import build_app

    args = {"ensemble": str(text_ens), "shards": 2} | ({} if value is None else {"access_log": value})
    ingress = build_app(args)._bound_deployment
    cfgs = [ingress._deployment_config] + [s._bound_deployment._deployment_config for s in ingress.init_args[1]]
    assert len(cfgs) == 3
    got = [c.logging_config if c.logging_config is None else c.logging_config["enable_access_log"] for c in cfgs]
    assert got == [want] * 3
