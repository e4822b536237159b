"""Live updates that cost no thread: one change watcher per app, and a cap on open streams.

Every server-sent event stream (`GET /api/runs/{id}/events`, the pages' `/live/runs` and
`/runs/{id}/live`) is an async generator on the event loop. None of them polls the database on
its own: each subscribes to the runs it shows, and the app's `LiveWatcher` polls once per
`interval` for all subscribed runs together, with one query of index lookups per run (the
run's status and `updated_at`, its newest `run_events.id` and `artifacts.id`, the newest step of
the metric keys the pages' progress and accuracy cells read). Only the streams whose runs
changed are woken; a woken stream reads its delta in one short threadpool call with its own
session. An idle stream therefore holds no thread, no session and no connection, just a
subscription and a socket.

Wake-ups are never lost: a stream reads the runs' signals *before* its data, in the same
session, and `Subscription.wait` returns as soon as the watcher's newer signal differs from
the one the stream read; so a change committed after the stream's read always wakes it (and
one committed before is in what it read).

`StreamSlots` caps the streams open at once per caller (`KDLAB_MAX_STREAMS_PER_TOKEN`): the
bearer token's hash, else the browser session, else one key for open access. `LiveResponse`
takes its slot when it starts (or answers 429 with `Retry-After`) and frees it when the stream
ends, however it ends (a client that vanishes included: Starlette cancels the stream when the
server reports the disconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from kdlab.backend.db.models import Artifact, Metric, Run, RunEvent
from kdlab.backend.services.auth import hash_token

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
RETRY_AFTER_SECONDS = 5
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# the metric keys whose newest step the pages' live cells depend on (progress, best accuracy
# and teacher accuracy: kdlab.backend.services.run_views.STEP_KEY, ACC_KEY, TEACHER_ACC_KEY)
WATCHED_METRICS = ("train/loss_total", "eval/student_acc", "eval/teacher_acc")
SUCCEEDED = "*succeeded"  # a pseudo run id: the set of succeeded runs (a distill run's baseline)
CHUNK = 500  # run ids per IN (...) list


class RunSignal(NamedTuple):
    """What changes when a run's stream has something new to show."""

    status: str
    updated_at: datetime | None
    last_event: int | None
    last_artifact: int | None
    last_steps: tuple[int | None, ...]  # of WATCHED_METRICS, in order

    @property
    def events(self) -> tuple[Any, ...]:
        """The part the API stream shows: the run row and its log lines."""
        return (self.status, self.updated_at, self.last_event)


Signals = dict[str, Any]  # run id → RunSignal, or None for a run that is gone


def read_signals(session: Session, run_ids: Iterable[str]) -> Signals:
    """The current signal of each run in `run_ids` (None: no such run), in one query per
    `CHUNK` runs; `SUCCEEDED` reads (count, newest created_at) of the succeeded runs."""
    ids = list(dict.fromkeys(run_ids))
    found: Signals = dict.fromkeys(ids)
    if SUCCEEDED in ids:
        ids.remove(SUCCEEDED)
        row = session.execute(
            select(func.count(), func.max(Run.created_at)).where(Run.status == "succeeded")
        ).one()
        found[SUCCEEDED] = tuple(row)
    last_event = select(func.max(RunEvent.id)).where(RunEvent.run_id == Run.id)
    last_artifact = select(func.max(Artifact.id)).where(Artifact.run_id == Run.id)
    steps = [
        select(func.max(Metric.step))
        .where(Metric.run_id == Run.id, Metric.key == key)
        .scalar_subquery()
        for key in WATCHED_METRICS
    ]
    for start in range(0, len(ids), CHUNK):
        query = select(
            Run.id,
            Run.status,
            Run.updated_at,
            last_event.scalar_subquery(),
            last_artifact.scalar_subquery(),
            *steps,
        ).where(Run.id.in_(ids[start : start + CHUNK]))
        for run_id, status, updated_at, event, artifact, *last_steps in session.execute(query):
            found[run_id] = RunSignal(status, updated_at, event, artifact, tuple(last_steps))
    return found


_MISSING = object()


class Subscription:
    """One stream's interest in some runs. `read` (in a worker thread, first in the stream's
    session) and `saw` (on the loop) record what the stream has shown; `wait` returns once the
    watcher has seen any of the runs differ from that."""

    def __init__(self, watcher: LiveWatcher, run_ids: Sequence[str], *, events_only: bool):
        self._watcher = watcher
        self.run_ids: tuple[str, ...] = tuple(dict.fromkeys(run_ids))
        self._events_only = events_only
        self._seen: dict[str, Any] = {}
        self._wake = asyncio.Event()

    def _view(self, signal: Any) -> Any:
        if self._events_only and isinstance(signal, RunSignal):
            return signal.events
        return signal

    @staticmethod
    def read(session: Session, run_ids: Iterable[str]) -> Signals:
        """`read_signals`, for callers that hold a subscription but not this module."""
        return read_signals(session, run_ids)

    def saw(self, signals: Signals) -> None:
        """The stream has shown the state of these signals (read before its data)."""
        for run_id, signal in signals.items():
            self._seen[run_id] = self._view(signal)

    def watch(self, run_ids: Sequence[str]) -> None:
        """Follow these runs from now on instead (a run page learns its teacher's id)."""
        run_ids = tuple(dict.fromkeys(run_ids))
        if run_ids != self.run_ids:
            self._watcher._unregister(self)
            self.run_ids = run_ids
            self._watcher._register(self)

    def changed(self) -> bool:
        known = self._watcher.signals
        return any(
            run_id in known and self._view(known[run_id]) != self._seen.get(run_id, _MISSING)
            for run_id in self.run_ids
        )

    def _notify(self) -> None:
        self._wake.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Until one of the runs changed (True) or `timeout` seconds passed (False)."""
        with anyio.move_on_after(timeout):
            while not self.changed():
                self._wake.clear()
                await self._wake.wait()
            return True
        return False


class StreamSlots:
    """Open streams per caller key; only touched on the event loop, so no lock."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> bool:
        if self.open.get(key, 0) >= limit:
            return False
        self.open[key] = self.open.get(key, 0) + 1
        return True

    def release(self, key: str) -> None:
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)


