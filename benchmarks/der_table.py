"""The DER paper's table beside ours: mean test accuracy after the last task, one row per method.

Usage (after the runs; each run folder holds the summary.json `fipray continual` writes):

    python benchmarks/der_table.py runs/continual_perm_mnist runs/continual_perm_mnist_b500 ... > table.md

Each run is matched to its benchmark column by its config (stream, domain, buffer size) and reports its
methods' ACC mean ± std over its seeds in % (class-incremental; Seq-MNIST also task-incremental), the
published number beside it and the difference. The published numbers are Buzzega et al., "Dark
Experience for General Continual Learning: a Strong, Simple Baseline" (NeurIPS 2020), Table 2, as listed
in the project's benchmark notes (docs/benchmarks.md says which cells were checked against the paper).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

# benchmark -> method -> buffer (0: no buffer) -> published ACC %. JOINT and SGD have no buffer.
PUBLISHED: dict[str, dict[str, dict[int, float]]] = {
    "P-MNIST": {"joint": {0: 94.33}, "naive": {0: 40.70}, "er": {200: 72.37, 500: 80.60, 5120: 89.90},
                "der": {200: 81.74, 500: 87.29, 5120: 91.66}, "derpp": {200: 83.58, 500: 88.21, 5120: 92.26}},
    "R-MNIST": {"joint": {0: 95.76}, "naive": {0: 67.66}, "er": {200: 85.01, 500: 88.91, 5120: 93.45},
                "der": {200: 90.04, 500: 92.24, 5120: 94.14}, "derpp": {200: 90.43, 500: 92.77, 5120: 94.65}},
    "Seq-MNIST class-IL": {"joint": {0: 95.57}, "naive": {0: 19.60}, "er": {200: 80.43, 500: 86.12, 5120: 93.40},
                           "der": {200: 84.55, 500: 90.54, 5120: 94.90},
                           "derpp": {200: 85.61, 500: 91.00, 5120: 95.30}},
    "Seq-MNIST task-IL": {"joint": {0: 99.51}, "naive": {0: 97.86}, "er": {200: 97.86, 500: 99.04, 5120: 99.33},
                          "der": {200: 98.80, 500: 98.84, 5120: 99.29},
                          "derpp": {200: 98.76, 500: 98.94, 5120: 99.47}},
}
NAMES = {"naive": "SGD", "er": "ER", "der": "DER", "derpp": "DER++", "joint": "JOINT", "fip": "FIP",
         "fip_stored": "FIP (stored anchors)"}


def benchmark_of(cfg: dict) -> list[tuple[str, str]]:
    """(benchmark, setting key in summary.json) pairs a run's config measures."""
    cc = cfg["continual"]
    if cc["stream"] == "domain":
        return [("P-MNIST" if cc["domain"] == "permute" else "R-MNIST", "class")]
    return [("Seq-MNIST class-IL", "class"), ("Seq-MNIST task-IL", "task")]


def rows(run: Path) -> list[dict]:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    buffer = int(cfg["continual"]["buffer_size"])
    out = []
    for bench, setting in benchmark_of(cfg):
        for method, res in summary["methods"].items():
            m = res if summary["setting"] == setting else res[f"{setting}_incremental"]
            pub = PUBLISHED[bench].get(method, {})
            ref = pub.get(0, pub.get(buffer))
            out.append({"benchmark": bench, "buffer": buffer, "method": method, "acc": 100 * m["acc_mean"],
                        "std": 100 * m["acc_std"], "published": ref, "seeds": len(summary["seeds"]),
                        "seconds": m["seconds"]})
    return out


def main(argv: list[str]) -> None:
    table = [r for run in argv for r in rows(Path(run))]
    print("| benchmark | buffer | method | ours (mean ± std, %) | published (%) | ours − published | seeds | s/seed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        pub = "—" if r["published"] is None else f"{r['published']:.2f}"
        diff = "—" if r["published"] is None else f"{r['acc'] - r['published']:+.2f}"
        print(f"| {r['benchmark']} | {r['buffer']} | {NAMES.get(r['method'], r['method'])} | "
              f"{r['acc']:.2f} ± {r['std']:.2f} | {pub} | {diff} | {r['seeds']} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
