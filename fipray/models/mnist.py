"""The published MNIST networks of the robustness literature, for reproducing its numbers.

- ``mnist_fast_cnn``: the network of Wong et al. 2020 ("Fast is better than free", MNIST): conv 4×4, 16
  channels, stride 2 → conv 4×4, 32 channels, stride 2 → FC 100 → ``num_classes``, ReLU between (166k
  parameters for 28×28 inputs). Their fast-FGSM and PGD adversarial training numbers are for this network.
- ``lenet5_mnist``: the LeNet5 variant of advertorch's examples (conv 3×3, 32 → max-pool 2 → conv 3×3, 64 →
  max-pool 2 → FC 200 → ``num_classes``; 648,226 parameters), whose trained clean and PGD-adversarially
  trained state dicts ship with advertorch 0.2.3 (``fipray data fetch advertorch_lenet5``). Its attribute names
  (``conv1``, ``conv2``, ``linear1``, ``linear2``) are those of the state dicts, so they load as they are.

Both take inputs in [0, 1] without normalisation, as the published training did.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fipray.models.registry import register_model


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs input_shape (C, H, W), got {input_shape}")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


@register_model("mnist_fast_cnn")
def mnist_fast_cnn(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Wong et al.'s MNIST network: conv(C→16, 4, s2, p1) → ReLU → conv(16→32, 4, s2, p1) → ReLU → Flatten →
    Linear(32·H/4·W/4 → 100) → ReLU → Linear(100 → num_classes).

    Returns:
        Module mapping ``(B, C, H, W)`` (H, W divisible by 4) to ``(B, num_classes)``.
    """
    c, h, w = _image_shape("mnist_fast_cnn", input_shape)
    if h % 4 or w % 4:
        raise ValueError(f"mnist_fast_cnn needs H and W divisible by 4, got {input_shape}")
    return nn.Sequential(
        nn.Conv2d(c, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


class LeNet5(nn.Module):
    """conv(C→32, 3, p1) → ReLU → max-pool 2 → conv(32→64, 3, p1) → ReLU → max-pool 2 → Linear(64·H/4·W/4 → 200)
    → ReLU → Linear(200 → num_classes)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        c, h, w = _image_shape("lenet5_mnist", input_shape)
        if h % 4 or w % 4:
            raise ValueError(f"lenet5_mnist needs H and W divisible by 4, got {input_shape}")
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.linear1 = nn.Linear(64 * math.prod((h // 4, w // 4)), 200)
        self.linear2 = nn.Linear(200, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.linear2(torch.relu(self.linear1(x.flatten(1))))


@register_model("lenet5_mnist")
def lenet5_mnist(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """advertorch's MNIST LeNet5 layout (see the module docstring)."""
    return LeNet5(num_classes, input_shape)
