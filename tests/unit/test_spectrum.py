"""Lanczos / SLQ on the matrix-free metric against a dense eigendecomposition of an explicit JᵀJ (float64)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from fipray.core.metric import FlatView, metric_operator
from fipray.core.spectrum import lanczos, slq, top_eigen
from fipray.models import create_model

B, C = 12, 5
INPUT_SHAPE = (1, 3, 3)


@pytest.fixture(scope="module")
def tiny():
    """A tiny float64 MLP (P = 9·8 + 8 + 8·5 + 5 = 125 > C·B = 60: g is rank deficient) and its dense g."""
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=C, input_shape=INPUT_SHAPE, hidden=[8]).double()
    x = torch.randn(B, *INPUT_SHAPE, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    view = FlatView(params)

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    J = torch.func.jacrev(lambda w: f(view.unflatten(w)))(view.flatten(params)).reshape(B * C, -1)
    g = J.T @ J / B
    evals = torch.linalg.eigvalsh(g).flip(0)  # descending
    return {"matvec": view.operator(metric_operator(f, params)), "P": view.numel, "g": g, "evals": evals}


def test_top_eigenvalues_match_dense(tiny):
    k = 8
    eig = top_eigen(tiny["matvec"], tiny["P"], k, iters=80, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    want = tiny["evals"][:k]
    torch.testing.assert_close(eig.values, want, rtol=1e-4, atol=0)
    assert float(want[0]) > 1e-2  # not vacuous
    # Eigenvectors: g v = λ v, orthonormal.
    v = eig.vectors
    torch.testing.assert_close(v.T @ v, torch.eye(k, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(tiny["g"] @ v, v * eig.values, atol=1e-6 * float(want[0]), rtol=0)


def test_top_eigen_residual_bounds_hold_with_few_iterations(tiny):
    eig = top_eigen(tiny["matvec"], tiny["P"], 3, iters=12, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64, vectors=False)
    err = (eig.values - tiny["evals"][:3]).abs()
    assert torch.all(err <= eig.residuals + 1e-10)


def test_lanczos_tridiagonal_is_projection_and_basis_orthonormal(tiny):
    v0 = torch.randn(tiny["P"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tri = lanczos(tiny["matvec"], v0, 20)
    q = tri.basis
    torch.testing.assert_close(q @ q.T, torch.eye(len(q), dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(q @ tiny["g"] @ q.T, tri.matrix(), atol=1e-8, rtol=1e-8)


def test_lanczos_stops_at_an_invariant_subspace():
    # A rank-3 PSD matrix: Krylov space from any vector has dimension ≤ 4.
    u = torch.randn(30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = u @ u.T
    tri = lanczos(lambda v: a @ v, torch.randn(30, dtype=torch.float64), 20)
    assert tri.breakdown and len(tri.alpha) <= 4


def test_slq_fraction_and_moments_match_dense(tiny):
    quad = slq(tiny["matvec"], tiny["P"], probes=30, iters=60, generator=torch.Generator().manual_seed(4),
               dtype=torch.float64)
    torch.testing.assert_close(quad.weights.sum(1), torch.ones(30, dtype=torch.float64), atol=1e-10, rtol=0)
    evals = tiny["evals"]
    for thr in (1e-3, 1e-1):
        want = float((evals < thr).double().mean())
        assert abs(quad.fraction_below(thr) - want) < 0.08, (thr, quad.fraction_below(thr), want)
    # Mean eigenvalue tr(g)/P: the quadrature integrates λ exactly per probe (Hutchinson estimate).
    mean = float((quad.nodes * quad.weights).sum(1).mean())
    assert abs(mean - float(evals.mean())) < 0.25 * float(evals.mean())
    # The density integrates to ~1 over log10 λ.
    grid = torch.linspace(-12, 3, 3000, dtype=torch.float64)
    dens = quad.density(grid, sigma=0.1)
    assert abs(float(torch.trapezoid(dens, grid)) - 1.0) < 0.02


def test_spectrum_cli_writes_summary_and_tables(tmp_path, capsys):
    from fipray.cli import main

    out = tmp_path / "spec"
    rc = main(["spectrum", "--no-progress", "--out", str(out), "threads=1", "model.kwargs={hidden: [16]}",
               "train.steps=20", "spectrum.points=32", "spectrum.top_k=5", "spectrum.slq_probes=2",
               "spectrum.slq_iters=20", "spectrum.thresholds=[0.001]"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    for key in ("num_params", "num_points", "top_eigenvalues", "fraction_below", "seconds"):
        assert key in s
    assert s["num_params"] == 64 * 16 + 16 + 16 * 10 + 10 and s["num_points"] == 32
    tops = s["top_eigenvalues"]
    assert len(tops) == 5 and all(a >= b for a, b in zip(tops, tops[1:])) and tops[-1] > 0
    # rank g ≤ C·N = 320 of P = 1210: at least 73% of the eigenvalues vanish.
    assert s["fraction_below"]["0.001"] >= s["zero_fraction_lower_bound"] - 0.1
    assert s["slq_lowest_node"] >= 0
    assert pq.read_table(out / "eigenvalues.parquet").num_rows == 5
    assert (out / "density.png").stat().st_size > 0 and (out / "report.md").is_file()


def test_spectrum_bad_value_names_key(tmp_path, capsys):
    from fipray.cli import main

    rc = main(["spectrum", "--no-progress", "--out", str(tmp_path / "o"), "spectrum.metric=fisher"])
    err = capsys.readouterr().err
    assert rc == 2 and "spectrum.metric" in err and "euclidean" in err
    rc = main(["spectrum", "--no-progress", "--out", str(tmp_path / "o"), "spectrum.precision=float16"])
    err = capsys.readouterr().err
    assert rc == 2 and "spectrum.precision" in err and "float64" in err
    rc = main(["spectrum", "--no-progress", "--out", str(tmp_path / "o"), "spectrum.points=100000",
               "train.steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "spectrum.points" in err


def test_spectrum_along_a_network_set(tmp_path, capsys):
    import torch

    from fipray.cli import main
    from fipray.netset import NetworkSetWriter
    from fipray.runtime import build_model

    spec = {"name": "mlp", "kwargs": {"hidden": [8]}, "num_classes": 10, "input_shape": [1, 8, 8]}
    w = NetworkSetWriter(tmp_path / "set", spec)
    prev = None
    for i in range(3):
        w.add_node(f"n{i}", build_model(spec, i, torch.device("cpu")).state_dict(), parent=prev)
        prev = f"n{i}"
    w.close()
    out = tmp_path / "spec"
    rc = main(["spectrum", "--no-progress", "--out", str(out), "threads=1", "model.kwargs={hidden: [8]}",
               "train.steps=5", "spectrum.points=16", "spectrum.top_k=3", "spectrum.slq_probes=1",
               "spectrum.slq_iters=10", f"spectrum.along={tmp_path / 'set'}", "spectrum.max_networks=2"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert [n["network"] for n in s["networks"]] == ["base", "n0", "n2"]
    rows = pq.read_table(out / "eigenvalues.parquet").to_pylist()
    assert {r["network"] for r in rows} == {"base", "n0", "n2"}
    rc = main(["spectrum", "--no-progress", "--out", str(tmp_path / "bad"), "model.kwargs={hidden: [4]}",
               "train.steps=1", f"spectrum.along={tmp_path / 'set'}"])
    assert rc == 2 and "spectrum.along" in capsys.readouterr().err
