"""Any timm architecture as ``"timm:<name>"``, built from scratch (weights only from local files)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fipray.models.registry import register_model_prefix


@register_model_prefix("timm:")
def timm_model(arch: str, num_classes: int, input_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    """Build ``timm.create_model(arch, pretrained=False, num_classes=..., in_chans=input_shape[0], **kwargs)``.

    Models with a fixed input size (ViT, DeiT, Swin: position embeddings sized at build time) get
    ``img_size`` from ``input_shape`` automatically, so ``timm:vit_tiny_patch16_224`` with
    ``input_shape=(3, 32, 32)`` works; pass ``patch_size`` to keep enough patches on small images.
    Weights come only from ``create_model(..., checkpoint=PATH)``; nothing is downloaded.

    Args:
        arch: timm model name, e.g. ``"resnet18"``.
        num_classes: Output logits.
        input_shape: ``(C, H, W)``.
        **kwargs: Forwarded to timm (e.g. ``depth``, ``patch_size``, ``drop_rate``); timm rejects
            unknown ones with a TypeError naming them.

    Returns:
        The timm module mapping ``(B, C, H, W)`` to ``(B, num_classes)``.

    Raises:
        KeyError: ``arch`` is not a timm model.
        ValueError: ``pretrained=True`` was asked for (would download).
    """
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:20]
        raise KeyError(f"unknown timm model {arch!r}; similar names: {', '.join(close) or 'none'}")
    if kwargs.pop("pretrained", False):
        raise ValueError(
            "pretrained=True would download weights; pass checkpoint=PATH to a local file instead"
        )
    if len(input_shape) != 3:
        raise ValueError(f"timm models need input_shape (C, H, W), got {input_shape}")
    kw: dict[str, Any] = dict(num_classes=num_classes, in_chans=input_shape[0], **kwargs)

    cfg = get_pretrained_cfg(arch)
    size = input_shape[1] if input_shape[1] == input_shape[2] else tuple(input_shape[1:])
    wants_size = (
        cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size[1:]) != tuple(input_shape[1:])
    )
    if wants_size and "img_size" not in kw:
        try:
            return timm.create_model(arch, pretrained=False, img_size=size, **kw)
        except TypeError as err:
            # A fixed-size model whose constructor has no img_size: build it at its own size.
            if "img_size" not in str(err):
                raise
    return timm.create_model(arch, pretrained=False, **kw)
