"""Tiny models for the kdlab.distill tests (torchvision is not a dependency).

`TinyAlexNet` has alexnet's layout (`features`, `avgpool`, `classifier`); `TinyStudent` the
same names with other widths; `TinyMLP` a plain MLP.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


class TinyAlexNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width // 2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width // 2, width, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


class TinyStudent(TinyAlexNet):
    """The student: alexnet's layout, half the width (16 feature channels)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(num_classes, width=16)


class TinyMLP(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16, out: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))) * scale


def image_batch(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16)
