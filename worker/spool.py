"""A durable queue of metric batches that could not be sent yet (DESIGN §5).

On disk, in the spool directory:
- `metrics.spool.jsonl`: one JSON line per batch, `{"points": [...]}`, appended and fsynced
  before `append` returns, so a batch survives the worker process (and the machine) dying;
- `metrics.spool.offset`: how many bytes of the file were delivered (written atomically).

Batches leave in the order they came (oldest first): `peek` returns the oldest undelivered
batch, `pop` marks it delivered. A crash between delivering a batch and `pop` sends it again
on the next try, which is harmless: the server stores each (run, key, step) once. When every
batch is delivered both files are removed. A half-written last line (a crash mid-append) is
cut off when the spool is opened. One process writes a spool at a time (the run's worker).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("kdlab.worker.spool")

SPOOL_FILE = "metrics.spool.jsonl"
OFFSET_FILE = "metrics.spool.offset"
REJECTED_FILE = "metrics.rejected.jsonl"

Point = dict[str, Any]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Spool:
    """Metric batches on disk until they are delivered; see the module docstring."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / SPOOL_FILE
        self.offset_path = self.directory / OFFSET_FILE
        self.rejected_path = self.directory / REJECTED_FILE
        self._offset = 0
        self._recover()

    # ------------------------------------------------------------------------------ state
    def _recover(self) -> None:
        """Read the delivered offset; cut a torn last line; drop files of a drained spool."""
        if not self.path.exists():
            self.offset_path.unlink(missing_ok=True)
            self._offset = 0
            return
        try:
            self._offset = int(self.offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            self._offset = 0
        data_size = self.path.stat().st_size
        with open(self.path, "rb+") as handle:
            if data_size:
                handle.seek(max(0, data_size - 1))
                if handle.read(1) != b"\n":  # a torn append: cut back to the last full line
                    handle.seek(0)
                    content = handle.read()
                    keep = content.rfind(b"\n") + 1
                    handle.truncate(keep)
                    handle.flush()
                    os.fsync(handle.fileno())
                    log.warning("%s: dropped a half-written last line", self.path)
        size = self.path.stat().st_size
        if self._offset > size:
            self._offset = 0  # an offset that does not fit the file: deliver everything again
        if self._offset >= size:
            self._clear()

    def _clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.offset_path.unlink(missing_ok=True)
        self._offset = 0

    def _write_offset(self, offset: int) -> None:
        tmp = self.offset_path.with_name(self.offset_path.name + ".tmp")
        with open(tmp, "w") as handle:
            handle.write(str(offset))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.offset_path)

    # ------------------------------------------------------------------------------- queue
    def pending(self) -> bool:
        """True while some batch is not delivered."""
        return self.path.exists() and self.path.stat().st_size > self._offset

    def append(self, points: list[Point]) -> None:
        """Add one batch; durable (fsynced) when this returns."""
        if not points:
            return
        line = json.dumps({"points": points}, separators=(",", ":")) + "\n"
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if new:
            _fsync_dir(self.directory)

    def peek(self) -> tuple[list[Point], int] | None:
        """The oldest undelivered batch and the offset to `pop` once it is delivered; None when
        the spool is empty. A line that is not a batch is moved to the rejected file."""
        while self.pending():
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                raw = handle.readline()
                end = handle.tell()
            try:
                batch = json.loads(raw)
                points = batch["points"]
                if not isinstance(points, list):
                    raise TypeError("points is not a list")
            except (ValueError, KeyError, TypeError) as err:
                self.reject(raw.decode("utf-8", "replace").strip(), f"unreadable spool line: {err}")
                self.pop(end)
                continue
            return points, end
        return None

    def pop(self, end: int) -> None:
        """Mark everything before byte `end` (from `peek`) delivered."""
        self._offset = end
        if self._offset >= self.path.stat().st_size:
            self._clear()
        else:
            self._write_offset(self._offset)

    def pending_points(self) -> int:
        """How many points wait on disk (reads the file)."""
        if not self.pending():
            return 0
        count = 0
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            for raw in handle:
                try:
                    count += len(json.loads(raw)["points"])
                except (ValueError, KeyError, TypeError):
                    continue
        return count

    def reject(self, payload: Any, reason: str) -> None:
        """Keep a batch the server refused for good (4xx) beside the spool, with the reason."""
        line = json.dumps({"reason": reason, "batch": payload}, default=str) + "\n"
        with open(self.rejected_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
