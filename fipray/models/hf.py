"""Hugging Face BERT and ViT classifiers wrapped to return plain logit Tensors.

Weights come from a local ``save_pretrained`` directory (``pretrained_dir``, loaded with
``local_files_only=True``) or the model is built from scratch from a ``config`` dict; nothing is
downloaded. Note that HF configs default to dropout 0.1: pass ``hidden_dropout_prob=0`` and
``attention_probs_dropout_prob=0`` in ``config`` when outputs must be deterministic in train mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fipray.models.registry import register_model


def _build(model_cls, config_cls, num_classes: int, pretrained_dir, config: dict | None, defaults: dict):
    """Instantiate ``model_cls`` from a local directory or from ``config_cls(**defaults, **config)``."""
    config = dict(config or {})
    if "num_labels" in config and config["num_labels"] != num_classes:
        raise ValueError(f"config num_labels={config['num_labels']} conflicts with num_classes={num_classes}")
    config.pop("num_labels", None)
    if pretrained_dir is not None:
        path = Path(pretrained_dir)
        if not path.is_dir():
            raise FileNotFoundError(
                f"pretrained_dir not found: {path} (expected a save_pretrained directory)"
            )
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


class HFTextClassifier(nn.Module):
    """Wraps a HF sequence classifier: token ids ``(B, L)`` → logits ``(B, num_classes)``.

    The attention mask is derived from the ids (``ids != pad_token_id``), so the module takes a
    single tensor like every other fipray model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = 0 if pad is None else int(pad)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Args: input_ids: ``(B, L)`` integer token ids. Returns: logits ``(B, num_classes)``."""
        input_ids = input_ids.long()
        attention_mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


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
    """``BertForSequenceClassification`` taking token ids.

    Args:
        num_classes: Output logits (``num_labels``).
        input_shape: ``(L,)``, the padded sequence length; must fit ``max_position_embeddings``.
        pretrained_dir: Local ``save_pretrained`` directory; the classification head is re-initialised
            if its size differs from ``num_classes``.
        config: ``BertConfig`` fields, for a from-scratch model or overriding the saved config.

    Returns:
        :class:`HFTextClassifier` mapping int64 ``(B, L)`` to ``(B, num_classes)``.

    Raises:
        FileNotFoundError: ``pretrained_dir`` does not exist.
    """
    from transformers import BertConfig, BertForSequenceClassification

    if len(input_shape) != 1:
        raise ValueError(f"hf_bert needs input_shape (L,), got {input_shape}")
    model = _build(BertForSequenceClassification, BertConfig, num_classes, pretrained_dir, config, {})
    if input_shape[0] > model.config.max_position_embeddings:
        raise ValueError(
            f"sequence length {input_shape[0]} exceeds max_position_embeddings={model.config.max_position_embeddings}"
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
        pretrained_dir: Local ``save_pretrained`` directory; the head is re-initialised if its size
            differs from ``num_classes``.
        config: ``ViTConfig`` fields (e.g. ``patch_size``, ``hidden_size``), for a from-scratch model
            or overriding the saved config.

    Returns:
        :class:`HFImageClassifier` mapping ``(B, C, H, W)`` to ``(B, num_classes)``.

    Raises:
        FileNotFoundError: ``pretrained_dir`` does not exist.
    """
    from transformers import ViTConfig, ViTForImageClassification

    if len(input_shape) != 3:
        raise ValueError(f"hf_vit needs input_shape (C, H, W), got {input_shape}")
    h, w = input_shape[1:]
    defaults = {"image_size": h if h == w else (h, w), "num_channels": input_shape[0]}
    model = _build(ViTForImageClassification, ViTConfig, num_classes, pretrained_dir, config, defaults)
    return HFImageClassifier(model, input_shape)
