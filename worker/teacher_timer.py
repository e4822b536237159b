"""How much of a training step the teacher's forward takes (`sys/teacher_time_share`)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


class TeacherTimer:
    """Time spent in the teacher's forward during training steps, without a sync per step:
    CUDA events read back at logging time, or wall-clock on the CPU (synchronous anyway)."""

    def __init__(self, teacher: nn.Module, device: torch.device):
        self.active = False
        self.device = device
        self.cuda = device.type == "cuda"
        self._seconds = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._start: Any = None
        teacher.register_forward_pre_hook(self._before)
        teacher.register_forward_hook(self._after)

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the teacher's device, not GPU 0
        return event

    def _before(self, *_: Any) -> None:
        if self.active:
            self._start = self._now()

    def _after(self, *_: Any) -> None:
        if self.active and self._start is not None:
            end = self._now()
            if self.cuda:
                self._events.append((self._start, end))
            else:
                self._seconds += end - self._start
            self._start = None

    def pop_seconds(self) -> float:
        """Teacher seconds since the last call (call after a sync: the events are complete)."""
        seconds = self._seconds + sum(s.elapsed_time(e) / 1000.0 for s, e in self._events)
        self._seconds, self._events = 0.0, []
        return seconds
