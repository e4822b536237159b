"""The drain loop: `MlflowMirror(settings, session_factory).start()` runs a daemon thread that
calls `drain_once()` every `interval` seconds; `.stop()` ends it. Rows are processed in id order
by the writer of their kind (`kdlab.backend.mlflow.writers`); the first error stops the round (that
row's `attempts` and `last_error` are updated and it is retried next round, the thread backing
off exponentially up to a minute). A row MLflow refuses as the request's fault is given up after
`MAX_REJECTIONS` attempts. A round runs under a PostgreSQL advisory lock (SQLite: an flock next
to the database), so two mirrors on one database take turns. See `kdlab.backend.mlflow`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Engine, Table, bindparam, delete, func, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from kdlab.backend.db.models import MlflowOutbox, utcnow
from kdlab.backend.mlflow import format as fmt
from kdlab.backend.mlflow import hooks, model, writers
from kdlab.backend.mlflow.dedup import MetricDedup
from kdlab.backend.mlflow.rows import OutboxRow, Rejected
from kdlab.backend.mlflow.store import SKIP, RunStore
from kdlab.backend.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature

log = logging.getLogger(__name__)

OUTBOX = cast(Table, MlflowOutbox.__table__)

MAX_REJECTIONS = 3
PERMANENT_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}
)
MAX_BACKOFF = 60.0
PURGE_EVERY = 3600.0
KEEP_DONE = timedelta(days=7)
ERROR_CHARS = 4000
ADVISORY_LOCK_KEY = 0x6B646C61624D4C46  # "kdlabMLF"
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # "🏃 View run ..." on every terminate
}
DISABLED_URIS = frozenset({"none", "off", "disabled"})
ROUND_ROWS = 1000  # outbox rows a round processes at most (then the next starts at once)
FETCH_ROWS = 500  # pending rows read at once
BUSY_POINTS_PER_S = 10_000  # metric points queued per second above which a polite mirror waits
BUSY_POLL = 0.25  # seconds between two looks at the outbox's newest rows
BUSY_ROWS = 200  # the newest rows looked at
MAX_YIELD = 30.0  # a polite mirror waits this long at most, then works as long without waiting


def _describe_error(err: BaseException) -> str:
    return fmt.truncate(f"{type(err).__name__}: {err}", ERROR_CHARS, keep="tail")


def _is_permanent(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in PERMANENT_CODES
    return isinstance(err, (Rejected, KeyError, ValueError, TypeError))


class MlflowMirror:
    """Drains the outbox into MLflow. `drain_once()` does one round; `start()`/`stop()` run
    rounds on a daemon thread. One instance per process is enough; it is thread-safe."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        tracking_uri: str | None = None,
        read_factory: sessionmaker[Session] | None = None,
    ) -> None:
        self.settings = settings
        self.tracking_uri = tracking_uri or settings.resolved_mlflow_uri
        self.factory = session_factory
        # reads (the pending rows, the points): on SQLite a deferred, query-only transaction
        # (`make_read_engine`), so the mirror never holds the write lock an ingest waits for
        self.read_factory = read_factory or session_factory
        self.store = RunStore(settings, session_factory, self.tracking_uri, self.read_factory)
        self.dedup = MetricDedup()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.failures = 0  # consecutive rounds that stopped on an error
        self.last_error: str | None = None
        # polite (the mirror process): wait while a bulk ingest is under way (see `yield_to_ingest`)
        self.polite = False
        self._rate = 0.0
        self._rate_at = -BUSY_POLL
        self._youngest: Any = None  # when the newest metrics row was queued
        self._work_until = 0.0
        self.store.pause = self.yield_to_ingest

    @property
    def client(self) -> MlflowClient:
        return self.store.client

    def signature(self, config: dict[str, Any]) -> ModelSignature | None:
        """The student model's signature for a run config (`kdlab.backend.mlflow.model.signature`)."""
        return model.signature(self.settings, config)

    def _engine(self) -> Engine:
        bind = self.factory.kw.get("bind")
        if isinstance(bind, Engine):
            return bind
        with self.factory() as session:
            engine = session.get_bind()
            assert isinstance(engine, Engine)
            return engine

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[bool]:
        """True while this process may drain (PostgreSQL advisory lock, SQLite flock)."""
        engine = self._engine()
        if engine.dialect.name == "postgresql":
            with engine.connect() as raw:
                conn = raw.execution_options(isolation_level="AUTOCOMMIT")
                got = bool(
                    conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
                )
                try:
                    yield got
                finally:
                    if got:
                        conn.scalar(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
            return
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield True
            return
        if not database or database == ":memory:":
            yield True
            return
        lock_path = (
            Path(database).expanduser().with_name(Path(database).name + ".mlflow-mirror.lock")
        )
        with open(lock_path, "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ the loop

    @property
    def enabled(self) -> bool:
        """False when the tracking URI is `none`/`off` (`KDLAB_MLFLOW_TRACKING_URI=none`)."""
        return self.tracking_uri.strip().lower() not in DISABLED_URIS

    def start(self, interval: float = 1.0) -> MlflowMirror:
        """Drain on a daemon thread every `interval` seconds (sooner while rows are waiting,
        later after errors). Installs the outbox hooks. Returns self. Does nothing (no hooks,
        no thread, MLflow not imported) when the mirror is not `enabled`."""
        if not self.enabled:
            return self
        hooks.install_outbox_hooks(self.factory)
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name="kdlab-mlflow-mirror", daemon=True
        )
        self._thread.start()
        return self

    def serve(self, interval: float = 1.0) -> None:
        """Drain in the calling thread until `request_stop()` (the mirror process's main loop,
        `kdlab.backend.mlflow.process`). Installs no hooks: the API process queues."""
        if not self.enabled:
            return
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self._loop(interval)

    def request_stop(self) -> None:
        """End `serve()` (or the thread) after the current MLflow call; safe in a signal handler."""
        self._stopping.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to stop and wait up to `timeout` s (an MLflow call in flight ends on
        its own timeout; the thread is a daemon either way)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self, interval: float, limit: int = ROUND_ROWS) -> None:
        last_purge = time.monotonic()
        while not self._stopping.is_set():
            try:
                done = self.drain_once(limit)
            except Exception as err:  # our own database, most likely; try again later
                log.warning("MLflow mirror: round failed: %s", _describe_error(err))
                self.failures += 1
                done = 0
            if self.failures:
                delay = min(MAX_BACKOFF, interval * 2 ** min(self.failures, 10))
            else:
                delay = 0.0 if done >= limit else interval
            if time.monotonic() - last_purge > PURGE_EVERY:
                last_purge = time.monotonic()
                with contextlib.suppress(SQLAlchemyError):
                    self.purge()
            if delay:
                self._stopping.wait(delay)

    def _ingest_rate(self) -> float:
        """Metric points queued in the last second (the outbox's newest rows), read at most
        every `BUSY_POLL` s."""
        now = time.monotonic()
        if now - self._rate_at >= BUSY_POLL:
            self._rate_at = now
            cutoff = utcnow() - timedelta(seconds=1)
            with self.read_factory() as session:
                rows = session.execute(
                    select(OUTBOX.c.kind, OUTBOX.c.payload, OUTBOX.c.created_at)
                    .order_by(OUTBOX.c.id.desc())
                    .limit(BUSY_ROWS)
                ).all()
                session.rollback()
            points = 0
            self._youngest = None
            for kind, payload, created_at in rows:
                if created_at is None or kind != hooks.METRICS:
                    continue
                if created_at.tzinfo is None:
                    created_at = created_at.replace(tzinfo=cutoff.tzinfo)
                if self._youngest is None or created_at > self._youngest:
                    self._youngest = created_at
                if created_at >= cutoff:
                    count = (payload or {}).get("points")
                    points += count if isinstance(count, int) and count > 0 else 1
            self._rate = float(points)
        return self._rate

    def yield_to_ingest(self) -> None:
        """A polite mirror waits while points are being queued faster than `BUSY_POINTS_PER_S`
        (a bulk ingest: its requests get the CPU and the database to themselves), up to
        `MAX_YIELD` s; then it works as long without waiting (so a sustained load gets half of
        the mirror's pace, never none). Called between MLflow calls, with no transaction open."""
        if not self.polite or time.monotonic() < self._work_until:
            return
        began = time.monotonic()
        settled = False
        while not self._stopping.is_set():
            if self._ingest_rate() < BUSY_POINTS_PER_S:
                # a batch queued just now may be the first of a bulk ingest: look once more
                young = self._youngest is not None and (
                    utcnow() - self._youngest < timedelta(seconds=BUSY_POLL)
                )
                if settled or not young:
                    return
                settled = True
            if time.monotonic() - began >= MAX_YIELD:
                self._work_until = time.monotonic() + MAX_YIELD
                return
            self._stopping.wait(BUSY_POLL)

    def purge(self, older_than: timedelta = KEEP_DONE) -> int:
        """Delete rows done more than `older_than` ago; how many went."""
        with self.factory() as session:
            result = session.execute(
                delete(OUTBOX).where(OUTBOX.c.done_at < utcnow() - older_than),
                execution_options=SKIP,
            )
            session.commit()
            return int(getattr(result, "rowcount", 0) or 0)

    def pending(self) -> int:
        """How many rows wait."""
        with self.read_factory() as session:
            count = session.scalar(
                select(func.count()).select_from(OUTBOX).where(OUTBOX.c.done_at.is_(None))
            )
            session.rollback()
            return int(count or 0)

    def drain_once(self, limit: int = ROUND_ROWS) -> int:
        """Process up to `limit` pending rows in id order; how many were marked done. Stops at
        the first error (that row keeps `attempts`/`last_error` and is retried next round).
        Consecutive metrics rows are drained together (`_attempt_group`): per run, one read
        of the union of their step ranges and its new points logged in 1,000-point calls."""
        if not self.enabled:
            return 0
        with self._lock, self._exclusive() as mine:
            if not mine:
                return 0
            processed = 0
            while processed < limit:
                rows = self._pending_rows(min(limit - processed, FETCH_ROWS))
                if not rows:
                    break
                for index, row in enumerate(rows):
                    self.yield_to_ingest()
                    if self.polite and self._stopping.is_set():
                        return processed  # the process is asked to end: the rest can wait
                    group = self._metrics_group(rows, index)
                    if len(group) > 1:
                        done, failed = self._attempt_group(group)
                        processed += done
                        if failed:
                            self.failures += 1
                            return processed
                        break  # read the pending rows again
                    if not self._attempt(row):
                        self.failures += 1
                        return processed
                    processed += 1
            self.failures = 0
            return processed

    @staticmethod
    def _metrics_group(rows: list[OutboxRow], index: int) -> list[OutboxRow]:
        """The readable metrics rows from `rows[index]` on, up to `GROUP_POINTS` points (at
        least one row; none if `rows[index]` is not a readable metrics row)."""
        group: list[OutboxRow] = []
        points = 0
        for row in rows[index:]:
            if row.kind != hooks.METRICS:
                break
            try:
                writers.row_ranges(row)
            except Rejected:
                break
            count = row.payload.get("points")
            points += count if isinstance(count, int) and count > 0 else 1
            if group and points > writers.GROUP_POINTS:
                break
            group.append(row)
        return group

    def _attempt_group(self, group: list[OutboxRow]) -> tuple[int, bool]:
        """Consecutive metrics rows, run by run (in the order of each run's first row): how
        many were marked done, and whether the round must stop. A run's rows are marked done
        in one transaction after MLflow took all their points; on an error the caches are
        dropped and that run's first row is tried alone (`_attempt`: it records the failure,
        or succeeds and the rest are read again)."""
        by_run: dict[str, list[OutboxRow]] = {}
        for row in group:
            by_run.setdefault(row.run_id, []).append(row)
        done = 0
        for rows in by_run.values():
            if len(rows) == 1:
                if not self._attempt(rows[0]):
                    return done, True
                done += 1
                continue
            try:
                summaries = writers.metrics_group(self.store, self.dedup, rows)
            except Exception as err:
                self.dedup.clear()
                self.store.clear()
                log.info("MLflow mirror: %d rows at once failed (%s); one by one", len(rows), err)
                if not self._attempt(rows[0]):
                    return done, True
                return done + 1, False
            self._finish_many(rows, summaries)
            done += len(rows)
        return done, False

    def _pending_rows(self, limit: int) -> list[OutboxRow]:
        with self.read_factory() as session:
            rows = session.execute(
                select(
                    OUTBOX.c.id,
                    OUTBOX.c.run_id,
                    OUTBOX.c.kind,
                    OUTBOX.c.payload,
                    OUTBOX.c.attempts,
                )
                .where(OUTBOX.c.done_at.is_(None))
                .order_by(OUTBOX.c.id)
                .limit(limit)
            ).all()
            session.rollback()
        return [
            OutboxRow(r.id, r.run_id, r.kind, dict(r.payload or {}), int(r.attempts or 0))
            for r in rows
        ]

    def _attempt(self, row: OutboxRow) -> bool:
        """Process one row; False if it failed and the round must stop."""
        try:
            summary = writers.write(self.store, self.dedup, row)
        except Exception as err:
            # whatever MLflow did before the error, the caches may now be wrong
            self.dedup.clear()
            self.store.clear()
            message = _describe_error(err)
            self.last_error = f"outbox row {row.id} ({row.kind}, run {row.run_id}): {message}"
            give_up = _is_permanent(err) and row.attempts + 1 >= MAX_REJECTIONS
            log.warning("MLflow mirror: %s%s", self.last_error, " (giving up)" if give_up else "")
            self._record_failure(row, message, give_up)
            return give_up
        self._finish(row, summary)
        return True

    def _record_failure(self, row: OutboxRow, message: str, give_up: bool) -> None:
        values: dict[str, Any] = {"attempts": OUTBOX.c.attempts + 1, "last_error": message}
        if give_up:
            values["last_error"] = fmt.truncate(
                f"gave up after {row.attempts + 1} attempts: {message}", ERROR_CHARS, keep="tail"
            )
            values["done_at"] = utcnow()
        with self.factory() as session:
            session.execute(
                update(OUTBOX).where(OUTBOX.c.id == row.id).values(**values),
                execution_options=SKIP,
            )
            session.commit()

    def _finish_many(self, rows: list[OutboxRow], summaries: dict[int, dict[str, Any]]) -> None:
        statement = (
            update(OUTBOX)
            .where(OUTBOX.c.id == bindparam("row_id"), OUTBOX.c.done_at.is_(None))
            .values(done_at=utcnow(), payload=bindparam("summary", type_=OUTBOX.c.payload.type))
        )
        with self.factory() as session:
            session.execute(
                statement,
                [{"row_id": row.id, "summary": summaries[row.id]} for row in rows],
                execution_options=SKIP,
            )
            session.commit()

    def _finish(self, row: OutboxRow, summary: dict[str, Any] | None) -> None:
        values: dict[str, Any] = {"done_at": utcnow()}
        if summary is not None:
            values["payload"] = summary
        with self.factory() as session:
            session.execute(
                update(OUTBOX)
                .where(OUTBOX.c.id == row.id, OUTBOX.c.done_at.is_(None))
                .values(**values),
                execution_options=SKIP,
            )
            session.commit()


__all__ = ["MlflowMirror"]
