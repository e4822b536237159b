"""Stopping a run cleanly: the trainer's `should_stop` flag, and SIGINT/SIGTERM setting it.

The trainer checks the flag after every step; set, it writes `latest.pt` and returns.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kdlab.worker.echo import Echo


class StopFlag:
    """`should_stop` for the trainer, set by the first Ctrl-C / SIGTERM."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, step: int) -> bool:
        return self.requested


class WorkerStop(StopFlag):
    """The trainer's `should_stop`: set by a signal, or by the heartbeat (`cancel` = True when
    the server asked for the stop)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancel = False
        self.reason = ""

    def stop(self, reason: str, cancel: bool) -> None:
        self.reason = self.reason or reason
        self.cancel = self.cancel or cancel
        self.requested = True


@contextmanager
def stop_on_signals(flag: StopFlag, echo: Echo) -> Iterator[None]:
    """SIGINT/SIGTERM ask the trainer to checkpoint and stop; a second SIGINT interrupts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        echo(f"received {signal.Signals(signum).name}: writing latest.pt and stopping")
        flag.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
