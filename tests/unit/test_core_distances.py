"""Output distances d(f(x; w), f(x; w_anchor)): zero exactly on equal outputs, positive otherwise."""

from __future__ import annotations

import pytest
import torch

from fipray.core.distances import DISTANCES, bhattacharyya, get_distance

NAMES = ("bhattacharyya", "kl", "l2")
SOFTMAX_INVARIANT = ("bhattacharyya", "kl")


def _logits(b: int = 16, c: int = 10, scale: float = 3.0, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=dtype) * scale


def test_registry_holds_the_three_distances():
    assert set(NAMES) <= set(DISTANCES.names())
    for n in NAMES:
        assert n in DISTANCES
        assert get_distance(n) is DISTANCES.get(n)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_on_identical_logits(name, dtype):
    d = get_distance(name)
    y = _logits(dtype=dtype)
    v = d(y, y.clone())
    assert v.ndim == 0
    assert abs(float(v)) <= 1e-6


@pytest.mark.parametrize("name", SOFTMAX_INVARIANT)
def test_zero_on_logits_shifted_per_row(name):
    # softmax(y + c_b) = softmax(y): distances between distributions must not see the shift.
    d = get_distance(name)
    y = _logits(seed=1)
    shift = torch.linspace(-50.0, 50.0, y.shape[0]).unsqueeze(1)
    assert abs(float(d(y + shift, y))) <= 1e-6
    assert abs(float(d(y, y + shift))) <= 1e-6


def test_l2_sees_a_per_row_shift():
    # The Euclidean logit distance is not softmax-invariant: a shift c in C classes costs C c².
    y = _logits(b=4, c=10)
    got = float(get_distance("l2")(y + 0.5, y))
    assert got == pytest.approx(10 * 0.25, rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_positive_on_different_logits(name):
    d = get_distance(name)
    a, b = _logits(seed=2), _logits(seed=3)
    assert float(d(a, b)) > 1e-3
    # A tiny perturbation of one row still gives a strictly positive (small) distance.
    a64 = a.double()
    b64 = a64.clone()
    b64[0, 0] += 1e-2
    v = float(d(b64, a64))
    assert 0.0 < v < 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_batch_mean_and_sequence_outputs(name):
    # Each row is one distribution, the result is the batch mean, and (B, T, C) counts B*T rows.
    d = get_distance(name)
    a, b = _logits(b=12, seed=4).double(), _logits(b=12, seed=5).double()
    rows = torch.stack([d(a[i : i + 1], b[i : i + 1]) for i in range(12)])
    assert float(d(a, b)) == pytest.approx(float(rows.mean()), rel=1e-10)
    assert float(d(a.reshape(3, 4, 10), b.reshape(3, 4, 10))) == pytest.approx(float(d(a, b)), rel=1e-10)


def _bhattacharyya_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The paper's formula, literally: -log Σ_c sqrt(p_c q_c), averaged over the batch (float64).
    p = torch.softmax(a.double(), dim=-1)
    q = torch.softmax(b.double(), dim=-1)
    return (-torch.log(torch.sqrt(p * q).sum(-1))).mean()


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
def test_bhattacharyya_matches_paper_formula(scale):
    a, b = _logits(scale=scale, seed=6).double(), _logits(scale=scale, seed=7).double()
    got = bhattacharyya(a, b)
    want = _bhattacharyya_reference(a, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    # float32 inputs agree with the float64 reference too (looser: float32 rounding).
    torch.testing.assert_close(bhattacharyya(a.float(), b.float()).double(), want, rtol=1e-4, atol=1e-6)


def test_kl_matches_its_definition():
    a, b = _logits(seed=8).double(), _logits(seed=9).double()
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    want = (q * (q.log() - p.log())).sum(-1).mean()  # KL(q_anchor || p)
    torch.testing.assert_close(get_distance("kl")(a, b), want, rtol=1e-6, atol=0.0)


def test_l2_matches_its_definition():
    a, b = _logits(seed=10).double(), _logits(seed=11).double()
    torch.testing.assert_close(get_distance("l2")(a, b), ((a - b) ** 2).sum(-1).mean(), rtol=1e-12, atol=0.0)


def _extreme_pairs():
    big = 1e4
    a = torch.tensor([[big, -big, 0.0], [-big, big, 0.0], [big, big, -big], [0.0, 0.0, 0.0]])
    b = torch.tensor([[-big, big, 0.0], [-big, big, 0.0], [-big, -big, big], [big, -big, 0.0]])
    return a, b


@pytest.mark.parametrize("name", NAMES)
def test_finite_values_and_gradients_for_extreme_logits(name):
    d = get_distance(name)
    a, b = _extreme_pairs()
    x = a.clone().requires_grad_(True)
    v = d(x, b)
    assert torch.isfinite(v)
    assert float(v.detach()) > 0.0
    (g,) = torch.autograd.grad(v, x)
    assert torch.isfinite(g).all()
    # Identical extreme outputs are still at distance 0.
    assert abs(float(d(a, a.clone()))) <= 1e-6


def test_bhattacharyya_extreme_value_is_exact():
    # p = (1, 0, 0), q = (0, 1, 0) up to exp(-2e4): Σ sqrt(p q) = 2 exp(-1e4), so d = 1e4 - log 2,
    # which the log-space form keeps while a literal sqrt(p q) underflows to -log(0) = inf.
    a = torch.tensor([[1e4, -1e4, -1e4]], dtype=torch.float64)
    b = torch.tensor([[-1e4, 1e4, -1e4]], dtype=torch.float64)
    got = bhattacharyya(a, b)
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(1e4 - float(torch.log(torch.tensor(2.0, dtype=torch.float64))), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_finite_and_zero_at_the_anchor(name):
    d = get_distance(name)
    y0 = _logits(seed=12).double()
    x = y0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(d(x, y0), x)
    assert torch.isfinite(g).all()
    assert float(g.abs().max()) <= 1e-10  # the anchor is a minimum
    # Away from the anchor the gradient is finite and non-zero.
    x = (y0 + 0.3 * _logits(seed=13).double()).requires_grad_(True)
    (g,) = torch.autograd.grad(d(x, y0), x)
    assert torch.isfinite(g).all()
    assert float(g.abs().max()) > 1e-6


def test_unknown_distance_lists_available_names():
    with pytest.raises(KeyError) as e:
        get_distance("hellinger")
    msg = str(e.value)
    assert "hellinger" in msg
    for n in NAMES:
        assert n in msg
