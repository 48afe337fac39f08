"""The matrix-free FIP metric g = JᵀHJ / B against explicit Jacobians and Hessians (float64)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import hessian

from fipray.core.distances import get_distance
from fipray.core.metric import flat_dot, metric_norm, metric_vp
from fipray.models import create_model

B, C = 7, 4
INPUT_SHAPE = (1, 2, 3)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=C, input_shape=INPUT_SHAPE, hidden=[5]).double()
    x = torch.randn(B, *INPUT_SHAPE, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    def unflatten(w):
        return {k: t.reshape(s) for k, t, s in zip(keys, torch.split(w, sizes), shapes)}

    def flatten(d):
        return torch.cat([d[k].reshape(-1) for k in keys])

    w = flatten(params)
    J = torch.func.jacrev(lambda w_: f(unflatten(w_)))(w)  # (B, C, P)
    assert J.shape == (B, C, w.numel())
    return {"f": f, "params": params, "flatten": flatten, "unflatten": unflatten, "w": w,
            "J": J.reshape(B * C, -1), "y0": f(params).detach()}


def _tangent(s, seed):
    g = torch.Generator().manual_seed(seed)
    return s["unflatten"](torch.randn(s["w"].numel(), generator=g, dtype=torch.float64))


def test_metric_vp_equals_explicit_jtj(setup):
    s = setup
    J = s["J"]
    for seed in (1, 2, 3):
        v = _tangent(s, seed)
        got = s["flatten"](metric_vp(s["f"], s["params"], v))
        want = J.T @ (J @ s["flatten"](v)) / B
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)
        assert float(want.norm()) > 1e-3  # the check is not vacuous


def test_metric_vp_is_linear_in_v(setup):
    s = setup
    u, v = _tangent(s, 4), _tangent(s, 5)
    combo = {k: 2.0 * u[k] - 3.0 * v[k] for k in u}
    lhs = s["flatten"](metric_vp(s["f"], s["params"], combo))
    rhs = 2.0 * s["flatten"](metric_vp(s["f"], s["params"], u)) - 3.0 * s["flatten"](metric_vp(s["f"], s["params"], v))
    torch.testing.assert_close(lhs, rhs, rtol=1e-8, atol=1e-10)


def test_metric_norm_equals_vT_g_v(setup):
    s = setup
    J = s["J"]
    for seed in (6, 7):
        v = _tangent(s, seed)
        n = metric_norm(s["f"], s["params"], v)
        assert n.ndim == 0
        explicit = (J @ s["flatten"](v)).pow(2).sum() / B
        torch.testing.assert_close(n, explicit, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(n, flat_dot(v, metric_vp(s["f"], s["params"], v)), rtol=1e-6, atol=0.0)
        assert float(n) > 0.0


def test_metric_norm_is_output_displacement_to_first_order(setup):
    # ⟨dw, dw⟩_g ≈ ‖f(w + dw) − f(w)‖² / B for a small step dw.
    s = setup
    v = _tangent(s, 8)
    eps = 1e-5
    dw = {k: eps * t for k, t in v.items()}
    moved = s["f"]({k: s["params"][k] + dw[k] for k in dw})
    disp = (moved - s["y0"]).pow(2).sum() / B
    torch.testing.assert_close(metric_norm(s["f"], s["params"], dw), disp, rtol=1e-3, atol=0.0)


def _output_hessian(name, y0):
    d = get_distance(name)
    n = y0.shape[0]
    H = hessian(lambda y: d(y, y0) * n, y0.clone())
    return H.reshape(n * C, n * C)


def _fisher_over_4(y0):
    # Analytic Hessian of y ↦ Σ_b BhattacharyyaDistance(softmax(y_b), softmax(y0_b)) at y = y0:
    # block-diagonal (diag(p_b) − p_b p_bᵀ) / 4 (1/8 of the Fisher metric, twice for the Hessian).
    p = torch.softmax(y0, -1)
    blocks = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / 4
    return torch.block_diag(*blocks)


def test_metric_vp_with_bhattacharyya_equals_jT_H_j_of_autograd_hessian(setup):
    s = setup
    H = _output_hessian("bhattacharyya", s["y0"])
    J = s["J"]
    v = _tangent(s, 9)
    got = s["flatten"](metric_vp(s["f"], s["params"], v, distance=get_distance("bhattacharyya")))
    want = J.T @ (H @ (J @ s["flatten"](v))) / B
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)


def test_bhattacharyya_output_hessian_is_quarter_fisher(setup):
    s = setup
    torch.testing.assert_close(_output_hessian("bhattacharyya", s["y0"]), _fisher_over_4(s["y0"]),
                               rtol=1e-6, atol=1e-12)


def test_metric_vp_with_bhattacharyya_equals_analytic_gauss_newton(setup):
    s = setup
    J = s["J"]
    v = _tangent(s, 10)
    got = s["flatten"](metric_vp(s["f"], s["params"], v, distance=get_distance("bhattacharyya")))
    want = J.T @ (_fisher_over_4(s["y0"]) @ (J @ s["flatten"](v))) / B
    assert float(want.norm()) > 1e-6
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)


def test_metric_vp_with_kl_equals_jT_fisher_j(setup):
    s = setup
    J = s["J"]
    q = torch.softmax(s["y0"], -1)
    fisher = torch.block_diag(*(torch.diag_embed(q) - q[:, :, None] * q[:, None, :]))
    v = _tangent(s, 15)
    got = s["flatten"](metric_vp(s["f"], s["params"], v, distance=get_distance("kl")))
    want = J.T @ (fisher @ (J @ s["flatten"](v))) / B
    assert float(want.norm()) > 1e-6
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)


def test_metric_vp_with_l2_distance_is_twice_euclidean(setup):
    # d = mean_b ‖y_b − y0_b‖², so the Hessian of B·d is 2I and g_l2 = 2 JᵀJ / B.
    s = setup
    v = _tangent(s, 11)
    got = s["flatten"](metric_vp(s["f"], s["params"], v, distance=get_distance("l2")))
    want = 2.0 * s["flatten"](metric_vp(s["f"], s["params"], v))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("distance", [None, "bhattacharyya", "l2"])
def test_metric_is_symmetric(setup, distance):
    s = setup
    dist = get_distance(distance) if distance else None
    u, v = _tangent(s, 12), _tangent(s, 13)
    ugv = flat_dot(u, metric_vp(s["f"], s["params"], v, distance=dist))
    vgu = flat_dot(v, metric_vp(s["f"], s["params"], u, distance=dist))
    torch.testing.assert_close(ugv, vgu, rtol=1e-8, atol=1e-12)
    # and positive semi-definite
    assert float(flat_dot(u, metric_vp(s["f"], s["params"], u, distance=dist))) >= -1e-12


def test_metric_vp_returns_params_shaped_dict(setup):
    s = setup
    v = _tangent(s, 14)
    gv = metric_vp(s["f"], s["params"], v)
    assert set(gv) == set(s["params"])
    for k in gv:
        assert gv[k].shape == s["params"][k].shape
        assert gv[k].dtype == torch.float64
