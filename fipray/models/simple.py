"""Small from-scratch models: MLPs, a BatchNorm-free CNN and its BatchNorm twin.

``mlp``, ``lenet_300_100`` and ``small_cnn`` use neither BatchNorm nor dropout: in any mode their
outputs are a deterministic function of the weights and of each example alone. ``small_bn_cnn`` is
``small_cnn`` with a BatchNorm after every convolution, for checking fipray on the kind of network
most vision recipes use. In train mode its outputs depend on the whole batch; fipray copes the way
deployment does: base training and baselines train in train mode (batch statistics, running
statistics updated), FIP phases by default update the eval-mode network (`path.train_mode: false`:
running statistics fixed), and every invariance and drift measurement is taken in eval mode, where
each example's output is its own again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from fipray.models.registry import register_model


def _mlp(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("mlp")
def mlp(num_classes: int, input_shape: tuple[int, ...], *, hidden: Sequence[int] = (256, 256),
        init: str = "default") -> nn.Module:
    """Flatten → (Linear → ReLU) per hidden size → Linear head.

    Args:
        num_classes: Output logits.
        input_shape: Per-example shape; flattened to ``prod(input_shape)`` features.
        hidden: Hidden layer widths (may be empty for a linear model).
        init: ``default`` (PyTorch's Linear init) or ``xavier`` (Xavier-uniform weights, zero biases: the
            MNIST MLP of the DER paper's benchmarks, mammoth's ``MNISTMLP``).

    Returns:
        Module mapping ``(B, *input_shape)`` to ``(B, num_classes)``.
    """
    if init not in ("default", "xavier"):
        raise ValueError(f"mlp init {init!r} is not one of default, xavier")
    net = _mlp(math.prod(input_shape), tuple(hidden), num_classes)
    if init == "xavier":
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    return net


@register_model("lenet_300_100")
def lenet_300_100(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The classic LeNet-300-100 MLP: Flatten → 300 → 100 → ``num_classes`` with ReLU.

    Returns:
        Module mapping ``(B, *input_shape)`` to ``(B, num_classes)``.
    """
    return _mlp(math.prod(input_shape), (300, 100), num_classes)


@register_model("small_cnn")
def small_cnn(
    num_classes: int, input_shape: tuple[int, ...], *, width: float = 1.0, fc: int = 128
) -> nn.Module:
    """A three-conv CNN sized for 8×8 digits but valid for any image of at least 2×2.

    conv(C→32w, 3) → ReLU → conv(32w→64w, 3) → ReLU → maxpool 2 → conv(64w→64w, 3) → ReLU →
    global average pool → Linear(64w→fc) → ReLU → Linear head. Global pooling makes the head
    independent of the spatial size, so the same architecture serves 8×8 and 32×32 inputs.

    Args:
        num_classes: Output logits.
        input_shape: ``(C, H, W)``.
        width: Channel multiplier (``w`` above); channel counts are rounded and at least 1.
        fc: Width of the hidden fully connected layer.

    Returns:
        Module mapping ``(B, C, H, W)`` to ``(B, num_classes)``.
    """
    return _three_conv(num_classes, input_shape, width, fc, batchnorm=False, name="small_cnn")


@register_model("small_bn_cnn")
def small_bn_cnn(
    num_classes: int, input_shape: tuple[int, ...], *, width: float = 1.0, fc: int = 128
) -> nn.Module:
    """``small_cnn`` with BatchNorm2d after each convolution (convolutions then carry no bias).

    conv(C→32w, 3) → BN → ReLU → conv(32w→64w, 3) → BN → ReLU → maxpool 2 → conv(64w→64w, 3) →
    BN → ReLU → global average pool → Linear(64w→fc) → ReLU → Linear head. Same sizes and input
    range as ``small_cnn``; the BatchNorm layers keep running statistics (momentum 0.1), which
    eval mode uses.

    Args:
        num_classes: Output logits.
        input_shape: ``(C, H, W)``.
        width: Channel multiplier (``w`` above); channel counts are rounded and at least 1.
        fc: Width of the hidden fully connected layer.

    Returns:
        Module mapping ``(B, C, H, W)`` to ``(B, num_classes)``; in train mode a batch of one
        example fails (BatchNorm needs more than one value per channel).
    """
    return _three_conv(num_classes, input_shape, width, fc, batchnorm=True, name="small_bn_cnn")


def _three_conv(num_classes: int, input_shape: tuple[int, ...], width: float, fc: int, *, batchnorm: bool,
                name: str) -> nn.Module:
    """The layers of small_cnn; with `batchnorm`, a BatchNorm2d after each (then bias-free) convolution."""
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs input_shape (C, H, W), got {input_shape}")
    c1, c2 = max(1, round(32 * width)), max(1, round(64 * width))

    def conv(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
        return [*layers, nn.BatchNorm2d(cout)] if batchnorm else layers

    return nn.Sequential(
        *conv(input_shape[0], c1), nn.ReLU(),
        *conv(c1, c2), nn.ReLU(),
        nn.MaxPool2d(2),
        *conv(c2, c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, fc),
        nn.ReLU(),
        nn.Linear(fc, num_classes),
    )
