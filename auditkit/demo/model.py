"""ShapesCNN: the small convolutional classifier behind the demo models."""
from __future__ import annotations

import torch
from torch import nn

#: Per-channel mean and std of the ``demo`` training images (pixels in [0, 1]), rounded to 3 decimals.
DEMO_MEAN: tuple[float, float, float] = (0.501, 0.499, 0.501)
DEMO_STD: tuple[float, float, float] = (0.218, 0.217, 0.217)

#: The convolutional stages, shallow to deep, as named in ShapesCNN.named_modules().
LAYERS: tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4")

_CHANNELS = (16, 32, 64, 96)


def _stage(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    """Conv 3x3 (pad 1) -> BatchNorm -> ReLU, then a 2x2 max-pool when `pool`."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ShapesCNN(nn.Module):
    """Four conv stages (stage1-3 halve the resolution), global average pool, linear head.

    Maps normalised N x 3 x H x W images to N x num_classes logits; any H, W
    divisible by 8 works (the demo uses 64 x 64).
    """

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        c1, c2, c3, c4 = _CHANNELS
        self.stage1 = _stage(3, c1, pool=True)
        self.stage2 = _stage(c1, c2, pool=True)
        self.stage3 = _stage(c2, c3, pool=True)
        self.stage4 = _stage(c3, c4, pool=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.head(self.flatten(self.pool(x)))
