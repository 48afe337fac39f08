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

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray.core.modes import eval_mode
from fipray.netset import NetworkSet
from fipray.registry import Registry


@dataclass(frozen=True)
class QueryMetric:
    """A score `score_network` computes, by which a set can be ranked."""

    name: str
    higher_is_better: bool
    needs_labels: bool

    def __call__(self, scores: dict) -> float:
        return float(scores[self.name])


QUERY_METRICS: Registry[QueryMetric] = Registry("query metric")
for _m in (QueryMetric("accuracy", True, True), QueryMetric("cross_entropy", False, True),
           QueryMetric("perplexity", False, True), QueryMetric("entropy_perplexity", False, False)):
    QUERY_METRICS.register(_m.name)(_m)


@torch.no_grad()
def score_network(model: nn.Module, x: Tensor, y: Tensor | None = None, *, batch_size: int = 256) -> dict:
    """All scores of one network (eval mode) on x (N, ...) and optional labels y."""
    ce_sum, ent_sum, correct, count, rows = 0.0, 0.0, 0, 0, 0
    with eval_mode(model):
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
    if metric not in QUERY_METRICS:
        raise ValueError(f"unknown query metric {metric!r}; available: auto, {', '.join(QUERY_METRICS.names())}")
    if QUERY_METRICS.get(metric).needs_labels and not labelled:
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
    higher = QUERY_METRICS.get(metric).higher_is_better
    # Ties (common for accuracy) fall back to cross-entropy, then to the node id, so ranks are stable.
    tie = "cross_entropy" if y is not None else "entropy_perplexity"
    rows.sort(key=lambda r: ((-r[metric] if higher else r[metric]), r.get(tie, 0.0), r["node"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return QueryResult(metric=metric, rows=rows)


def run_query(set_dir: str | Path, data: str, *, data_kwargs: str = "{}", split: str = "test", limit: int = 0,
              metric: str = "auto", labels: bool = True, device: str = "cpu", threads: int = 1,
              out: str | Path | None = None) -> tuple[str, dict, Path]:
    """`fipray query`: rank a stored set on a dataset; writes ranking.parquet, summary.json, report.md.

    Returns:
        (report markdown, brief, output folder).
    """
    from fipray import report
    from fipray.atomic import atomic_write_json, atomic_write_text, write_parquet
    from fipray.config import ConfigError
    from fipray.data import as_tensors, get_data
    from fipray.netset import load_set

    if threads:
        torch.set_num_threads(threads)
    try:
        kwargs = json.loads(data_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--data-kwargs is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--data-kwargs must be a JSON object, got {data_kwargs!r}")
    nset = load_set(set_dir)
    try:
        bundle = get_data(data, **kwargs)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"--data {data!r}: {e.args[0] if e.args else e}") from None
    x, y = as_tensors(getattr(bundle, split))
    if limit:
        x, y = x[:limit], y[:limit]
    if list(x.shape[1:]) != list(nset.model_spec["input_shape"]):
        raise ConfigError(f"--data {data!r}: inputs of shape {tuple(x.shape[1:])} do not fit the set's "
                          f"networks (input_shape {tuple(nset.model_spec['input_shape'])})")
    labelled = labels and bool((y >= 0).any())
    res = query_set(nset, x, y.long() if labelled else None, metric=metric, device=device)
    folder = Path(out) if out is not None else Path(set_dir) / f"query-{data}"
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(folder / "ranking.parquet", res.rows)
    cols = ["rank", "node"] + [k for k in QUERY_METRICS.names() if k in res.rows[0]]
    best = res.best
    summary = {"metric": res.metric, "best": best["node"], "best_scores": {c: best[c] for c in cols[2:]},
               "best_weights": str(Path(set_dir) / next(n["weights"] for n in nset.nodes if n["node"] == best["node"])),
               "num_networks": len(res.rows), "num_points": len(x), "data": data, "data_kwargs": kwargs,
               "split": split, "labelled": labelled}
    atomic_write_json(folder / "summary.json", summary)
    md = "\n".join([f"# Query of {set_dir} with {data} ({split}, {len(x)} examples)", "",
                    f"Ranked by {res.metric} ({'higher' if QUERY_METRICS.get(res.metric).higher_is_better else 'lower'}"
                    f" is better). Best network: `{best['node']}` ({summary['best_weights']}).", "",
                    report.md_table(cols, [[r[c] for c in cols] for r in res.rows]), ""])
    atomic_write_text(folder / "report.md", md)
    return md, {"best": best["node"], res.metric: best[res.metric]}, folder
