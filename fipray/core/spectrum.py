"""Spectrum of the FIP metric g = JᵀHJ / B, matrix-free: Lanczos and stochastic Lanczos quadrature.

The paper (section "Metric tensor spectrum defines a functionally invariant subspace") reads the
local geometry of weight space from g's eigenvalues: moving along eigenvector v_i changes the
outputs by ⟨v_i, v_i⟩_g = λ_i, so the span of eigenvectors with λ_i below a threshold (1e-3) is
the functionally invariant subspace, and its dimension is the count of such eigenvalues.

g is P × P and never formed. Everything here needs only a product v -> g·v (one JVP + one VJP,
`fipray.core.metric.metric_operator`):

* `lanczos` builds a Krylov basis Q and the tridiagonal T = Qᵀ g Q with full
  reorthogonalisation (exact arithmetic behaviour, at m × P memory);
* `top_eigen` returns the largest Ritz pairs of T with their residual bounds;
* `slq` (stochastic Lanczos quadrature, Ubaru, Chen & Saad 2017) turns a few Lanczos runs from
  random ±1 probes into a quadrature rule for the spectral density: nodes θ (Ritz values) and
  weights τ (squared first components of T's eigenvectors), so that for any function h,
  tr(h(g)) / P ≈ mean over probes of Σ τ h(θ). The fraction of eigenvalues below t is
  h = 1[λ < t].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Tridiagonal:
    """A Lanczos run: T = tridiag(beta, alpha, beta) (m × m) and the basis Q (m, P).

    `breakdown` is True when the Krylov space became invariant before the requested size (then
    T's eigenvalues are exact eigenvalues of g).
    """

    alpha: Tensor  # (m,) float64
    beta: Tensor  # (m - 1,) float64
    basis: Tensor | None  # (m, P), the matvec's dtype; None when not kept
    last_beta: float  # ‖residual‖ after the last step (residual bounds of Ritz pairs)
    breakdown: bool

    def matrix(self) -> Tensor:
        t = torch.diag(self.alpha)
        if len(self.beta):
            t += torch.diag(self.beta, 1) + torch.diag(self.beta, -1)
        return t


def lanczos(matvec: MatVec, v0: Tensor, iters: int, *, keep_basis: bool = True, tol: float = 1e-10) -> Tridiagonal:
    """Lanczos tridiagonalisation of a symmetric operator with full reorthogonalisation.

    Args:
        matvec: (P,) -> (P,), symmetric.
        v0: (P,) start vector (need not be normalised; must be non-zero).
        iters: Krylov dimension m (capped at P).
        keep_basis: return Q (needed for eigenvectors; SLQ does not need it).
        tol: a new direction with norm below tol · (scale of T) ends the run (invariant subspace).

    Returns:
        The tridiagonal (alpha, beta) in float64 and, optionally, the basis.
    """
    p = v0.numel()
    m = min(int(iters), p)
    if m < 1:
        raise ValueError(f"lanczos needs iters >= 1, got {iters}")
    nrm = float(v0.norm())
    if not nrm > 0:
        raise ValueError("lanczos start vector is zero")
    # Full reorthogonalisation against every earlier q: without it, rounding brings back
    # converged directions and T shows spurious copies of the top eigenvalues.
    q_all = torch.empty(m, p, dtype=v0.dtype, device=v0.device)
    q_all[0] = v0 / nrm
    alpha: list[float] = []
    beta: list[float] = []
    scale = 0.0
    last_beta, breakdown = 0.0, False
    for j in range(m):
        w = matvec(q_all[j])
        a = float(torch.dot(w, q_all[j]))
        alpha.append(a)
        basis = q_all[: j + 1]
        for _ in range(2):  # twice is enough (Parlett's "twice is enough")
            w = w - basis.T @ (basis @ w)
        b = float(w.norm())
        scale = max(scale, abs(a), b)
        if j == m - 1:
            last_beta = b
            break
        if b <= tol * max(scale, 1e-300):
            last_beta, breakdown = b, True
            break
        beta.append(b)
        q_all[j + 1] = w / b
    k = len(alpha)
    return Tridiagonal(
        alpha=torch.tensor(alpha, dtype=torch.float64),
        beta=torch.tensor(beta[: k - 1], dtype=torch.float64),
        basis=q_all[:k] if keep_basis else None,
        last_beta=last_beta,
        breakdown=breakdown,
    )


@dataclass(frozen=True)
class Eigen:
    """Top eigenpairs of g: values (k,) descending, vectors (P, k) orthonormal, residual bounds (k,)."""

    values: Tensor
    vectors: Tensor | None
    residuals: Tensor
    iters: int


def top_eigen(matvec: MatVec, dim: int, k: int, *, iters: int = 0, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              vectors: bool = True) -> Eigen:
    """The k largest eigenvalues of a symmetric PSD operator (Lanczos from a random start).

    Args:
        matvec: (P,) -> (P,).
        dim: P.
        k: how many eigenpairs.
        iters: Krylov dimension; 0 picks max(3k, k + 30) (capped at P). Residuals say whether
            it was enough: |λ − θ| ≤ residual for each Ritz value θ.
        generator: seeds the start vector.
        vectors: also return the eigenvectors (P, k).
    """
    if k < 1:
        raise ValueError(f"top_eigen needs k >= 1, got {k}")
    m = iters or max(3 * k, k + 30)
    v0 = torch.randn(dim, generator=generator, dtype=dtype).to(device)
    tri = lanczos(matvec, v0, m, keep_basis=vectors)
    theta, s = torch.linalg.eigh(tri.matrix())
    order = torch.argsort(theta, descending=True)[: min(k, len(theta))]
    # Residual of Ritz pair i: ‖g y_i − θ_i y_i‖ = |β_m · s_{m,i}| (0 after a breakdown).
    res = (tri.last_beta * s[-1, order]).abs() if not tri.breakdown else torch.zeros(len(order), dtype=torch.float64)
    vecs = None
    if vectors and tri.basis is not None:
        vecs = tri.basis.T @ s[:, order].to(tri.basis.dtype)
    return Eigen(values=theta[order], vectors=vecs, residuals=res, iters=len(tri.alpha))


@dataclass(frozen=True)
class Quadrature:
    """SLQ rule: nodes (n_probes, m) and weights (n_probes, m); each probe's weights sum to 1."""

    nodes: Tensor
    weights: Tensor

    def fraction_below(self, threshold: float) -> float:
        """Estimated fraction of the P eigenvalues below `threshold`."""
        return float(((self.nodes < threshold).double() * self.weights).sum(1).mean())

    def density(self, grid: Tensor, sigma: float, log: bool = True) -> Tensor:
        """Smoothed density of eigenvalues on `grid`.

        With log=True the grid is log10(λ) and each node is a Gaussian of width sigma in log10
        space (nodes ≤ 0 are placed at the grid's left end), the natural view of a spectrum that
        spans many decades; the density integrates to 1 over log10 λ.
        """
        nodes = self.nodes.flatten()
        w = self.weights.flatten() / self.nodes.shape[0]
        if log:
            nodes = torch.log10(nodes.clamp_min(10 ** float(grid[0])))
        z = (grid[:, None] - nodes[None, :]) / sigma
        return (torch.exp(-0.5 * z**2) * w[None, :]).sum(1) / (sigma * math.sqrt(2 * math.pi))


def slq(matvec: MatVec, dim: int, *, probes: int = 4, iters: int = 40, generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Quadrature:
    """Stochastic Lanczos quadrature of a symmetric operator's spectral density.

    Each probe is a Rademacher vector v/‖v‖; Lanczos from it gives T = S diag(θ) Sᵀ and the
    rule (θ_i, S_{0,i}²). Probes that stop early (invariant subspace) pad with zero weights.
    """
    if probes < 1 or iters < 1:
        raise ValueError(f"slq needs probes >= 1 and iters >= 1, got {probes}, {iters}")
    m = min(iters, dim)
    nodes = torch.zeros(probes, m, dtype=torch.float64)
    weights = torch.zeros(probes, m, dtype=torch.float64)
    for i in range(probes):
        v = (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(dtype).to(device)
        tri = lanczos(matvec, v, m, keep_basis=False)
        theta, s = torch.linalg.eigh(tri.matrix())
        nodes[i, : len(theta)] = theta
        weights[i, : len(theta)] = s[0] ** 2
    return Quadrature(nodes=nodes, weights=weights)
