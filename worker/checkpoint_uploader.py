"""The worker's checkpoint thread: uploads `best.safetensors` and `latest.pt` as the trainer
rewrites them, so a successor of a killed worker resumes from the last one.

Polling the files (rather than a trainer hook) keeps the trainer unaware of the server, and
uploads never stall a step. The trainer replaces files atomically and an upload reads one open
file, so a half-written checkpoint is never uploaded.
"""

from __future__ import annotations

import threading
from pathlib import Path

from kdlab.worker.client import ApiClient
from kdlab.worker.echo import Echo
from kdlab.worker.names import BEST_FILE, LATEST_FILE


class CheckpointUploader:
    """Uploads `best.safetensors` and `latest.pt` from the work dir whenever the trainer
    rewrites them (polling their inode/mtime/size every `poll` s); `flush()` uploads what
    changed since, from the calling thread, after `stop()`."""

    FILES = (
        (BEST_FILE, "checkpoint"),
        (LATEST_FILE, "checkpoint"),
    )  # best first: latest's best is there

    def __init__(self, client: ApiClient, work_dir: Path, echo: Echo, poll: float = 1.0):
        self.client = client
        self.work_dir = work_dir
        self.echo = echo
        self.poll = poll
        self.uploaded: dict[str, tuple[int, int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdlab-checkpoints", daemon=True)

    def _signature(self, name: str) -> tuple[int, int, int] | None:
        try:
            st = (self.work_dir / name).stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def mark_present(self) -> None:
        """The files now in the work dir are on the server already (downloaded for a resume)."""
        for name, _ in self.FILES:
            signature = self._signature(name)
            if signature is not None:
                self.uploaded[name] = signature

    def start(self) -> CheckpointUploader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def upload_changed(self, attempts: int | None = None) -> None:
        for name, kind in self.FILES:
            signature = self._signature(name)
            if signature is None or self.uploaded.get(name) == signature:
                continue
            self.client.put_artifact(self.work_dir / name, name, kind, attempts=attempts)
            self.uploaded[name] = signature

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.poll):
            try:
                self.upload_changed(attempts=2)
                failing = False
            except FileNotFoundError:
                continue  # replaced between stat and open: the next poll takes the new one
            except Exception as err:
                if not failing:
                    self.echo(f"checkpoint upload failed ({err}); retrying")
                failing = True
