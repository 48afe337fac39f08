"""Query a stored network set with unseen data: score every network, rank them, return the best.

The paper (Fig. 6c) queries the submanifold of networks built by composed FIPs "with unseen data by
using perplexity as a measure of a network's intrinsic ability to separate an unseen dataset".
Scores, per network, on inputs x (N, ...) and optional labels y (N,) (or (N, T) token labels,
−100 ignored):

    accuracy            fraction of argmax = y                           (labels; higher is better)
    cross_entropy       mean −log p(y | x)                               (labels; lower)
    perplexity          exp(cross_entropy)                               (labels; lower)
    entropy_perplexity  exp(mean predictive entropy): label-free          (lower: the network
                        separates the data confidently)

`metric="auto"` ranks by accuracy when labels exist (ties by cross-entropy), else by
entropy_perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray.netset import NetworkSet

METRICS = {"accuracy": True, "cross_entropy": False, "perplexity": False, "entropy_perplexity": False}
LABELLED = ("accuracy", "cross_entropy", "perplexity")


@torch.no_grad()
def score_network(model: nn.Module, x: Tensor, y: Tensor | None = None, *, batch_size: int = 256) -> dict:
    """All scores of one network (eval mode) on x (N, ...) and optional labels y."""
    was = model.training
    model.eval()
    ce_sum, ent_sum, correct, count, rows = 0.0, 0.0, 0, 0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size]).float()
        flat = logits.reshape(-1, logits.shape[-1])
        logp = F.log_softmax(flat, dim=-1)
        ent_sum += float(-(logp.exp() * logp).sum(-1).sum())
        rows += flat.shape[0]
        if y is not None:
            t = y[i:i + batch_size].reshape(-1)
            keep = t != -100
            ce_sum += float(F.nll_loss(logp[keep], t[keep], reduction="sum"))
            correct += int((flat[keep].argmax(-1) == t[keep]).sum())
            count += int(keep.sum())
    model.train(was)
    out = {"entropy_perplexity": math.exp(ent_sum / max(rows, 1))}
    if y is not None:
        ce = ce_sum / max(count, 1)
        out.update(accuracy=correct / max(count, 1), cross_entropy=ce, perplexity=math.exp(min(ce, 700.0)))
    return out


@dataclass(frozen=True)
class QueryResult:
    """Ranked rows (best first, each with `rank`, `node` and the scores) and the metric used."""

    metric: str
    rows: list[dict]

    @property
    def best(self) -> dict:
        return self.rows[0]


def resolve_metric(metric: str, labelled: bool) -> str:
    if metric == "auto":
        return "accuracy" if labelled else "entropy_perplexity"
    if metric not in METRICS:
        raise ValueError(f"unknown query metric {metric!r}; available: auto, {', '.join(METRICS)}")
    if metric in LABELLED and not labelled:
        raise ValueError(f"query metric {metric!r} needs labels; the data has none (use entropy_perplexity)")
    return metric


def query_set(nset: NetworkSet, x: Tensor, y: Tensor | None = None, *, metric: str = "auto",
              device: torch.device | str = "cpu", batch_size: int = 256) -> QueryResult:
    """Score every node of `nset` on (x, y) and rank them by `metric` (see module docstring)."""
    metric = resolve_metric(metric, y is not None)
    x = x.to(device)
    y = y.to(device) if y is not None else None
    rows = []
    for n in nset.nodes:
        scores = score_network(nset.model(n["node"], device), x, y, batch_size=batch_size)
        meta = {k: v for k, v in n.items() if k not in ("weights",) and not isinstance(v, (list, dict))}
        rows.append({**{f"set_{k}": v for k, v in meta.items() if k != "node"}, "node": n["node"], **scores})
    higher = METRICS[metric]
    # Ties (common for accuracy) fall back to cross-entropy, then to the node id, so ranks are stable.
    tie = "cross_entropy" if y is not None else "entropy_perplexity"
    rows.sort(key=lambda r: ((-r[metric] if higher else r[metric]), r.get(tie, 0.0), r["node"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return QueryResult(metric=metric, rows=rows)
