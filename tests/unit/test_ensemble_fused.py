"""The fused ensemble forward equals the loop over members: outputs, input and weight gradients, caching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fipray.ensemble import Ensemble
from fipray.ensemble_folder import load_ensemble, read_ensemble_meta, save_ensemble
from fipray.models import create_model

ARCHS = {
    "small_cnn": ({"width": 0.25, "fc": 16}, (1, 8, 8)),
    "mlp": ({"hidden": [16, 8]}, (1, 4, 4)),
    "lenet_300_100": ({}, (1, 4, 4)),
}


def members(name: str, k: int = 5) -> list[nn.Module]:
    kwargs, shape = ARCHS[name]
    out = []
    for i in range(k):
        torch.manual_seed(100 + i)
        out.append(create_model(name, num_classes=4, input_shape=shape, **kwargs))
    return out


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_fused_matches_loop_outputs_and_gradients(name):
    ms = members(name)
    fused, loop = Ensemble(ms), Ensemble(ms, fused=False)
    assert fused.fused and not loop.fused
    x = torch.rand(6, *ARCHS[name][1])
    assert torch.allclose(fused.member_logits(x), loop.member_logits(x), atol=1e-5)
    assert torch.allclose(fused(x), loop(x), atol=1e-5)
    # Input gradients (what attacks use) and weight gradients (autograd through the stacked copy).
    grads = []
    for ens in (fused, loop):
        ens.zero_grad()
        xg = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(ens(xg), torch.arange(6) % 4)
        loss.backward()
        grads.append((xg.grad.clone(), [p.grad.clone() for p in ens.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_stacked_copy_follows_in_place_weight_changes():
    ms = members("mlp")
    ens = Ensemble(ms)
    x = torch.rand(3, 1, 4, 4)
    with torch.no_grad():
        before = ens(x)
        ms[2][1].weight.add_(1.0)  # an optimizer-style in-place update of one member
        after = ens(x)
        ref = Ensemble(ms, fused=False)(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, ref, atol=1e-5)


def test_unsupported_architectures_use_the_loop():
    bn = [nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)) for _ in range(2)]
    assert not Ensemble(bn).fused

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x.flatten(1))

    assert not Ensemble([Custom(), Custom()]).fused
    # Same shapes but a different stride: not fusable (member 0's stride would be used for all).
    a = nn.Sequential(nn.Conv2d(1, 2, 3, stride=1), nn.Flatten(), nn.LazyLinear(2))
    b = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(1, 1, 5, 5)
    a(x), b(torch.rand(1, 1, 7, 7))  # materialise the lazy layers with equal shapes
    assert not Ensemble([a, b]).fused


def test_runtime_layout_it_cannot_express_falls_back_to_loop():
    # Linear on a 3-D input (B, T, F): valid per member, not expressible as one fused matmul here.
    ms = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6, 2)) for _ in range(3)]
    ens = Ensemble(ms)
    x = torch.rand(5, 2, 4)
    out = ens(x)
    assert not ens.fused
    assert torch.allclose(out, Ensemble(ms, fused=False)(x), atol=1e-6)


def test_load_a_subset_of_members(tmp_path):
    kwargs, shape = ARCHS["mlp"]
    ms = members("mlp", 5)
    spec = {"name": "mlp", "kwargs": kwargs, "num_classes": 4, "input_shape": list(shape)}
    save_ensemble(ms, tmp_path, model_spec=spec, metadata={"seed": 3})
    assert read_ensemble_meta(tmp_path)["num_members"] == 5
    part = load_ensemble(tmp_path, members=[3, 1])
    x = torch.rand(4, *shape)
    assert len(part) == 2
    assert torch.allclose(part.member_logits(x), torch.stack([ms[3](x), ms[1](x)]), atol=1e-6)
    for bad in ([5], [], [1, 1], [-1]):
        with pytest.raises(ValueError, match="members must be distinct indices"):
            load_ensemble(tmp_path, members=bad)


def test_functional_call_swaps_are_seen():
    ms = members("mlp", 3)
    ens = Ensemble(ms)
    x = torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        ens(x)  # fill the cache
        zeros = {k: torch.zeros_like(v) for k, v in ens.state_dict().items()}
        out = torch.func.functional_call(ens, zeros, (x,))
    # All-zero weights: uniform probabilities, not the cached members' outputs.
    assert torch.allclose(out.exp(), torch.full((2, 4), 0.25), atol=1e-6)
    assert torch.allclose(ens(x), Ensemble(ms, fused=False)(x), atol=1e-5)


def test_large_cpu_batches_take_the_loop_with_equal_results():
    from fipray.ensemble import CPU_FUSED_MAX_BATCH

    ms = members("small_cnn", 3)
    ens = Ensemble(ms)
    x = torch.rand(CPU_FUSED_MAX_BATCH + 1, *ARCHS["small_cnn"][1])
    with torch.no_grad():
        big = ens(x)
        small = torch.cat([ens(x[:CPU_FUSED_MAX_BATCH]), ens(x[CPU_FUSED_MAX_BATCH:])])
    assert ens.fused
    assert torch.allclose(big, small, atol=1e-5)


def _mlps(k: int, act: type[nn.Module], bias: bool) -> list[nn.Module]:
    torch.manual_seed(7)
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(16, 12, bias=bias), act(), nn.Linear(12, 9, bias=bias), act(),
                      nn.Linear(9, 4, bias=bias))
        for _ in range(k)
    ]


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 5, 32, 33, 130])
def test_mlp_no_grad_path_matches_the_loop(act, bias, batch):
    # Linear-only members without autograd take their own path (reused buffers, in-place activations;
    # member-by-member with transposed logits above CPU_FUSED_MAX_BATCH rows).
    ms = _mlps(4, act, bias)
    ens, loop = Ensemble(ms), Ensemble(ms, fused=False)
    assert ens._mlp
    x = torch.rand(batch, 1, 4, 4)
    with torch.no_grad():
        out, ref = ens(x), loop(x)
        lps = ens.log_prob_sum(x)
    assert out.shape == (batch, 4) and out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(lps, ref + torch.log(torch.tensor(4.0)), atol=1e-6)
    assert torch.allclose(ens(x), ref, atol=1e-6)  # with grad: the general path, same function


def test_mlp_no_grad_results_do_not_alias_reused_buffers():
    ens = Ensemble(_mlps(3, nn.ReLU, True))
    with torch.no_grad():
        for batch in (2, 40):
            x1, x2 = torch.rand(batch, 16), torch.rand(batch, 16)
            a = ens(x1)
            a_copy = a.clone()
            b = ens(x2)
            assert torch.equal(a, a_copy), "a later call overwrote an earlier result"
            assert not torch.allclose(a, b)
            assert torch.equal(ens(x1), a_copy)  # and inputs are never modified in place
            assert torch.equal(x1, x1.clone())


def test_mlp_no_grad_path_from_several_threads():
    from concurrent.futures import ThreadPoolExecutor

    ms = _mlps(3, nn.ReLU, True)
    ens, loop = Ensemble(ms), Ensemble(ms, fused=False)
    xs = [torch.rand(b, 16) for b in (1, 3, 8, 40) * 8]
    with torch.no_grad():
        refs = [loop(x) for x in xs]

    def run(x):
        with torch.no_grad():
            return ens(x)

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(run, xs))
    for out, ref in zip(outs, refs):
        assert torch.allclose(out, ref, atol=1e-6)


def test_mlp_no_grad_path_sees_weight_changes_unless_frozen():
    ms = _mlps(3, nn.ReLU, True)
    ens = Ensemble(ms)
    x = torch.rand(4, 16)
    with torch.no_grad():
        before = ens(x)
        ms[1][3].weight.mul_(3.0)
        after = ens(x)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, Ensemble(ms, fused=False)(x), atol=1e-6)
        frozen = Ensemble(ms).freeze()
        assert not any(p.requires_grad for p in frozen.parameters())
        fixed = frozen(x)
        ms[1][3].weight.mul_(3.0)
        assert torch.equal(frozen(x), fixed)  # documented: a frozen ensemble reads its weights once
    xg = x.clone().requires_grad_(True)
    frozen(xg).sum().backward()  # input gradients still work
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_rank3_inputs_without_flatten_skip_the_mlp_path():
    ms = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(2)]
    ens = Ensemble(ms)
    x = torch.rand(5, 4)
    with torch.no_grad():
        assert torch.allclose(ens(x), Ensemble(ms, fused=False)(x), atol=1e-6)
        assert not ens._mlp_fast(torch.rand(5, 2, 4))
