"""docs/img/sparsify_mnist_lenet.png: accuracy vs remaining weights on MNIST, ours beside the published points.

    python benchmarks/plot_sparsify_mnist.py RUN_DIR [LONG_RUN_DIR] --out docs/img/sparsify_mnist_lenet.png

RUN_DIR is a `fipray sparsify --config jobs/configs/sparsify_mnist_lenet.yaml` output folder (its summary.json);
LONG_RUN_DIR optionally one with 40-epoch lth levels, drawn dashed. Published points (LeNet-300-100, MNIST; their
sparsity counts every weight, the output layer included): Han et al. 2015, DNS (Guo et al. 2016), Sparse VD
(Molchanov et al. 2017); the lottery-ticket band (Frankle & Carbin 2019: dense accuracy down to ~3.5% remaining).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fipray.report import pyplot, save_figure

# (label, remaining fraction, test accuracy)
PUBLISHED = [("Han et al. 2015 (8%, 1.59% err.)", 0.08, 0.9841), ("DNS (1.8%, 1.99% err.)", 0.018, 0.9801),
             ("Sparse VD (1.5%, 1.92% err.)", 0.015, 0.9808)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(args.runs):
        s = json.loads((run / "summary.json").read_text())
        for method, cells in s["methods"].items():
            if i > 0 and method != "lth":
                continue  # the long run adds its lth curve only
            xs = [1 - c["sparsity"] for c in cells.values()]
            ys = [c["accuracy_mean"] for c in cells.values()]
            es = [c["accuracy_std"] for c in cells.values()]
            label = method if i == 0 else f"{method}, 40 epochs/level (seed 0)"
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, ls="--" if i else "-", label=label)
    for label, x, y in PUBLISHED:
        ax.plot([x], [y], marker="*", ms=11, ls="none", label=label)
    ax.fill_between([1.0, 0.035], 0.978, 0.982, color="grey", alpha=0.2, label="LTH paper: ~98% down to 3.5% left")
    ax.set_xscale("log")
    ax.set_ylim(0.85, 0.99)
    ax.invert_xaxis()
    ax.set_xlabel("counted weights remaining (1 − sparsity, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("LeNet-300-100 on MNIST: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    save_figure(fig, args.out)


if __name__ == "__main__":
    main()
