"""The `spectrum` operation (`fipray spectrum`): the metric g's top eigenvalues, spectral density and invariant-subspace fraction.

At the network trained per `train` (and optionally at the nodes of a stored network set, e.g. the
networks sampled along composed FIPs), on `spectrum.points` training inputs:

* top-k eigenvalues of g by Lanczos (with residual bounds |λ − θ| ≤ r),
* the eigenvalue density by stochastic Lanczos quadrature,
* the fraction of the P eigenvalues below each threshold (the paper's functionally invariant
  subspace dimension, over P), next to the exact lower bound 1 − rank/P with rank ≤ C·N.

g is never formed: each product is one JVP + one VJP (`fipray.core.metric.metric_operator`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fipray.config import Config, ConfigError, knob
from fipray.core.distances import get_distance
from fipray.core.metric import FlatView, metric_operator
from fipray.core.spectrum import slq, top_eigen
from fipray.operation import Operation, register_operation
from fipray.runtime import RunContext, train_base, write_outputs


@dataclass(frozen=True)
class SpectrumConfig:
    """Spectrum of the metric g at the trained network (`fipray spectrum`), matrix-free."""

    points: int = knob(256, gt=0)  # N training inputs on which g = JᵀJ / N is taken
    top_k: int = knob(20, gt=0)
    lanczos_iters: int = knob(0, ge=0)  # 0: max(3 top_k, top_k + 30)
    slq_probes: int = knob(4, ge=0)  # stochastic Lanczos quadrature probes for the density (0: skip it)
    slq_iters: int = knob(40, gt=0)
    thresholds: tuple[float, ...] = (1e-3,)  # report the fraction of eigenvalues below each
    metric: str = knob("euclidean", choices=("euclidean", "distance"))  # distance: Gauss-Newton of path.distance
    along: str = ""  # a network-set folder (fipray compose): also the spectrum at its nodes
    max_networks: int = knob(6, gt=0)  # at most this many nodes of `along`, evenly spaced
    precision: str = knob("float32", choices=("float32", "float64"))  # float64 resolves eigenvalues ≪ λ_max·1e-6


def metric_matvec(model: nn.Module, x: Tensor, distance=None) -> tuple:
    """Flat v -> g·v for `model` (eval mode) on inputs x (N, ...); returns (matvec, FlatView)."""
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def f(p: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, ({**frozen, **p}, buffers), (x,))

    view = FlatView(params)
    return view.operator(metric_operator(f, params, distance=distance)), view


def spectrum_of(model: nn.Module, x: Tensor, sc: SpectrumConfig, *, distance=None, seed: int = 0) -> dict:
    """Top-k Ritz values (with residuals) and the SLQ rule of g at `model` on inputs x."""
    if sc.precision == "float64":
        # Rounding in float32 products puts g's exact zeros at ~λ_max·1e-6; double precision
        # separates the null space from small non-zero eigenvalues (at ~2x the cost on a CPU).
        model, x = copy.deepcopy(model).double(), x.double()
    matvec, view = metric_matvec(model, x, distance)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    eig = top_eigen(matvec, view.numel, sc.top_k, iters=sc.lanczos_iters, generator=gen,
                    dtype=view.dtype, device=view.device, vectors=False)
    t_top = time.perf_counter() - t0
    t0 = time.perf_counter()
    quad = slq(matvec, view.numel, probes=sc.slq_probes, iters=sc.slq_iters, generator=gen,
               dtype=view.dtype, device=view.device) if sc.slq_probes else None
    t_slq = time.perf_counter() - t0
    with torch.no_grad():
        c = int(model(x[:1]).shape[-1])
    rank = min(view.numel, c * len(x))
    lowest = float(quad.nodes[:, 0].median()) if quad is not None else float("nan")
    return {"num_params": view.numel, "num_points": len(x), "eigen": eig, "quadrature": quad,
            "top_seconds": t_top, "slq_seconds": t_slq, "rank_bound": rank,
            "zero_fraction_lower_bound": 1.0 - rank / view.numel, "slq_lowest_node": lowest,
            "fraction_below": {f"{t:g}": quad.fraction_below(t) for t in sc.thresholds} if quad else {}}


def _plot_density(results: list[tuple[str, dict]], path: Path, thresholds: tuple[float, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fipray.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(float(r["eigen"].values[0]) for _, r in results)
    grid = torch.linspace(-10.0, math.log10(max(top, 1e-9)) + 1.0, 600, dtype=torch.float64)
    for name, r in results:
        if r["quadrature"] is None:
            continue
        dens = r["quadrature"].density(grid, sigma=0.15)
        ax.plot(grid.numpy(), dens.numpy(), label=name)
    for t in thresholds:
        ax.axvline(math.log10(t), color="gray", ls=":", lw=1)
    ax.set_xlabel("log10 eigenvalue of g (mass at the left edge: λ ≤ 1e-10)")
    ax.set_ylabel("density (SLQ, per decade)")
    ax.set_title("Spectral density of the metric g")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _networks(ctx: RunContext, seed: int) -> list[tuple[str, nn.Module]]:
    """The trained base network, then up to `spectrum.max_networks` nodes of the set `spectrum.along`."""
    cfg, sc = ctx.cfg, ctx.cfg.spectrum
    xtr, ytr = ctx.train_tensors()
    with ctx.progress(cfg.train.steps, "spectrum: base"):
        base = ctx.model(seed)
        train_base(base, xtr, ytr, cfg, seed, progress=ctx.bar, out_dir=ctx.base_dir(seed))
    networks: list[tuple[str, nn.Module]] = [("base", base)]
    if sc.along:
        from fipray.netset import load_set

        try:
            nset = load_set(sc.along)
        except FileNotFoundError as e:
            raise ConfigError(f"config key 'spectrum.along': {e}") from None
        if nset.model_spec != ctx.spec:
            raise ConfigError(f"config key 'spectrum.along': the set's model {nset.model_spec} is not this "
                              f"config's {ctx.spec}")
        ids = nset.node_ids()
        pick = sorted({round(i) for i in np.linspace(0, len(ids) - 1, min(sc.max_networks, len(ids)))})
        networks += [(ids[i], nset.model(ids[i], ctx.device)) for i in pick]
    return networks


def _rows(name: str, r: dict) -> tuple[list[dict], list[dict]]:
    """Eigenvalue rows and SLQ quadrature rows of one network."""
    eig = [{"network": name, "rank": i + 1, "eigenvalue": v, "residual_bound": res}
           for i, (v, res) in enumerate(zip(r["eigen"].values.tolist(), r["eigen"].residuals.tolist()))]
    quad = []
    if r["quadrature"] is not None:
        q = r["quadrature"]
        quad = [{"network": name, "probe": p, "node": float(q.nodes[p, j]), "weight": float(q.weights[p, j])}
                for p in range(q.nodes.shape[0]) for j in range(q.nodes.shape[1])]
    return eig, quad


@register_operation
class Spectrum(Operation):
    """Top eigenvalues, density and invariant-subspace fraction of the metric g."""

    name = "spectrum"
    help = "spectrum of the metric g: top eigenvalues, density, invariant fraction"
    section = SpectrumConfig
    smoke = ("seeds=[0]", "train.steps=40", "spectrum.points=32", "spectrum.top_k=3", "spectrum.slq_probes=1",
             "spectrum.slq_iters=10")

    def uses_path_steps(self, cfg: Config) -> bool:
        """The spectrum is taken at trained networks; no FIP path walks here, so path.steps may be 0."""
        return False

    def run(self, ctx: RunContext) -> dict:
        cfg, sc = ctx.cfg, ctx.cfg.spectrum
        distance = get_distance(cfg.path.distance) if sc.metric == "distance" else None
        xtr, _ = ctx.train_tensors()
        if sc.points > len(xtr):
            raise ConfigError(f"config key 'spectrum.points': {sc.points} exceeds the {len(xtr)} training inputs")
        seed = cfg.seeds[0]
        x = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[: sc.points].to(ctx.device)]
        t0 = time.perf_counter()
        results = [(name, spectrum_of(model, x, sc, distance=distance, seed=seed)) for name, model in _networks(ctx, seed)]
        summary = self.aggregate(cfg, results, time.perf_counter() - t0)
        self.report(ctx, summary, results)
        return summary

    @staticmethod
    def aggregate(cfg: Config, results: list[tuple[str, dict]], seconds: float) -> dict:
        sc, first = cfg.spectrum, results[0][1]
        return {
            "operation": "spectrum", "num_params": first["num_params"], "num_points": first["num_points"],
            "top_eigenvalues": first["eigen"].values.tolist(), "fraction_below": first["fraction_below"],
            "seconds": seconds,
            "top_eigen_seconds": first["top_seconds"], "slq_seconds": first["slq_seconds"],
            "residual_bounds": first["eigen"].residuals.tolist(), "lanczos_iters": first["eigen"].iters,
            "rank_bound": first["rank_bound"], "zero_fraction_lower_bound": first["zero_fraction_lower_bound"],
            "slq_lowest_node": first["slq_lowest_node"],
            "metric": sc.metric, "distance": cfg.path.distance if sc.metric == "distance" else "euclidean (JᵀJ)",
            "seed": cfg.seeds[0],
            "networks": [{"network": n, "top_eigenvalue": float(r["eigen"].values[0]),
                          "fraction_below": r["fraction_below"], "seconds": r["top_seconds"] + r["slq_seconds"]}
                         for n, r in results],
        }

    @staticmethod
    def report(ctx: RunContext, summary: dict, results: list[tuple[str, dict]]) -> None:
        from fipray import report

        cfg, sc, out = ctx.cfg, ctx.cfg.spectrum, ctx.out
        assert out is not None
        first = results[0][1]
        _plot_density(results, out / "density.png", sc.thresholds)
        rows = [[n, float(r["eigen"].values[0]), float(r["eigen"].values[-1]),
                 ", ".join(f"{v:.4f}" for v in r["fraction_below"].values()), f"{r['zero_fraction_lower_bound']:.4f}",
                 round(r["top_seconds"] + r["slq_seconds"], 1)] for n, r in results]
        md = "\n".join([
            f"# Spectrum of the metric g: {cfg.model.name} on {cfg.data.name}", "",
            f"P = {first['num_params']} parameters, N = {first['num_points']} training inputs, g = "
            f"{'JᵀJ / N on logits' if sc.metric == 'euclidean' else 'Gauss-Newton of ' + cfg.path.distance}; "
            f"top {sc.top_k} by Lanczos ({first['eigen'].iters} g·v products, full reorthogonalisation), "
            f"density by SLQ ({sc.slq_probes} probes × {sc.slq_iters} steps). Exact bound: rank g ≤ C·N, so at "
            f"least a fraction 1 − C·N/P of the eigenvalues is exactly 0. Resolution: SLQ places its lowest node at "
            f"{first['slq_lowest_node']:.3g} (median over probes); the null space and the smallest non-zero "
            f"eigenvalues share that node, so a threshold below it counts none of them and one above it counts all "
            f"of them: read fractions for thresholds near it with the exact bound beside them. Products in "
            f"{sc.precision}" + (" (rounding alone puts zeros at ~λ_max × 1e-7)." if sc.precision == "float32" else "."),
            "",
            report.md_table(["network", "λ_max", f"λ_{sc.top_k}",
                             "fraction below " + ", ".join(f"{t:g}" for t in sc.thresholds),
                             "zero fraction ≥", "seconds"], rows), "",
            f"Top eigenvalues (base): {', '.join(f'{v:.4g}' for v in first['eigen'].values.tolist())}", "",
            "Plot: `density.png`. Tables: `eigenvalues.parquet`, `quadrature.parquet` (SLQ nodes and weights).", ""])
        eig_rows, quad_rows = [], []
        for n, r in results:
            e, q = _rows(n, r)
            eig_rows += e
            quad_rows += q
        write_outputs(out, cfg, summary, {"eigenvalues": eig_rows, "quadrature": quad_rows}, md)

    def brief(self, summary: dict) -> dict:
        return {"top_eigenvalues": [round(v, 6) for v in summary["top_eigenvalues"][:5]],
                "fraction_below": summary["fraction_below"], "seconds": round(summary["seconds"], 1)}
