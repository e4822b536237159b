"""Test-only `kdlab.datasets` plug-ins: the digits split, with a fault in the training items.

Each wraps the built-in `digits` (same seed, same split, same items) so a run that does not hit
the fault trains exactly like `digits`. The counters are per process: a resumed attempt counts
from zero again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kdlab.worker import catalog
from kdlab.worker.catalog import DataBundle
from kdlab.worker.config import DatasetSpec


class _Faulty(Dataset):
    def __init__(self, base: Any, after_items: int, fault: str, delay: float = 0.0):
        self.base = base
        self.after_items = after_items
        self.fault = fault
        self.delay = delay
        self.served = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[index]
        self.served += 1
        if self.delay:
            time.sleep(self.delay)
        if self.served > self.after_items:
            if self.fault == "raise":
                raise RuntimeError(
                    f"exploding_digits: item {self.served} requested, after_items="
                    f"{self.after_items}"
                )
            if self.fault == "nan":
                x = torch.full_like(x, float("nan"))
        return x, y


def _digits(seed: int, val_fraction: float, data_root: Path | None) -> DataBundle:
    spec = DatasetSpec(name="digits", params={}, val_fraction=val_fraction)
    return catalog.build_dataset(spec, seed, data_root)


def _wrap(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None, fault: str
) -> DataBundle:
    base = _digits(seed, val_fraction, data_root)
    after = int(params.get("after_items", 10**12))
    train = _Faulty(base.train, after, fault, float(params.get("delay", 0.0)))
    return DataBundle(train=train, val=base.val, info=base.info)


def exploding_digits(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None = None
) -> DataBundle:
    """digits whose training split raises after `after_items` items."""
    return _wrap(params, seed, val_fraction, data_root, "raise")


def nan_digits(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None = None
) -> DataBundle:
    """digits whose training inputs are NaN after `after_items` items."""
    return _wrap(params, seed, val_fraction, data_root, "nan")


def slow_digits(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None = None
) -> DataBundle:
    """digits whose training items take `delay` seconds each."""
    return _wrap(params, seed, val_fraction, data_root, "none")
