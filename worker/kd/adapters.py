"""Teacher input adapters: turn the student's input into what the teacher expects."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _channel_buffer(values: Sequence[float], field: str) -> torch.Tensor:
    tensor = torch.as_tensor(list(values), dtype=torch.float32)
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise ValueError(f"{field}: give one value per channel, got {values!r}")
    return tensor.view(1, -1, 1, 1)


class NormalizationAdapter(nn.Module):
    """Re-normalises images from the student's mean/std to the teacher's (super-gradients style).

    x_teacher = (x · std_from + mean_from − mean_to) / std_to, per channel (dim 1).
    """

    mean_from: torch.Tensor
    std_from: torch.Tensor
    mean_to: torch.Tensor
    std_to: torch.Tensor

    def __init__(
        self,
        mean_from: Sequence[float],
        std_from: Sequence[float],
        mean_to: Sequence[float],
        std_to: Sequence[float],
    ) -> None:
        super().__init__()
        fields = {
            "mean_from": mean_from,
            "std_from": std_from,
            "mean_to": mean_to,
            "std_to": std_to,
        }
        buffers = {name: _channel_buffer(v, name) for name, v in fields.items()}
        sizes = {name: b.numel() for name, b in buffers.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"NormalizationAdapter: channel counts differ {sizes}; give equal lengths"
            )
        for name in ("std_from", "std_to"):
            if (buffers[name] <= 0).any():
                raise ValueError(f"{name}: standard deviations must be > 0, got {fields[name]!r}")
        for name, buf in buffers.items():
            self.register_buffer(name, buf, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[1] != self.mean_from.shape[1]:
            raise ValueError(
                f"NormalizationAdapter expects [N, {self.mean_from.shape[1]}, ...] input, "
                f"got shape {tuple(x.shape)}"
            )
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale = (self.std_from / self.std_to).view(shape)
        shift = ((self.mean_from - self.mean_to) / self.std_to).view(shape)
        return x * scale.to(x.dtype) + shift.to(x.dtype)
