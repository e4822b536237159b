"""The worker's log thread: this process's stdout/stderr lines, copied to the run's log."""

from __future__ import annotations

import io
import sys
import threading
import time
from typing import TextIO

from kdlab.worker.client import ApiClient, ApiClientError


class OutputForwarder:
    """Copies this process's stdout/stderr lines to the run's log (`POST /logs`), in batches
    every `interval` s. The original streams still get everything (the LocalExecutor captures
    them to a file). Lines that cannot be sent wait (at most `max_buffer`) for the next try."""

    def __init__(
        self,
        client: ApiClient,
        interval: float = 1.0,
        batch_lines: int = 1000,
        max_buffer: int = 10_000,
    ):
        self.client = client
        self.interval = interval
        self.batch_lines = batch_lines
        self.max_buffer = max_buffer
        self.dropped = 0
        self._lines: list[str] = []
        self._partial: dict[str, str] = {}
        # re-entrant: a signal handler that prints runs on the main thread, maybe inside feed()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdlab-logs", daemon=True)
        self._saved: tuple[TextIO, TextIO] | None = None

    def feed(self, stream: str, text: str) -> None:
        with self._lock:
            buffered = self._partial.get(stream, "") + text
            *complete, rest = buffered.split("\n")
            self._partial[stream] = rest
            self._lines.extend(line.rstrip("\r") for line in complete)
            overflow = len(self._lines) - self.max_buffer
            if overflow > 0:
                del self._lines[:overflow]
                self.dropped += overflow

    def install(self) -> OutputForwarder:
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self, "stdout")
        sys.stderr = _Tee(sys.stderr, self, "stderr")
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Restore the streams and send what is left (trying for up to `timeout` s)."""
        if self._saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = self._saved
            self._saved = None
        self._stop.set()
        self._thread.join(self.client.timeout + 5)
        with self._lock:
            for rest in self._partial.values():
                if rest:
                    self._lines.append(rest)
            self._partial.clear()
        deadline = time.monotonic() + timeout
        while self._send() is False and time.monotonic() < deadline:
            time.sleep(0.5)
        if self._lines or self.dropped:
            print(
                f"worker: {len(self._lines) + self.dropped} log lines did not reach the server",
                file=sys.stderr,
            )

    def _send(self) -> bool | None:
        """True: all sent; False: failed (lines kept); None: nothing to send."""
        sent_any = None
        while True:
            with self._lock:
                batch = self._lines[: self.batch_lines]
            if not batch:
                return sent_any
            try:
                self.client.post_logs(batch, "log", attempts=1)
            except ApiClientError:
                pass  # refused for good (e.g. run deleted): drop them
            except Exception:
                return False
            with self._lock:
                del self._lines[: len(batch)]
            sent_any = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._send()


class _Tee(io.TextIOBase):
    def __init__(self, stream: TextIO, forwarder: OutputForwarder, name: str):
        self._stream = stream
        self._forwarder = forwarder
        self._name = name

    def write(self, text: str) -> int:
        self._stream.write(text)
        self._forwarder.feed(self._name, text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")
