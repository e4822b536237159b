"""Server-sent events of one run: its status whenever it changes, its log lines as they
arrive, `end` once it is finished (the pages' streams use `sse_message` too)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from sqlalchemy.orm import Session, sessionmaker

from kdlab.backend.db.models import Run
from kdlab.backend.schemas.runs import FINISHED, RunOut
from kdlab.backend.services.runs import read_log_events, run_out

if (
    TYPE_CHECKING
):  # kdlab.backend.services.live imports run_views, which imports kdlab.backend.services.runs
    from kdlab.backend.services.live import LiveWatcher, Subscription

STREAM_BATCH = 1000  # log lines one read sends after a Last-Event-ID


def sse_message(event: str, data: str, event_id: int | None = None) -> str:
    """One server-sent event (a multi-line `data` becomes several `data:` lines)."""
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines.append(f"event: {event}")
    lines += [f"data: {part}" for part in data.split("\n")]
    return "\n".join(lines) + "\n\n"


def _status_key(run: RunOut) -> tuple[Any, ...]:
    return (
        run.status,
        run.attempt,
        run.error,
        run.cancel_requested,
        run.started_at,
        run.finished_at,
        run.mlflow_run_id,
    )


def _read_events(
    factory: sessionmaker[Session],
    subscription: Subscription | None,
    run_id: str,
    after_id: int | None,
    initial_tail: int,
) -> tuple[RunOut | None, list[tuple[int, str]], dict[str, Any]]:
    """One short session: the run's signal (first: see `kdlab.backend.services.live`), its view, and
    its log lines (the last `initial_tail`, or up to STREAM_BATCH after `after_id`)."""
    with factory() as session:
        signals = subscription.read(session, [run_id]) if subscription is not None else {}
        run = session.get(Run, run_id)
        if run is None:
            session.rollback()
            return None, [], signals
        view = run_out(run)
        tail = initial_tail if after_id is None else STREAM_BATCH
        rows = read_log_events(session, run_id, tail, after_id)
        session.rollback()
    return view, rows, signals


async def event_stream(
    factory: sessionmaker[Session],
    run_id: str,
    watcher: LiveWatcher,
    *,
    once: bool = False,
    after_id: int | None = None,
    initial_tail: int = 200,
    keepalive_seconds: float = 15.0,
) -> AsyncIterator[str]:
    """Server-sent events for one run.

    `event: status` (data: the run JSON) first and whenever the run's state changes;
    `event: log` (id: the event id, data: the line) for each log/error line, starting with
    the last `initial_tail` (or everything after `after_id`, a Last-Event-ID); `event: end`
    once the run is finished, then the stream closes. `once` sends the current state and
    closes. The stream runs on the event loop and holds no thread: `watcher` wakes it when the
    run changes, and each read is one short session in a worker thread; `: keep-alive`
    comments go out after `keepalive_seconds` of silence.
    """
    with contextlib.ExitStack() as stack:
        subscription = (
            None if once else stack.enter_context(watcher.subscribe([run_id], events_only=True))
        )
        last_key: tuple[Any, ...] | None = None
        last_sent = time.monotonic()
        while True:
            view, rows, signals = await anyio.to_thread.run_sync(
                _read_events, factory, subscription, run_id, after_id, initial_tail
            )
            if subscription is not None:
                subscription.saw(signals)
            if view is None:
                yield sse_message("end", json.dumps({"detail": f"run {run_id!r} not found"}))
                return
            chunks = []
            if _status_key(view) != last_key:
                last_key = _status_key(view)
                chunks.append(sse_message("status", view.model_dump_json()))
            for event_id, message in rows:
                chunks.append(sse_message("log", message, event_id))
            backlog = after_id is not None and len(rows) == STREAM_BATCH  # more lines are waiting
            after_id = rows[-1][0] if rows else (after_id or 0)
            finished = view.status in FINISHED and not backlog
            if finished:
                chunks.append(sse_message("end", json.dumps({"status": view.status})))
            if chunks:
                last_sent = time.monotonic()
                yield "".join(chunks)
            if finished or subscription is None:
                return
            if backlog:
                continue
            while not await subscription.wait(
                max(0.0, keepalive_seconds - (time.monotonic() - last_sent))
            ):
                last_sent = time.monotonic()
                yield ": keep-alive\n\n"
