import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Linear → ReLU → Linear, with named layers `body` and `head`."""

    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, d_out)
        self.label = "tiny"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture
def pair() -> tuple[TinyNet, TinyNet]:
    torch.manual_seed(0)
    return TinyNet(hidden=8), TinyNet(hidden=16)


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
