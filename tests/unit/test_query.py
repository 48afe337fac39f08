"""`fipray query`: every network of a set scored on a dataset and ranked, on constructed cases."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from fipray.netset import NetworkSetWriter, load_set
from fipray.query import query_set, score_network

SPEC = {"name": "mlp", "kwargs": {"hidden": []}, "num_classes": 2, "input_shape": [2]}


def _linear_state(s: float) -> dict:
    # logits = (−s·x0, s·x0): class 1 iff s·x0 > 0.
    return {"1.weight": torch.tensor([[-s, 0.0], [s, 0.0]]), "1.bias": torch.zeros(2)}


@pytest.fixture()
def linear_set(tmp_path):
    w = NetworkSetWriter(tmp_path / "set", SPEC)
    prev = None
    for name, s in (("weak", 0.5), ("wrong", -1.0), ("strong", 2.0)):
        w.add_node(name, _linear_state(s), parent=prev, scale=s)
        prev = name
    w.close()
    x = torch.tensor([[1.0, 0.3], [2.0, -1.0], [-1.0, 0.5], [-0.5, 2.0]])
    y = (x[:, 0] > 0).long()
    return load_set(tmp_path / "set"), x, y


def test_scores_match_hand_computation(linear_set):
    nset, x, y = linear_set
    sc = score_network(nset.model("strong"), x, y)
    logits = torch.stack([-2 * x[:, 0], 2 * x[:, 0]], 1)
    ce = float(torch.nn.functional.cross_entropy(logits, y))
    assert sc["accuracy"] == 1.0
    assert math.isclose(sc["cross_entropy"], ce, rel_tol=1e-6)
    assert math.isclose(sc["perplexity"], math.exp(ce), rel_tol=1e-6)
    assert score_network(nset.model("wrong"), x, y)["accuracy"] == 0.0


def test_query_ranks_by_accuracy_then_cross_entropy(linear_set):
    nset, x, y = linear_set
    res = query_set(nset, x, y)
    assert res.metric == "accuracy"
    assert [r["node"] for r in res.rows] == ["strong", "weak", "wrong"]  # weak ties strong on accuracy
    assert [r["rank"] for r in res.rows] == [1, 2, 3]
    assert res.best["node"] == "strong" and res.best["set_scale"] == 2.0
    assert [r["node"] for r in query_set(nset, x, y, metric="cross_entropy").rows] == ["strong", "weak", "wrong"]


def test_query_without_labels_ranks_by_confidence(linear_set):
    nset, x, _ = linear_set
    res = query_set(nset, x, None)
    assert res.metric == "entropy_perplexity"
    assert [r["node"] for r in res.rows] == ["strong", "wrong", "weak"]  # |s| = 2, 1, 0.5
    assert all(1.0 <= r["entropy_perplexity"] <= 2.0 for r in res.rows)
    with pytest.raises(ValueError, match="needs labels"):
        query_set(nset, x, None, metric="accuracy")
    with pytest.raises(ValueError, match="available"):
        query_set(nset, x, None, metric="bleu")


def test_query_cli_on_digits(tmp_path, capsys, digits):
    from fipray.cli import main
    from fipray.config import load_config
    from fipray.runtime import build_model, tensors, train_base

    spec = {"name": "mlp", "kwargs": {"hidden": [16]}, "num_classes": 10, "input_shape": [1, 8, 8]}
    cfg = load_config(None, ["train.steps=80", "train.lr=0.01"])
    trained = build_model(spec, 0, torch.device("cpu"))
    xtr, ytr = tensors(digits.train, torch.device("cpu"))
    train_base(trained, xtr, ytr, cfg, 0)
    w = NetworkSetWriter(tmp_path / "set", spec)
    w.add_node("random", build_model(spec, 1, torch.device("cpu")).state_dict())
    w.add_node("trained", trained.state_dict(), parent="random")
    w.close()
    rc = main(["query", "--set", str(tmp_path / "set"), "--data", "digits", "--limit", "200",
               "--out", str(tmp_path / "q")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    s = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert s["best"] == "trained" and s["metric"] == "accuracy" and s["num_points"] == 200
    assert s["best_scores"]["accuracy"] > 0.5 and s["best_weights"].endswith("trained.safetensors")
    rows = pq.read_table(tmp_path / "q" / "ranking.parquet").to_pylist()
    assert [r["node"] for r in rows] == ["trained", "random"]
    assert '"best": "trained"' in captured.out


def test_query_cli_errors(tmp_path, capsys, linear_set):
    from fipray.cli import main

    assert main(["query", "--set", str(tmp_path / "nope"), "--data", "digits"]) == 2
    assert "not a network set" in capsys.readouterr().err
    assert main(["query", "--set", str(tmp_path / "set"), "--data", "nodata"]) == 2
    assert "nodata" in capsys.readouterr().err
    assert main(["query", "--set", str(tmp_path / "set"), "--data", "digits", "--data-kwargs", "{bad"]) == 2
    assert "--data-kwargs" in capsys.readouterr().err


def test_query_cli_rejects_inputs_of_the_wrong_shape(tmp_path, capsys, linear_set):
    from fipray.cli import main

    assert main(["query", "--set", str(tmp_path / "set"), "--data", "digits", "--limit", "5"]) == 2
    assert "input_shape" in capsys.readouterr().err


def test_score_network_on_token_sequences_ignores_padding():
    """Language-model outputs (B, T, V) with token labels (B, T): per-token cross-entropy/perplexity, −100 ignored."""

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(7, 7, generator=torch.Generator().manual_seed(0)))

        def forward(self, ids):
            return self.table[ids]  # (B, T, V)

    m = Bigram()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    labels = torch.tensor([[2, 3, 4, 5], [6, 0, -100, -100]])
    sc = score_network(m, ids, labels, batch_size=1)
    logp = torch.log_softmax(m.table[ids], -1)
    keep = labels != -100
    want = float(-logp[keep].gather(-1, labels[keep][:, None]).mean())
    assert math.isclose(sc["cross_entropy"], want, rel_tol=1e-6)
    assert math.isclose(sc["perplexity"], math.exp(want), rel_tol=1e-6)
