"""The order of the training samples: a function of (seed, epoch) only, so a resume at
(epoch, batch index) needs no replay and reproduces the uninterrupted run exactly."""

from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch; depends only on (seed, epoch)."""
    return torch.randperm(n, generator=private_generator(seed + epoch)).tolist()


def private_generator(seed: int) -> torch.Generator:
    """A generator of its own, so the data order does not draw from the global RNG (which would
    shift dropout etc. between an uninterrupted and a resumed run)."""
    return torch.Generator().manual_seed(seed)
