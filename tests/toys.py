"""Small models with known answers, shared by the tests."""
from __future__ import annotations

import torch
from torch import nn

from auditkit import AuditSet, Box, ModelSpec, Sample


class RegionScore(nn.Module):
    """logit_c = gain * (mean of region c - offset) for the left / right half; a third class 'empty' has logit 0."""

    def __init__(self, gain: float = 100.0, offset: float = 0.05):
        super().__init__()
        self.gain, self.offset = gain, offset
        self.conv = nn.Conv2d(3, 3, 1)  # unused by the score; gives the module a named layer and parameters
        nn.init.ones_(self.conv.weight)

    def forward(self, x):
        half = x.shape[-1] // 2
        left = x[..., :half].mean(dim=(1, 2, 3))
        right = x[..., half:].mean(dim=(1, 2, 3))
        empty = torch.zeros_like(left) + 0 * self.conv(x).mean(dim=(1, 2, 3))
        return torch.stack([self.gain * (left - self.offset), self.gain * (right - self.offset), empty], 1)


def halves_set(n: int = 6, size: int = 16) -> AuditSet:
    """Black images with one white block in the left (label 0) or right (label 1) half; the box is exact."""
    samples = []
    for i in range(n):
        label = i % 2
        img = torch.zeros(3, size, size)
        x0 = 1 if label == 0 else size // 2 + 1
        img[:, 4:12, x0 : x0 + 6] = 1.0
        samples.append(Sample(img, label, (Box(x0, 4, x0 + 6, 12),), f"s{i}"))
    return AuditSet(samples, ["left", "right", "empty"], name="halves")


def region_spec(**kwargs) -> ModelSpec:
    return ModelSpec(module=RegionScore(**kwargs), class_names=["left", "right", "empty"], input_size=(16, 16),
                     layers=["conv"], name="region", dataset="halves")


class SmallNet(nn.Module):
    """A conv net with batch norm, dropout and an in-place ReLU: state the Subject must restore."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(self.drop(self.features(x).mean(dim=(2, 3))))


class NaNWhereHigh(nn.Module):
    def forward(self, x):
        bad = (x[:, :1, :1, :1] > 0.2).expand_as(x)
        return torch.where(bad, torch.full_like(x, float("nan")), x)


class NaNFeatures(nn.Module):
    """Layer `odd` outputs NaN for the images whose first conv channel is > 0.2 at the top-left pixel;
    the forward then replaces the NaN by 0, so the logits (which the Subject checks) stay finite."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.odd = NaNWhereHigh()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.nan_to_num(self.odd(self.conv(x)), nan=0.0).mean(dim=(2, 3)))
