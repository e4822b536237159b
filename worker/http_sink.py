"""`HttpMetricSink`: the trainer's metrics, posted to the server in batches, spooled when it is down.

`log_metrics` only queues points in memory (the training loop never waits on the network). A
background thread posts a batch when the oldest queued point is `interval` (1 s) old or
`batch_points` (1,000) points are queued. If a post fails for any reason other than a 4xx
answer (connection refused, timeout, 5xx, ...), the batch is appended to the on-disk spool
(`kdlab.worker.spool.Spool`, fsynced) and re-sent later, oldest first, with exponential backoff;
while anything is spooled, new batches join the end of the spool so the server receives the
points in the order they were logged. The server stores each (run, key, step) once, so a
re-sent batch never doubles a point; nothing is dropped except what the server refuses for good
(a 4xx: finished run, invalid batch), which is kept in `metrics.rejected.jsonl` beside the
spool, and values the server cannot store (NaN/±inf, malformed keys), which are counted and
reported.

`log_metadata` merges into one dict, posts it to the run's log as one `metadata {...}` line,
and `close()` uploads the merged dict as the artifact `metadata.json`.

`close()` sends everything still queued or spooled, waiting up to `close_timeout` (60 s)
while the server is unreachable; after that the points stay in the spool on disk (said on
stderr and in `unsent_points`) and the next sink opened on the same spool directory - the
next attempt of the run in the same work dir - sends them first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kdlab.worker.client import ApiClient, ApiClientError
from kdlab.worker.names import METADATA_FILE, METADATA_LOG_PREFIX
from kdlab.worker.spool import Point, Spool

log = logging.getLogger("kdlab.worker.metrics")

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_./~-]{1,250}$")  # what the server accepts as a key
METADATA_ARTIFACT = METADATA_FILE


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class HttpMetricSink:
    """A `kdlab.worker.metrics.MetricSink` that reports to the server; see the module docstring."""

    def __init__(
        self,
        client: ApiClient,
        spool_dir: str | os.PathLike,
        *,
        batch_points: int = 1000,
        interval: float = 1.0,
        close_timeout: float = 60.0,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        upload_metadata: bool = True,
        echo: Callable[[str], None] = _stderr,
    ) -> None:
        self.client = client
        self.spool = Spool(spool_dir)
        self.batch_points = batch_points
        self.interval = interval
        self.close_timeout = close_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.upload_metadata = upload_metadata
        self.echo = echo
        # counters (read them after close)
        self.sent_points = 0
        self.rejected_points = 0
        self.dropped_points = 0  # non-finite values, malformed keys
        self.unsent_points = 0  # left in the spool by close()
        self.flushed = False
        # shared with the sender thread, guarded by _cond
        self._cond = threading.Condition()
        self._queue: list[Point] = []
        self._first_at: float | None = None
        self._logs: list[str] = []
        self._closing = False
        self._deadline = math.inf
        self._closed = False
        # sender-thread state
        self._backoff = 0.0
        self._next_try = 0.0
        self._spooled = self.spool.pending()  # a previous attempt's leftovers go first
        self._down_since: float | None = None
        self._metadata: dict[str, Any] = {}
        self._warned_keys: set[str] = set()
        if self._spooled:
            self.echo(
                f"metrics: {self.spool.pending_points()} points from an earlier attempt wait in "
                f"{self.spool.path}; sending them first"
            )
        self._thread = threading.Thread(target=self._run, name="kdlab-metrics", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------ MetricSink API
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        points: list[Point] = []
        for key, raw in metrics.items():
            value = float(raw)
            if not math.isfinite(value) or not KEY_PATTERN.match(key):
                self._drop(key, value, step)
                continue
            points.append({"key": key, "step": int(step), "value": value, "time": now})
        if not points:
            return
        with self._cond:
            if self._closed:
                raise RuntimeError("HttpMetricSink is closed")
            first = not self._queue
            if first:
                self._first_at = time.monotonic()
            self._queue.extend(points)
            if first or len(self._queue) >= self.batch_points:
                self._cond.notify()  # first: the thread starts its `interval` countdown

    def log_metadata(self, meta: dict[str, Any]) -> None:
        self._metadata.update(meta)
        line = METADATA_LOG_PREFIX + json.dumps(
            meta, default=str, ensure_ascii=False, sort_keys=True
        )
        with self._cond:
            self._logs.append(line)
            self._cond.notify()

    def close(self) -> None:
        """Send everything (waiting up to `close_timeout` for the server), then upload the
        metadata. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._closing = True
            self._deadline = time.monotonic() + self.close_timeout
            self._cond.notify()
        self._thread.join(self.close_timeout + self.client.timeout + 5.0)
        if self._thread.is_alive():  # stuck in a request; its batch stays in memory
            self.echo("metrics: the sender thread did not finish; unsent points may be lost")
        self.unsent_points = self.spool.pending_points()
        self.flushed = self.unsent_points == 0 and not self._thread.is_alive()
        if self.unsent_points:
            self.echo(
                f"metrics: {self.unsent_points} points could not be sent within "
                f"{self.close_timeout:.0f} s; they are kept in {self.spool.path} and are sent "
                "when a worker for this run starts again with the same work dir"
            )
        if self.dropped_points:
            self.echo(f"metrics: {self.dropped_points} points were not sent (NaN/inf or bad key)")
        if self.rejected_points:
            self.echo(
                f"metrics: the server refused {self.rejected_points} points; they are kept in "
                f"{self.spool.rejected_path}"
            )
        if self.upload_metadata and self._metadata:
            self._upload_metadata()

    # ------------------------------------------------------------------------------ helpers
    def _drop(self, key: str, value: float, step: int) -> None:
        self.dropped_points += 1
        if key not in self._warned_keys:
            self._warned_keys.add(key)
            why = "is not a valid metric key" if not KEY_PATTERN.match(key) else f"is {value}"
            self.echo(f"metrics: not sending {key} at step {step}: it {why} (warned once per key)")

    def _upload_metadata(self) -> None:
        path = self.spool.directory / METADATA_ARTIFACT
        path.write_text(
            json.dumps(self._metadata, indent=2, default=str, ensure_ascii=False), encoding="utf-8"
        )
        try:
            self.client.put_artifact(path, METADATA_ARTIFACT, "file", attempts=3)
        except Exception as err:
            self.echo(f"metrics: could not upload {METADATA_ARTIFACT}: {err}")

    # ------------------------------------------------------------------------- sender thread
    def _due(self, now: float) -> bool:
        """Whether the thread has work now (called with the lock held)."""
        if self._closing:
            return True
        if len(self._queue) >= self.batch_points:
            return True
        if self._first_at is not None and now - self._first_at >= self.interval:
            return True
        return (self._spooled or bool(self._logs)) and now >= self._next_try

    def _wait_seconds(self, now: float) -> float | None:
        waits = []
        if self._first_at is not None:
            waits.append(self._first_at + self.interval - now)
        if self._spooled or self._logs:
            waits.append(self._next_try - now)
        return max(0.0, min(waits)) if waits else None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due(time.monotonic()):
                    self._cond.wait(self._wait_seconds(time.monotonic()))
                now = time.monotonic()
                batch = self._queue[: self.batch_points]
                del self._queue[: self.batch_points]
                self._first_at = now if self._queue else None
                closing = self._closing
                logs: list[str] = []
                if self._logs and now >= self._next_try:
                    logs, self._logs = self._logs, []
            if logs:
                self._send_logs(logs)
            if batch:
                self._deliver(batch)
            self._drain()
            if not closing:
                continue
            with self._cond:
                remaining = bool(self._queue)
            if not remaining and not self._spooled:
                return
            if time.monotonic() >= self._deadline:
                with self._cond:  # out of time: keep what is left on disk
                    rest, self._queue = self._queue, []
                for start in range(0, len(rest), self.batch_points):
                    self.spool.append(rest[start : start + self.batch_points])
                return
            if not remaining:  # only spooled batches left: wait for the next try
                with self._cond:
                    wait = min(self._next_try, self._deadline) - time.monotonic()
                    if wait > 0:
                        self._cond.wait(wait)

    def _failed(self, err: Exception) -> None:
        self._backoff = min(self.backoff_max, max(self.backoff_min, self._backoff * 2))
        self._next_try = time.monotonic() + self._backoff
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.echo(
                f"metrics: cannot reach the server ({err}); spooling to {self.spool.path} and "
                "retrying"
            )

    def _recovered(self) -> None:
        if self._down_since is not None:
            self.echo(
                f"metrics: the server is back after {time.monotonic() - self._down_since:.1f} s"
            )
        self._backoff = 0.0
        self._next_try = 0.0
        self._down_since = None

    def _post(self, points: list[Point]) -> bool | None:
        """True: delivered. None: refused for good (kept as rejected). False: try again later."""
        try:
            self.client.post_metrics(points, attempts=1)
        except ApiClientError as err:
            self.rejected_points += len(points)
            self.spool.reject(points, str(err))
            self.echo(f"metrics: the server refused a batch of {len(points)} points: {err}")
            return None
        except Exception as err:  # any other failure: keep the batch and try again later
            self._failed(err)
            return False
        self.sent_points += len(points)
        self._recovered()
        return True

    def _deliver(self, batch: list[Point]) -> None:
        if self._spooled:  # older points are waiting: these go after them
            self.spool.append(batch)
            return
        if self._post(batch) is False:
            self.spool.append(batch)
            self._spooled = True

    def _drain(self) -> None:
        while self._spooled and time.monotonic() >= self._next_try:
            head = self.spool.peek()
            if head is None:
                self._spooled = False
                return
            points, end = head
            if self._post(points) is False:
                return
            self.spool.pop(end)
            self._spooled = self.spool.pending()

    def _send_logs(self, lines: list[str]) -> None:
        try:
            self.client.post_logs(lines, "log", attempts=1)
        except ApiClientError as err:
            self.echo(f"metrics: the server refused the metadata log line: {err}")
        except Exception as err:
            self._failed(err)
            with self._cond:
                self._logs[:0] = lines
