"""Batches of one data split, in a given order, delivered on the training device.

An in-memory tensor dataset (a `TensorDataset`, or `Subset`s of one: every built-in dataset but
the image folders) is indexed a whole batch at a time: no per-sample `__getitem__`, no collate.
When the split fits the device budget it moves to the device once, and a batch is one
`index_select` there. A dataset that reads its samples from disk (it says so with a class
attribute `reads_from_disk = True`, as `image_folder`'s does) goes through a `DataLoader` with
worker processes; any other dataset is read in this process, sample by sample. Every path
yields the same tensors in the same order (`tests/worker/test_batches.py`).

Labels are checked on the host: `labelled` says, without touching the device, whether a batch
holds at least one label that is not `IGNORE_INDEX`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kdlab.worker.kd.losses import IGNORE_INDEX

DEVICE_DATA_MAX_BYTES = 2 * 2**30  # a split larger than this stays in host memory
DEVICE_DATA_MAX_SHARE = 0.25  # ... or larger than this share of the GPU's free memory
MAX_LOADER_WORKERS = 4


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    labelled: bool  # at least one label != IGNORE_INDEX


def in_memory_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, y) of a `TensorDataset` of two tensors seen through any chain of `Subset`s, else None."""
    index: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        step = torch.as_tensor(dataset.indices, dtype=torch.long)
        index = step if index is None else step[index]
        dataset = dataset.dataset
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) != 2:
        return None
    x, y = dataset.tensors
    if index is None:
        return x, y
    return x.index_select(0, index), y.index_select(0, index)


def reads_from_disk(dataset: Dataset) -> bool:
    """Whether `dataset` (seen through any `Subset`s) declares `reads_from_disk = True`."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return bool(getattr(dataset, "reads_from_disk", False))


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers share the run's process group: a cancel's SIGTERM is the main process's
    to handle (it saves `latest.pt`, then shuts the loader down); a worker whose parent is gone
    exits by itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader_workers() -> int:
    """Worker processes for a dataset read from disk: the CPUs this process may use, less one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(MAX_LOADER_WORKERS, cpus - 1))


def _fits_device(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # the host is where the data already is
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= min(DEVICE_DATA_MAX_BYTES, DEVICE_DATA_MAX_SHARE * free)


class BatchSource:
    """One split's batches, in the order of a list of sample indices, on `device`."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.size = len(dataset)  # type: ignore[arg-type]
        tensors = in_memory_tensors(dataset)
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._on_device = False
        self._sample_labelled: torch.Tensor | None = None
        if tensors is not None:
            x, y = tensors
            self._sample_labelled = (y != IGNORE_INDEX).reshape(len(y), -1).any(dim=1)
            nbytes = x.numel() * x.element_size() + y.numel() * y.element_size()
            self._on_device = _fits_device(nbytes, device)
            if self._on_device:
                x, y = x.to(device), y.to(device)
            elif device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            self._x, self._y = x, y

    @property
    def in_memory(self) -> bool:
        return self._x is not None

    def batches(self, order: Sequence[int] | None = None, start: int = 0) -> Iterator[Batch]:
        """Batches of `batch_size` samples in `order` (default: the split's own order), from
        batch number `start` on."""
        order = list(range(self.size)) if order is None else list(order)
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        chunks = chunks[start:]
        if self._x is None:
            yield from self._loader_batches(chunks)
        else:
            yield from self._tensor_batches(chunks)

    def _tensor_batches(self, chunks: list[list[int]]) -> Iterator[Batch]:
        assert self._x is not None and self._y is not None and self._sample_labelled is not None
        if not chunks:
            return
        flat = torch.tensor([i for chunk in chunks for i in chunk], dtype=torch.long)
        # one host read for the whole epoch: how many labelled samples each batch holds
        labelled_counts = self._labelled_per_chunk(flat, [len(c) for c in chunks])
        index = flat.to(self.device) if self._on_device else flat
        offset = 0
        for chunk, count in zip(chunks, labelled_counts, strict=True):
            rows = index[offset : offset + len(chunk)]
            offset += len(chunk)
            x, y = self._x.index_select(0, rows), self._y.index_select(0, rows)
            if not self._on_device:
                x, y = self._to_device(x), self._to_device(y)
            yield Batch(x, y, count > 0)

    def _labelled_per_chunk(self, flat: torch.Tensor, sizes: list[int]) -> list[int]:
        assert self._sample_labelled is not None
        per_sample = self._sample_labelled.index_select(0, flat).long()
        chunk_of_sample = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        counts = torch.zeros(len(sizes), dtype=torch.long).index_add_(
            0, chunk_of_sample, per_sample
        )
        return counts.tolist()

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _loader_batches(self, chunks: list[list[int]]) -> Iterator[Batch]:
        workers = loader_workers() if reads_from_disk(self.dataset) else 0
        loader = DataLoader(
            self.dataset,
            batch_sampler=chunks,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_stop_signals if workers else None,
        )
        for x, y in loader:
            labelled = bool((y != IGNORE_INDEX).any())  # the loader's host tensor: no device sync
            yield Batch(
                x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), labelled
            )
