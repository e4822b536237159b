"""kdlab.worker.batches: whole-batch indexing of in-memory data gives exactly what a per-sample
DataLoader gives; data read from disk goes through worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kdlab.worker.batches import BatchSource, in_memory_tensors, loader_workers
from kdlab.worker.kd.losses import IGNORE_INDEX


def reference_batches(dataset: Dataset, order: list[int], batch_size: int, start: int) -> list:
    """torch's own per-sample path: `__getitem__` for every index, default collate."""
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)][start:]
    return list(DataLoader(dataset, batch_sampler=chunks))


def test_in_memory_batches_equal_the_per_sample_loader() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, generator=g)
    y = torch.randint(0, 5, (50, 7), generator=g)  # LM-shaped labels
    full = TensorDataset(x, y)
    nested = Subset(Subset(full, list(range(3, 48))), [i for i in range(45) if i % 3])
    order = torch.randperm(len(nested), generator=g).tolist()
    source = BatchSource(nested, batch_size=8, device=torch.device("cpu"))
    assert source.in_memory and source.size == 30
    for start in (0, 2):
        got = list(source.batches(order, start=start))
        want = reference_batches(nested, order, 8, start)
        assert len(got) == len(want) == 4 - start
        for batch, (wx, wy) in zip(got, want, strict=True):
            assert torch.equal(batch.x, wx) and torch.equal(batch.y, wy)
            assert batch.x.dtype == wx.dtype and batch.y.dtype == wy.dtype
    # the split's own order by default
    default = list(source.batches())
    sequential = reference_batches(nested, list(range(30)), 8, 0)
    assert all(torch.equal(b.x, wx) for b, (wx, _) in zip(default, sequential, strict=True))


def test_subset_chain_is_resolved_to_the_right_rows() -> None:
    x = torch.arange(10.0).unsqueeze(1)
    y = torch.arange(10)
    tensors = in_memory_tensors(Subset(Subset(TensorDataset(x, y), [9, 7, 5, 3, 1]), [4, 0]))
    assert tensors is not None
    assert tensors[1].tolist() == [1, 9]
    assert in_memory_tensors(TensorDataset(x)) is None  # not an (x, y) dataset


def test_labelled_flags_batches_without_any_label() -> None:
    y = torch.full((12, 3), IGNORE_INDEX)
    y[5, 1] = 2  # only sample 5 is labelled
    source = BatchSource(TensorDataset(torch.zeros(12, 2), y), 4, torch.device("cpu"))
    assert [b.labelled for b in source.batches()] == [False, True, False]
    order = [5, 0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert [b.labelled for b in source.batches(order)] == [True, False, False]


class PidImages(Dataset):
    """A dataset 'read from disk': each sample says which process loaded it."""

    reads_from_disk = True

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([float(index), float(os.getpid())]), torch.tensor(index % 3)


def test_disk_datasets_load_in_worker_processes() -> None:
    source = BatchSource(PidImages(), 4, torch.device("cpu"))
    assert not source.in_memory
    order = [11, 3, 0, 7, 2, 9, 1, 4, 8, 5, 6, 10]
    batches = list(source.batches(order, start=1))
    assert [b.x[:, 0].long().tolist() for b in batches] == [order[4:8], order[8:]]
    assert [b.y.tolist() for b in batches] == [
        [i % 3 for i in order[4:8]],
        [i % 3 for i in order[8:]],
    ]
    pids = {int(p) for b in batches for p in b.x[:, 1].tolist()}
    if loader_workers() > 0:  # a machine with more than one CPU
        assert os.getpid() not in pids
    else:
        assert pids == {os.getpid()}


class PidInProcess(PidImages):
    reads_from_disk = False  # a plug-in dataset that does not say it reads from disk


def test_other_datasets_load_in_this_process() -> None:
    batches = list(
        BatchSource(Subset(PidInProcess(), list(range(8))), 4, torch.device("cpu")).batches()
    )
    assert {int(p) for b in batches for p in b.x[:, 1].tolist()} == {os.getpid()}
    assert [b.x[:, 0].long().tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]


STOPPED_BY_SIGTERM = """
import signal, sys, time, torch
from torch.utils.data import Dataset
from kdlab.worker.batches import BatchSource

class Slow(Dataset):
    reads_from_disk = True
    def __len__(self):
        return 64
    def __getitem__(self, i):
        time.sleep(0.02)
        return torch.tensor([float(i)]), torch.tensor(0)

asked = []
signal.signal(signal.SIGTERM, lambda *_: asked.append(1))
for n, batch in enumerate(BatchSource(Slow(), 4, torch.device("cpu")).batches()):
    print("batch", n, flush=True)
    if asked:  # the run's own handler saw the cancel: one more batch loads, then it stops
        print("stopped cleanly", flush=True)
        break
"""


@pytest.mark.skipif(loader_workers() == 0, reason="needs a second CPU for a loader worker")
def test_a_cancel_signal_to_the_run_group_leaves_loader_workers_alone() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPED_BY_SIGTERM],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as the executor gives each run
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("batch 0")
    os.killpg(proc.pid, signal.SIGTERM)  # what a cancel sends: the main process and its workers
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped cleanly" in out, out + err
