"""Memory of the logits KL loss at LM size: the engine's `LogitsKL` against the composite formula
it replaced (issue 13, finding 17), side by side in one process.

    python benchmarks/kl_memory.py [--device cpu|cuda] [--batch 8] [--seq 512] [--vocab 32000]

For each: the bytes autograd saves for backward (unique storages, `saved_tensors_hooks`), and the
peak memory of forward + backward above the inputs: on CUDA the allocator's peak, on the CPU the
peak of `torch.profiler`'s memory timeline (`profile_memory=True`: what forward and backward
allocate while profiled; the inputs are allocated before). Student logits require
grad, teacher logits do not (as in training). One JSON line per formula.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.worker.kd.losses import LogitsKL


def composite_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """The formula before the fix: p · where(p > 0, log p − log q, 0), summed, batch mean, T²."""
    target_log = F.log_softmax(teacher.float() / temperature, dim=-1)
    input_log = F.log_softmax(student.float() / temperature, dim=-1)
    target = target_log.exp()
    diff = torch.where(target > 0, target_log - input_log, torch.zeros_like(target_log))
    return temperature**2 * (target * diff).sum(dim=-1).mean()


def saved_bytes(fn: Callable[[], Tensor]) -> tuple[Tensor, int]:
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def measure(
    name: str, loss_fn: Callable[[Tensor, Tensor], Tensor], args: argparse.Namespace
) -> dict:
    device = torch.device(args.device)
    g = torch.Generator(device).manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = torch.randn(shape, device=device, generator=g, requires_grad=True)
    teacher = torch.randn(shape, device=device, generator=g)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with cpu_memory_profile(not cuda) as timeline:
        loss, saved = saved_bytes(lambda: loss_fn(student, teacher))
        loss.backward()
    line = {
        "benchmark": "kl_memory",
        "formula": name,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "shape": list(shape),
        "loss": float(loss.detach()),
        "saved_for_backward_mib": round(saved / 2**20, 1),
        "saved_in_blv_fp32_tensors": round(saved / (student.numel() * 4), 2),
        "peak_above_inputs_mib": None,
    }
    if cuda:
        torch.cuda.synchronize()
        line["peak_above_inputs_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    else:
        line["peak_above_inputs_mib"] = round(timeline.peak_bytes() / 2**20, 1)
    return line


class _Timeline:
    def __init__(self) -> None:
        self.profile: torch.profiler.profile | None = None

    def peak_bytes(self) -> int:
        """The largest total of live allocations the profiler saw (CPU)."""
        assert self.profile is not None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "timeline.json"
            self.profile.export_memory_timeline(str(path), device="cpu")
            _times, sizes = json.loads(path.read_text())
        return max(sum(row) for row in sizes)


@contextlib.contextmanager
def cpu_memory_profile(enabled: bool) -> Iterator[_Timeline]:
    timeline = _Timeline()
    if not enabled:
        yield timeline
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        yield timeline
    timeline.profile = prof


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    engine = LogitsKL(temperature=args.temperature)
    formulas = {
        "composite (before)": lambda s, t: composite_kl(s, t, args.temperature),
        "LogitsKL (engine)": lambda s, t: engine(s, t),
    }
    lines = [measure(name, fn, args) for name, fn in formulas.items()]
    before, after = lines
    # the same loss either way (the change is memory only)
    assert abs(before["loss"] - after["loss"]) <= 1e-4 * abs(before["loss"]) + 1e-6, lines
    for line in lines:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