class LiveWatcher:
    """Polls the subscribed runs' signals every `interval` seconds (one query, in a worker
    thread) and wakes the subscriptions of the runs that changed. Its task starts with the
    app's lifespan (or with the first subscription of an event loop, for apps served without
    one) and stops with it; nothing is polled while nobody subscribes."""

    def __init__(self, factory: sessionmaker[Session], interval: float = POLL_SECONDS) -> None:
        self.factory = factory
        self.interval = interval
        self.signals: Signals = {}  # the last poll's signal of each subscribed run
        self.slots = StreamSlots()
        self.polls = 0
        self._subscribers: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LiveWatcher:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="kdlab-live-watcher")
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None or task.done():
            return
        loop = task.get_loop()
        if loop is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif not loop.is_closed():  # started by a request on another loop (no lifespan)
            loop.call_soon_threadsafe(task.cancel)

    async def _run(self) -> None:
        while True:
            run_ids = list(self._subscribers)
            if run_ids:
                try:
                    latest = await anyio.to_thread.run_sync(self._read, run_ids)
                except Exception:  # a database hiccup: streams keep waiting, retry next time
                    log.exception("live watcher: reading run signals failed")
                else:
                    self._publish(latest)
            await asyncio.sleep(self.interval)

    def _read(self, run_ids: list[str]) -> Signals:
        with self.factory() as session:
            try:
                return read_signals(session, run_ids)
            finally:
                session.rollback()

    def _publish(self, latest: Signals) -> None:
        self.polls += 1
        for run_id, signal in latest.items():
            if run_id in self.signals and self.signals[run_id] == signal:
                continue
            self.signals[run_id] = signal
            for subscription in list(self._subscribers.get(run_id, ())):
                subscription._notify()

    # ------------------------------------------------------------------ subscriptions

    @contextlib.contextmanager
    def subscribe(
        self, run_ids: Sequence[str], *, events_only: bool = False
    ) -> Iterator[Subscription]:
        """Follow `run_ids` while the block runs; `events_only`: wake only for what the API
        stream shows (status, the run row, log lines), not for metrics or artifacts."""
        self.start()
        subscription = Subscription(self, run_ids, events_only=events_only)
        self._register(subscription)
        try:
            yield subscription
        finally:
            self._unregister(subscription)

    def _register(self, subscription: Subscription) -> None:
        for run_id in subscription.run_ids:
            self._subscribers.setdefault(run_id, set()).add(subscription)

    def _unregister(self, subscription: Subscription) -> None:
        for run_id in subscription.run_ids:
            subscribers = self._subscribers.get(run_id)
            if subscribers is None:
                continue
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[run_id]
                self.signals.pop(run_id, None)


def watcher_of(app: FastAPI) -> LiveWatcher:
    """The app's watcher (made by its lifespan; made here for an app served without one)."""
    watcher: LiveWatcher | None = getattr(app.state, "live", None)
    if watcher is None:
        watcher = app.state.live = LiveWatcher(app.state.read_session_factory)
    return watcher


# --------------------------------------------------------------------------- stream slots


def stream_key(request: Request) -> str:
    """Whose stream this is: the bearer token (by its hash), else the browser session, else
    the one user of an open-access server."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "token:" + hash_token(token.strip())
    browser = getattr(request.state, "browser", None)
    if browser is not None:
        return "session:" + browser.sid
    return "open"


class LiveResponse(StreamingResponse):
    """A server-sent event stream that holds one of its caller's stream slots while it runs:
    over `KDLAB_MAX_STREAMS_PER_TOKEN` open at once → 429 with `Retry-After`."""

    def __init__(self, request: Request, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._watcher = watcher_of(request.app)
        self._limit: int = request.app.state.settings.max_streams_per_token
        self._key = stream_key(request)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        slots = self._watcher.slots
        if not slots.acquire(self._key, self._limit):
            await self._close_content()
            detail = (
                f"too many open event streams for this token: the limit is {self._limit} "
                "(setting max_streams_per_token, env KDLAB_MAX_STREAMS_PER_TOKEN); close one "
                "and retry"
            )
            refused = JSONResponse(
                {"detail": detail},
                status_code=429,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
            await refused(scope, receive, send)
            return
        try:
            await super().__call__(scope, receive, send)
        finally:
            slots.release(self._key)
            with anyio.CancelScope(shield=True):
                await self._close_content()

    async def _close_content(self) -> None:
        close = getattr(self.body_iterator, "aclose", None)
        if close is not None:
            await close()
