"""Which tensors count towards sparsity, and the exact zero fraction over them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from fipray.eval.sparsity import counted_parameters, sparsity, sparsity_report


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),  # 0: weight 36
        nn.BatchNorm2d(4),  # 1: excluded
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),  # 4: weight 2304
        nn.LayerNorm(16),  # 5: excluded
        nn.Linear(16, 10),  # 6: head, weight 160
    )


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.tied = nn.Linear(8, 8)
        self.tied.weight = self.body.weight  # shared tensor: count once


def test_counted_parameters_cnn_excludes_bias_and_norm():
    model = small_cnn()
    assert counted_parameters(model) == ["0.weight", "4.weight", "6.weight"]
    assert counted_parameters(model, include_head=False) == ["0.weight", "4.weight"]


def test_counted_parameters_excludes_embeddings_and_dedupes_tied_weights():
    model = WithEmbedding()
    # The last *registered* nn.Linear is `tied`, but it shares body's tensor, so it is never listed:
    # the head dropped is the last listed Linear.
    assert counted_parameters(model) == ["conv.weight", "body.weight", "head.weight"]
    assert counted_parameters(model, include_head=False) == ["conv.weight", "body.weight"]


def test_include_head_false_needs_a_linear():
    with pytest.raises(ValueError, match="no nn.Linear"):
        counted_parameters(nn.Sequential(nn.Conv2d(1, 2, 3)), include_head=False)


def test_include_patterns_select_counted_names_in_order():
    model = WithEmbedding()
    assert counted_parameters(model, include=["head.*", "conv.*"]) == ["conv.weight", "head.weight"]
    assert counted_parameters(model, include="b*") == ["body.weight"]  # one pattern as a string
    assert counted_parameters(small_cnn(), include=["*"]) == ["0.weight", "4.weight", "6.weight"]
    # Applied after the head rule, on the Linear/Conv weights only.
    assert counted_parameters(model, include_head=False, include=["*o*"]) == ["conv.weight", "body.weight"]


def test_include_pattern_matching_nothing_names_it_and_the_candidates():
    model = WithEmbedding()
    with pytest.raises(ValueError, match=r"\['nope\*'\].*conv\.weight, body\.weight, head\.weight"):
        counted_parameters(model, include=["body.*", "nope*"])
    with pytest.raises(ValueError, match="embed"):  # an embedding is never a candidate
        counted_parameters(model, include=["embed.*"])
    with pytest.raises(ValueError, match="head is already dropped"):
        counted_parameters(model, include_head=False, include=["head.*"])


def test_exact_sparsity_after_zeroing_known_entries():
    torch.manual_seed(0)
    model = small_cnn()
    with torch.no_grad():
        for p in model.parameters():  # no accidental zeros
            p.copy_(torch.rand_like(p) + 0.5)
        model[0].weight.view(-1)[:6] = 0  # 6 of 36
        model[4].weight.view(-1)[:1000] = 0  # 1000 of 2304
        model[6].weight.view(-1)[:40] = 0  # 40 of 160
        model[4].bias.zero_()  # biases do not count
        model[1].weight.zero_()  # nor norms
    names = counted_parameters(model)
    assert sparsity(model, names) == (6 + 1000 + 40) / (36 + 2304 + 160)
    no_head = counted_parameters(model, include_head=False)
    assert sparsity(model, no_head) == (6 + 1000) / (36 + 2304)
    # A state dict gives the same number.
    assert sparsity(model.state_dict(), names) == (6 + 1000 + 40) / (36 + 2304 + 160)

    report = sparsity_report(model, names)
    assert report["tensors"]["0.weight"] == {"numel": 36, "zeros": 6, "sparsity": 6 / 36}
    assert report["tensors"]["6.weight"]["zeros"] == 40
    assert report["total"] == {"numel": 2500, "zeros": 1046, "sparsity": 1046 / 2500}


def test_sparsity_sees_torch_prune_masks_in_model_and_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    names = counted_parameters(model)
    prune.l1_unstructured(model[0], "weight", amount=30)  # exactly 30 of 100 masked
    assert sparsity(model, names) == 30 / 120
    assert sparsity(model.state_dict(), names) == 30 / 120


def test_unknown_names_and_empty_names_raise():
    model = small_cnn()
    with pytest.raises(KeyError, match="9.weight"):
        sparsity(model, ["9.weight"])
    with pytest.raises(KeyError, match="nope"):
        sparsity(model.state_dict(), ["nope.weight"])
    with pytest.raises(ValueError, match="empty"):
        sparsity(model, [])
    with pytest.raises(ValueError, match="twice"):
        sparsity(model, ["0.weight", "0.weight"])
