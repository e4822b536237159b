"""Which torch device a run trains on, and the few device calls the trainer makes."""

from __future__ import annotations

import os

import torch


def _visible() -> str:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "unset" if value is None else repr(value)


def resolve_device(requested: str | torch.device | None, gpus: int) -> torch.device:
    """The device of a run whose config holds `resources.gpus = gpus`.

    `requested` wins when given (a CUDA one must exist). Otherwise a run that asked for GPUs
    must see that many CUDA devices: it never falls back to the CPU silently; a run that asked
    for none takes CUDA when there is one (library use), else the CPU.
    """
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda":
            _require_cuda(max(1, (device.index or 0) + 1), f"device {str(device)!r}")
        return device
    if gpus > 0:
        _require_cuda(gpus, f"resources.gpus is {gpus}")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _require_cuda(count: int, why: str) -> None:
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise RuntimeError(
            f"{why}, but this worker sees no CUDA device (torch {torch.__version__}, {built}; "
            f"CUDA_VISIBLE_DEVICES {_visible()}). Install a CUDA build of torch and check the "
            "driver with nvidia-smi, or set resources.gpus: 0 to train on the CPU"
        )
    seen = torch.cuda.device_count()
    if seen < count:
        raise RuntimeError(
            f"{why}, but this worker sees {seen} CUDA device(s) (CUDA_VISIBLE_DEVICES "
            f"{_visible()}); lower resources.gpus or give the worker more GPUs"
        )


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU, which runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak CUDA memory of the training steps of one logging interval.

    Evaluation and checkpoint writes run between `pause()` and `resume()`: what they allocate
    (EMA copies, the val split's activations) is not counted.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self._peak = 0

    def _read(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def _reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def start(self) -> None:
        if self.enabled:
            self._peak = 0
            self._reset()

    def pause(self) -> None:
        if self.enabled:
            self._peak = max(self._peak, self._read())

    def resume(self) -> None:
        if self.enabled:
            self._reset()

    def pop_gib(self) -> float:
        """The interval's peak in GiB (0 on the CPU); starts the next interval."""
        if not self.enabled:
            return 0.0
        peak = max(self._peak, self._read())
        self.start()
        return peak / 2**30
