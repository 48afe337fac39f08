"""Unit tests for fipray.models: every registered family builds, runs and reloads offline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fipray.models import MODELS, Normalize, create_model, list_models

NUM_CLASSES = 7

TINY_BERT = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)
TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8
)

# (name, input_shape, kwargs); covers every registry entry plus the timm prefix.
CASES = [
    ("mlp", (1, 8, 8), {}),
    ("mlp", (20,), {"hidden": (16,)}),
    ("lenet_300_100", (1, 8, 8), {}),
    ("small_cnn", (1, 8, 8), {}),
    ("small_cnn", (3, 32, 32), {"width": 0.25}),
    ("small_bn_cnn", (1, 8, 8), {}),
    ("small_bn_cnn", (3, 32, 32), {"width": 0.25, "fc": 16}),
    ("mnist_fast_cnn", (1, 28, 28), {}),
    ("lenet5_mnist", (1, 28, 28), {}),
    ("timm:resnet18", (3, 32, 32), {}),
    ("timm:vit_tiny_patch16_224", (3, 32, 32), {"patch_size": 8, "depth": 2}),
    ("hf_bert", (12,), {"config": TINY_BERT}),
    ("hf_vit", (3, 32, 32), {"config": TINY_VIT}),
]


def _inputs(name: str, input_shape: tuple[int, ...], batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if name == "hf_bert":
        ids = torch.randint(1, 100, (batch, *input_shape), generator=gen)
        ids[0, -4:] = 0  # some padding, so the derived attention mask matters
        return ids
    return torch.rand(batch, *input_shape, generator=gen)


@pytest.mark.parametrize(("name", "input_shape", "kwargs"), CASES, ids=lambda v: str(v)[:40])
def test_forward_gives_plain_logits(name, input_shape, kwargs):
    model = create_model(name, num_classes=NUM_CLASSES, input_shape=input_shape, **kwargs).eval()
    with torch.no_grad():
        out = model(_inputs(name, input_shape))
    assert type(out) is torch.Tensor
    assert out.shape == (3, NUM_CLASSES)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_cases_cover_registry():
    covered = {name for name, _, _ in CASES}
    assert set(MODELS.names()) <= covered
    assert "timm:*" in list_models()
    assert list_models("hf_*") == ["hf_bert", "hf_vit"]


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "hf_bert"])
def test_architecture_is_reconstructable(name):
    _, shape, kwargs = next(c for c in CASES if c[0] == name)
    spec = {"name": name, "kwargs": kwargs, "num_classes": NUM_CLASSES, "input_shape": shape}
    a = create_model(
        spec["name"], num_classes=spec["num_classes"], input_shape=spec["input_shape"], **spec["kwargs"]
    )
    b = create_model(
        spec["name"], num_classes=spec["num_classes"], input_shape=spec["input_shape"], **spec["kwargs"]
    )
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    assert shapes_a == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = _inputs(name, shape)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_small_cnn_has_no_batch_coupling():
    model = create_model("small_cnn", num_classes=10, input_shape=(1, 8, 8)).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(x)[:2], model(x[:2]))


def test_small_bn_cnn_has_batchnorm_and_runs_in_both_modes():
    model = create_model("small_bn_cnn", num_classes=10, input_shape=(1, 8, 8), width=0.5)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(bns) == len(convs) == 3 and all(c.bias is None for c in convs)
    assert [b.num_features for b in bns] == [16, 32, 32]
    x = torch.rand(6, 1, 8, 8)
    model.train()
    out = model(x)
    assert out.shape == (6, 10) and torch.isfinite(out).all()
    out.sum().backward()  # gradients reach the BatchNorm affine parameters
    assert all(b.weight.grad is not None and int(b.num_batches_tracked) == 1 for b in bns)
    assert not torch.allclose(bns[0].running_mean, torch.zeros(16))  # train mode updated the statistics
    # Train mode couples the examples of a batch; eval mode (running statistics) does not.
    with torch.no_grad():
        assert not torch.allclose(model(x)[:2], model(x[:2]))
        model.eval()
        torch.testing.assert_close(model(x)[:2], model(x[:2]))
        assert int(bns[0].num_batches_tracked) == 3  # the two train-mode calls above; eval left it alone


def test_unknown_name_lists_available():
    with pytest.raises(KeyError, match="small_cnn") as info:
        create_model("no_such_model", num_classes=2, input_shape=(4,))
    assert "lenet_300_100" in str(info.value)
    with pytest.raises(KeyError, match="no_such_arch"):
        create_model("timm:no_such_arch", num_classes=2, input_shape=(3, 32, 32))


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (4,)), ("lenet_300_100", (4,)), ("hf_bert", (8,)), ("timm:resnet18", (3, 32, 32))],
)
def test_unknown_kwarg_is_named(name, shape):
    with pytest.raises(TypeError, match="bogus_option"):
        create_model(name, num_classes=2, input_shape=shape, bogus_option=3)


def test_timm_pretrained_is_refused():
    with pytest.raises(ValueError, match="checkpoint"):
        create_model("timm:resnet18", num_classes=2, input_shape=(3, 32, 32), pretrained=True)


def test_normalize_applies_mean_std():
    x = torch.rand(4, 1, 8, 8)
    model = create_model("mlp", num_classes=3, input_shape=(1, 8, 8), mean=[0.5], std=[0.25]).eval()
    assert isinstance(model[0], Normalize)
    torch.testing.assert_close(model(x), model[1]((x - 0.5) / 0.25))
    # Statistics are architecture, not weights: they stay out of state dicts and parameters.
    assert set(model.state_dict()) == {"1." + k for k in model[1].state_dict()}
    assert sum(p.numel() for p in model[0].parameters()) == 0


def test_normalize_is_per_channel():
    norm = Normalize([0.1, 0.2, 0.3], [0.5, 1.0, 2.0], (3, 4, 4))
    x = torch.rand(2, 3, 4, 4)
    out = norm(x)
    for c, (m, s) in enumerate([(0.1, 0.5), (0.2, 1.0), (0.3, 2.0)]):
        torch.testing.assert_close(out[:, c], (x[:, c] - m) / s)
    with pytest.raises(ValueError, match="expected 1 or 3"):
        Normalize([0.1, 0.2], [1.0, 1.0], (3, 4, 4))
    with pytest.raises(ValueError, match="both mean and std"):
        create_model("mlp", num_classes=2, input_shape=(4,), mean=[0.0])
    with pytest.raises(ValueError, match="token ids"):
        create_model("hf_bert", num_classes=2, input_shape=(8,), config=TINY_BERT, mean=[0.0], std=[1.0])


def test_hf_bert_pretrained_dir_round_trip(tmp_path):
    model = create_model("hf_bert", num_classes=3, input_shape=(12,), config=TINY_BERT).eval()
    model.model.save_pretrained(tmp_path / "bert")
    loaded = create_model(
        "hf_bert", num_classes=3, input_shape=(12,), pretrained_dir=tmp_path / "bert"
    ).eval()
    ids = _inputs("hf_bert", (12,))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    # A different head size re-initialises the classifier but keeps the encoder.
    other = create_model("hf_bert", num_classes=5, input_shape=(12,), pretrained_dir=tmp_path / "bert")
    assert other(ids).shape == (3, 5)


def test_hf_vit_pretrained_dir_round_trip(tmp_path):
    model = create_model("hf_vit", num_classes=3, input_shape=(3, 32, 32), config=TINY_VIT).eval()
    model.model.save_pretrained(tmp_path / "vit")
    loaded = create_model(
        "hf_vit", num_classes=3, input_shape=(3, 32, 32), pretrained_dir=tmp_path / "vit"
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_hf_missing_pretrained_dir_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_model("hf_bert", num_classes=2, input_shape=(8,), pretrained_dir=missing)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_checkpoint_round_trip(tmp_path, suffix):
    from safetensors.torch import save_file

    kwargs = {"patch_size": 8, "depth": 1}
    shape = (3, 32, 32)
    model = create_model("timm:vit_tiny_patch16_224", num_classes=4, input_shape=shape, **kwargs).eval()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = create_model(
        "timm:vit_tiny_patch16_224", num_classes=4, input_shape=shape, checkpoint=path, **kwargs
    ).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_checkpoint_loads_into_normalized_model_either_layout(tmp_path):
    from safetensors.torch import save_file

    plain = create_model("small_cnn", num_classes=3, input_shape=(1, 8, 8), width=0.25).eval()
    save_file(plain.state_dict(), str(tmp_path / "plain.safetensors"))
    normed = create_model(
        "small_cnn",
        num_classes=3,
        input_shape=(1, 8, 8),
        width=0.25,
        mean=[0.5],
        std=[0.5],
        checkpoint=tmp_path / "plain.safetensors",
    ).eval()
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(normed(x), plain((x - 0.5) / 0.5))
    save_file(normed.state_dict(), str(tmp_path / "normed.safetensors"))
    again = create_model(
        "small_cnn",
        num_classes=3,
        input_shape=(1, 8, 8),
        width=0.25,
        mean=[0.5],
        std=[0.5],
        checkpoint=tmp_path / "normed.safetensors",
    ).eval()
    torch.testing.assert_close(again(x), normed(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        create_model("mlp", num_classes=3, input_shape=(1, 8, 8), checkpoint=tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_model("mlp", num_classes=3, input_shape=(1, 8, 8), checkpoint=tmp_path / "missing.safetensors")
