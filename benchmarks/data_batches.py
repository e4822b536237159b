"""Batches of an in-memory dataset: `kdlab.worker.batches.BatchSource` (whole-batch indexing, on the
device when it fits) against the per-sample `DataLoader` the trainer used before, one process.

    python benchmarks/data_batches.py [--device cpu|cuda] [--epochs 5]

Datasets: digits (1,437 train images of 64 floats) and synthetic_lm (4,096 × 256 train tokens).
Each loop runs whole epochs, batch 64, a fresh random order per epoch, every batch moved to the
device and touched (a sum) so the work is not skipped; the two loops alternate epoch by epoch.
Prints one JSON line per dataset: median ms per epoch each way and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import DataLoader

from kdlab.worker import catalog
from kdlab.worker.batches import BatchSource
from kdlab.worker.config import DatasetSpec
from kdlab.worker.devices import synchronize

DATASETS = {
    "digits": DatasetSpec(name="digits"),
    "synthetic_lm": DatasetSpec(
        name="synthetic_lm", params={"n_sequences": 5120, "seq_len": 256, "vocab_size": 1024}
    ),
}


def per_sample_epoch(dataset, order: list[int], batch: int, device: torch.device) -> float:
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    loader = DataLoader(dataset, batch_sampler=chunks, pin_memory=device.type == "cuda")
    total = torch.zeros((), device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        total += x.float().sum() + y.sum()
    return float(total)


def batch_source_epoch(source: BatchSource, order: list[int]) -> float:
    total = torch.zeros((), device=source.device)
    for b in source.batches(order):
        total += b.x.float().sum() + b.y.sum()
    return float(total)


def timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn(*args)
    return (time.perf_counter() - start) * 1000, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    for name, spec in DATASETS.items():
        train = catalog.build_dataset(spec, seed=0).train
        source = BatchSource(train, args.batch, device)
        old_ms, new_ms = [], []
        for epoch in range(args.epochs + 1):  # epoch 0 warms both up
            order = torch.randperm(
                len(train), generator=torch.Generator().manual_seed(epoch)
            ).tolist()
            t_old, v_old = timed(per_sample_epoch, train, order, args.batch, device)
            t_new, v_new = timed(batch_source_epoch, source, order)
            synchronize(device)
            assert abs(v_old - v_new) <= 1e-6 * abs(v_old) + 1e-3, (v_old, v_new)  # same data
            if epoch:
                old_ms.append(t_old)
                new_ms.append(t_new)
        old, new = statistics.median(old_ms), statistics.median(new_ms)
        print(
            json.dumps(
                {
                    "benchmark": "data_batches",
                    "dataset": name,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__,
                    "samples": len(train),
                    "per_sample_loader_ms_per_epoch": round(old, 2),
                    "batch_source_ms_per_epoch": round(new, 2),
                    "speedup": round(old / new, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
