"""Where a run's metrics go: the `MetricSink` protocol and the file-based sinks.

A point is `(key, step, value, time)`, the same shape `POST /api/runs/{id}/metrics` takes, so a
`metrics.jsonl` written here can be replayed into the server unchanged.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from kdlab.worker.names import METADATA_FILE


@runtime_checkable
class MetricSink(Protocol):
    """What the trainer logs into. Implementations must not block for long: the trainer calls
    `log_metrics` once per logging interval, from the training loop."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_metadata(self, meta: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _json_value(value: float) -> float | str:
    """JSON has no NaN/Inf; write them as strings so the line stays parseable."""
    return value if math.isfinite(value) else str(value)


class JsonlSink:
    """One JSON line per point in `path` (appended, so a resumed run continues the same file);
    metadata merged into one JSON object in `metadata_path` (default: `metadata.json` beside it).
    """

    def __init__(self, path: str | os.PathLike, metadata_path: str | os.PathLike | None = None):
        self.path = Path(path)
        self.metadata_path = (
            Path(metadata_path) if metadata_path else self.path.with_name(METADATA_FILE)
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")
        self._metadata: dict[str, Any] = {}
        if self.metadata_path.exists():
            self._metadata = json.loads(self.metadata_path.read_text(encoding="utf-8"))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path}: the sink is closed")
        now = time.time()
        for key, value in metrics.items():
            point = {"key": key, "step": step, "value": _json_value(float(value)), "time": now}
            self._file.write(json.dumps(point) + "\n")
        self._file.flush()

    def log_metadata(self, meta: dict[str, Any]) -> None:
        self._metadata.update(meta)
        tmp = self.metadata_path.with_name(self.metadata_path.name + ".tmp")
        tmp.write_text(
            json.dumps(self._metadata, indent=2, default=str, ensure_ascii=False), encoding="utf-8"
        )
        os.replace(tmp, self.metadata_path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MultiSink:
    """Fans every call out to several sinks, in order."""

    def __init__(self, *sinks: MetricSink):
        self.sinks = list(sinks)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_metrics(step, metrics)

    def log_metadata(self, meta: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_metadata(meta)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The points of a `metrics.jsonl`, in file order (for tests and tools)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
