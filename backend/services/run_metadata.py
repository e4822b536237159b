"""The metadata a run's worker logged: its `METADATA_LOG_PREFIX` log lines merged in order.

A module of its own, with only the models to import, so that the MLflow mirror process can read
a run's metadata without loading `run_views` (whose imports pull in torch).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kdlab.backend.db.models import RunEvent
from kdlab.worker.names import METADATA_LOG_PREFIX


def metadata(session: Session, run_id: str) -> dict[str, Any]:
    """The worker's metadata lines of the run merged in order (the last attempt's win)."""
    rows = session.scalars(
        select(RunEvent.message)
        .where(
            RunEvent.run_id == run_id,
            RunEvent.kind == "log",
            RunEvent.message.startswith(METADATA_LOG_PREFIX),
        )
        .order_by(RunEvent.id)
    ).all()
    merged: dict[str, Any] = {}
    for line in rows:
        try:
            value = json.loads(line[len(METADATA_LOG_PREFIX) :])
        except ValueError:
            continue
        if isinstance(value, dict):
            merged.update(value)
    return merged
