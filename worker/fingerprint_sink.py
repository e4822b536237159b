"""A metric sink that reports the teacher's fingerprint to the server as soon as it is known."""

from __future__ import annotations

from typing import Any

from kdlab.worker.client import ApiClient
from kdlab.worker.echo import Echo


class FingerprintReporter:
    """A sink that reports the teacher fingerprint as soon as the trainer knows it."""

    def __init__(self, client: ApiClient, echo: Echo):
        self.client = client
        self.echo = echo
        self.fingerprint: str | None = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_metadata(self, meta: dict[str, Any]) -> None:
        fingerprint = meta.get("teacher_fingerprint")
        if isinstance(fingerprint, str) and fingerprint != self.fingerprint:
            self.fingerprint = fingerprint
            try:
                self.client.set_status("running", teacher_fingerprint=fingerprint, attempts=2)
            except Exception as err:
                self.echo(f"could not report the teacher fingerprint yet ({err})")

    def close(self) -> None:
        pass
