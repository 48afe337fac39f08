"""A stored set of networks: nodes (networks with their metrics) and edges (weight-space distances).

The paper composes operations (continual learning, sparsification) into one path-connected set
of networks — a submanifold of weight space that can later be queried with unseen data. On disk a
set is a folder:

    set.json             model spec (for `create_model`), node count, free metadata
    nodes.parquet        one row per network: node id, where it came from, its metrics
    edges.parquet        (src, dst, weight_distance): consecutive networks of a path
    weights/<node>.safetensors

Weights are safetensors (no pickle). `nodes.parquet` rows always carry `node` (str) and
`weights` (the file, relative to the folder).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fipray.atomic import atomic_write, atomic_write_json, write_parquet
from fipray.models import model_from_spec

SET_FILE = "set.json"


def weight_distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """‖a − b‖ over the floating tensors, accumulated in float64 one tensor at a time (no float64 copy)."""
    total, chunk = 0.0, 1 << 20  # float64 temporaries of at most 8 MB
    for k, v in a.items():
        if v.is_floating_point():
            x, y = v.detach().reshape(-1), b[k].detach().reshape(-1)
            for i in range(0, x.numel(), chunk):
                total += float((x[i:i + chunk].double() - y[i:i + chunk].double()).pow(2).sum())
    return math.sqrt(total)


@dataclass
class NetworkSetWriter:
    """Collects nodes and edges, writes weights as they come, and the tables at `close()`.

    Weights live on disk only: distances read the two nodes back (the last node added is kept), so
    memory stays a couple of networks whatever the number of nodes.
    """

    root: Path
    model_spec: dict
    metadata: dict = field(default_factory=dict)
    nodes: list[dict] = field(default_factory=list)
    edges: list[dict] = field(default_factory=list)
    _last: tuple[str, dict[str, Tensor]] | None = None

    def add_node(self, node: str, state: dict[str, Tensor], *, parent: str | None = None, **metrics: Any) -> None:
        """Store one network; with `parent`, also the edge parent -> node (its weight distance)."""
        if any(n["node"] == node for n in self.nodes):
            raise ValueError(f"node {node!r} is already in the set")
        from safetensors.torch import save_file

        rel = f"weights/{node}.safetensors"
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        atomic_write(self.root / rel, lambda tmp: save_file(tensors, tmp))
        self.nodes.append({"node": node, "weights": rel, **metrics})
        if parent is not None:
            self.add_edge(parent, node)
        self._last = (node, tensors)

    def weights(self, node: str) -> dict[str, Tensor]:
        """A node's weights (CPU), read from its file unless it is the last one added."""
        if self._last is not None and self._last[0] == node:
            return self._last[1]
        from safetensors.torch import load_file

        rel = next((n["weights"] for n in self.nodes if n["node"] == node), None)
        if rel is None:
            raise KeyError(f"no node {node!r} in the set")
        return load_file(str(self.root / rel))

    def add_edge(self, src: str, dst: str) -> float:
        d = self.distance(src, dst)
        self.edges.append({"src": src, "dst": dst, "weight_distance": d})
        return d

    def distance(self, a: str, b: str) -> float:
        return weight_distance(self.weights(a), self.weights(b))

    def close(self) -> None:
        write_parquet(self.root / "nodes.parquet", self.nodes)
        if self.edges:
            write_parquet(self.root / "edges.parquet", self.edges)
        atomic_write_json(self.root / SET_FILE, {"model_spec": self.model_spec, "num_nodes": len(self.nodes),
                                                 "num_edges": len(self.edges), **self.metadata})


@dataclass(frozen=True)
class NetworkSet:
    """A stored set, read back: spec, node rows, edge rows."""

    root: Path
    model_spec: dict
    nodes: list[dict]
    edges: list[dict]
    metadata: dict

    def model(self, node: str, device: torch.device | str = "cpu") -> nn.Module:
        """The network of `node`, in eval mode."""
        from safetensors.torch import load_file

        row = next((n for n in self.nodes if n["node"] == node), None)
        if row is None:
            raise KeyError(f"node {node!r} is not in the set {self.root}; nodes: {', '.join(self.node_ids())}")
        model = model_from_spec(self.model_spec, 0, device)
        model.load_state_dict(load_file(str(self.root / row["weights"]), device=str(device)))
        return model.eval()

    def node_ids(self) -> list[str]:
        return [n["node"] for n in self.nodes]


def load_set(root: str | Path) -> NetworkSet:
    """Read a set folder; raises FileNotFoundError naming what is missing."""
    import pyarrow.parquet as pq

    root = Path(root)
    meta_file = root / SET_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{str(root)!r} is not a network set: no {SET_FILE} (make one with `fipray compose`)")
    meta = json.loads(meta_file.read_text())
    nodes = pq.read_table(root / "nodes.parquet").to_pylist()
    edges = pq.read_table(root / "edges.parquet").to_pylist() if (root / "edges.parquet").is_file() else []
    spec = meta.pop("model_spec")
    return NetworkSet(root=root, model_spec=spec, nodes=nodes, edges=edges, metadata=meta)
