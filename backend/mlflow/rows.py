"""An outbox row as the mirror reads it, and the error for a row it cannot process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class Rejected(Exception):
    """A row the mirror cannot process as it stands (retried MAX_REJECTIONS times)."""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    run_id: str
    kind: str
    payload: dict[str, Any]
    attempts: int


__all__ = ["OutboxRow", "Rejected"]
