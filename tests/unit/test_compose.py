"""`fipray compose`: both orders from one base network, recorded as one path-connected network set."""

from __future__ import annotations

import json
from collections import defaultdict

import pyarrow.parquet as pq
import pytest

from fipray.cli import main
from fipray.netset import load_set

ARGS = ["threads=1", "seeds=[0]", "model.kwargs={hidden: [32]}", "train.steps=60", "path.steps=15",
        "path.lr=0.01", "path.lam=10", "path.record_every=5", "path.memory_batch_size=64",
        "continual.num_tasks=3", "continual.classes_per_task=2", "continual.memory_per_task=10",
        "sparsify.invariance_steps=10", "compose.target=0.7", "compose.sample_every=5"]


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    out = tmp_path_factory.mktemp("compose") / "run"
    assert main(["compose", "--no-progress", "--out", str(out), *ARGS]) == 0
    return out


def test_compose_summary_has_both_orders_and_end_distance(composed):
    s = json.loads((composed / "summary.json").read_text())
    assert set(s["orders"]) == {"continual>sparsify", "sparsify>continual"}
    for o, v in s["orders"].items():
        # Both orders end exactly at the target sparsity (the later continual keeps the masks).
        assert abs(v["sparsity"] - 0.7) < 1e-3, (o, v["sparsity"])
        assert v["accuracy"] > 0.3  # learned more than task 0 (1/3 of the classes)
    (d,) = s["end_point_distance"].values()
    assert d > 1e-3  # distinct weights
    assert s["num_nodes"] == s["num_edges"] + 1  # a tree rooted at w0


def test_compose_set_is_path_connected(composed):
    nset = load_set(composed / "set")
    ids = set(nset.node_ids())
    assert len(ids) == len(nset.nodes)
    adj = defaultdict(set)
    for e in nset.edges:
        assert e["src"] in ids and e["dst"] in ids and e["weight_distance"] > 0
        adj[e["src"]].add(e["dst"])
        adj[e["dst"]].add(e["src"])
    seen, todo = {"s0-w0"}, ["s0-w0"]
    while todo:
        for n in adj[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    assert seen == ids
    nodes = pq.read_table(composed / "set" / "nodes.parquet").to_pylist()
    for n in nodes:
        assert {"accuracy", "sparsity", "order", "operation", "step"} <= set(n)
    # A stored network reproduces its recorded accuracy.
    from fipray.data import as_tensors, get_data
    from fipray.eval.continual import task_accuracy

    end = json.loads((composed / "summary.json").read_text())["orders"]["sparsify>continual"]["end_nodes"][0]
    row = next(n for n in nodes if n["node"] == end)
    x, y = as_tensors(get_data("digits").test)
    keep = y < 6
    acc = task_accuracy(nset.model(end), x[keep], y[keep], list(range(6)))
    assert abs(acc - row["accuracy"]) < 1e-6


def test_compose_bad_order_names_key(tmp_path, capsys):
    rc = main(["compose", "--no-progress", "--out", str(tmp_path / "o"), "compose.orders=[continual>prune]"])
    err = capsys.readouterr().err
    assert rc == 2 and "compose.orders" in err
