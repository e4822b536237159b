"""Metric points: batched, idempotent ingest; per-run key summaries; downsampled series.

Ingest contract (DESIGN §3, §5): a batch is stored whole or not at all, in one transaction.
(run_id, key, step) is the primary key and a re-sent point *replaces* the stored one
(`INSERT ... ON CONFLICT DO UPDATE`, last write wins): a spooled retry re-sends identical
values, and a run that resumes from its `latest` checkpoint re-logs the steps after it; the
values of the attempt that went on are the run's real history, so they are the ones kept.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import BigInteger, Float, String, Table, and_, bindparam, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Metric, MetricRollup, Run
from kdlab.backend.errors import Conflict, Invalid, NotFound, PayloadTooLarge
from kdlab.backend.mlflow.hooks import enqueue_metrics
from kdlab.backend.schemas.metrics import MetricKeyOut, MetricPointIn, SeriesOut
from kdlab.backend.schemas.runs import FINISHED
from kdlab.backend.services import rollups
from kdlab.backend.services.downsample import Window, downsample_many
from kdlab.backend.settings import Settings

INSERT_CHUNK = 5_000  # rows per statement (PostgreSQL) or executemany (SQLite); one transaction
MAX_REPORTED_ERRORS = 20  # a batch full of NaN gets a readable answer, not 50k lines
MAX_SERIES = 400  # runs × keys in one read (a sweep: 100 runs × 4 keys)


@lru_cache(maxsize=4)
def _series_gate(size: int) -> threading.BoundedSemaphore:
    """At most `size` series reads compute at once in this process: a compare view asked for
    over and over must not take the interpreter from the workers' posts (16 writers + 4
    readers: post p99 5.9 s ungated, 2.0 s with one reader at a time; write_contention.py)."""
    return threading.BoundedSemaphore(size)


METRICS = cast(Table, Metric.__table__)
_m = METRICS.c
_COLUMNS = ("run_id", "key", "step", "value", "wall_time")


def _non_finite(value: float) -> str:
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _check_finite(points: Sequence[MetricPointIn]) -> None:
    """422 naming every non-finite value (up to MAX_REPORTED_ERRORS) with its index and key."""
    errors: list[dict[str, Any]] = []
    for index, point in enumerate(points):
        for field in ("value", "time"):
            number = getattr(point, field)
            if number is not None and not math.isfinite(number):
                errors.append(
                    {
                        "loc": ["body", "points", index, field],
                        "msg": f"points[{index}].{field} for {point.key} is "
                        f"{_non_finite(number)}; only finite numbers are accepted and nothing "
                        "from this batch was stored",
                        "type": "finite_number",
                    }
                )
    if errors:
        if len(errors) > MAX_REPORTED_ERRORS:
            more = len(errors) - MAX_REPORTED_ERRORS
            errors = errors[:MAX_REPORTED_ERRORS]
            errors.append(
                {"loc": ["body", "points"], "msg": f"and {more} more", "type": "finite_number"}
            )
        raise Invalid(errors)


Row = tuple[str, int, float, float]  # key, step, value, wall_time


def _rows(points: Sequence[MetricPointIn], now: float) -> list[Row]:
    """One row per (key, step), the last occurrence winning, sorted by key and step (so that
    concurrent batches lock rows in the same order on PostgreSQL). 422 (`_check_finite`) if any
    value or time is not finite. One pass; a batch already in (key, step) order, as a worker
    sends it, is not sorted again."""
    latest: dict[tuple[str, int], Row] = {}
    isfinite = math.isfinite
    finite = ordered = True
    previous: tuple[str, int] | None = None
    for point in points:
        key, step, value, wall_time = point.key, point.step, point.value, point.time
        if wall_time is None:
            wall_time = now
        elif not isfinite(wall_time):
            finite = False
        if not isfinite(value):
            finite = False
        key_step = (key, step)
        if ordered and previous is not None and key_step <= previous:
            ordered = False
        previous = key_step
        latest[key_step] = (key, step, value, wall_time)
    if not finite:
        _check_finite(points)
    if ordered:  # strictly increasing: no repeats, and the dict keeps that order
        return list(latest.values())
    return [latest[key_step] for key_step in sorted(latest)]


def _ranges(rows: list[Row]) -> dict[str, list[int]]:
    """Per key, the [lowest, highest] step of sorted `rows`."""
    ranges: dict[str, list[int]] = {}
    for key, step, _value, _time in rows:
        bounds = ranges.get(key)
        if bounds is None:
            ranges[key] = [step, step]
        else:
            bounds[1] = step
    return ranges


@lru_cache(maxsize=1)
def _sqlite_upsert() -> str:
    """SQLite's INSERT ... ON CONFLICT DO UPDATE, compiled once to its qmark SQL: executemany
    on the driver with plain tuples skips SQLAlchemy's per-row parameter processing (the
    largest cost of a batch after JSON decoding)."""
    insert = sqlite.insert(METRICS).values({name: bindparam(name) for name in _COLUMNS})
    upsert = insert.on_conflict_do_update(
        index_elements=[_m.run_id, _m.key, _m.step],
        set_={"value": insert.excluded.value, "wall_time": insert.excluded.wall_time},
    )
    compiled = upsert.compile(dialect=sqlite.dialect())
    assert tuple(compiled.positiontup or ()) == _COLUMNS, compiled.positiontup
    return str(compiled)


def _postgresql_upsert() -> Any:
    """PostgreSQL's INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO UPDATE: a whole chunk
    is one statement with five parameters (four arrays), not one round trip per row."""
    arrays = (
        func.unnest(
            bindparam("keys", type_=postgresql.ARRAY(String)),
            bindparam("steps", type_=postgresql.ARRAY(BigInteger)),
            bindparam("values", type_=postgresql.ARRAY(Float)),
            bindparam("times", type_=postgresql.ARRAY(Float)),
        )
        .table_valued("key", "step", "value", "wall_time", name="points")
        .render_derived()
    )
    source = select(
        bindparam("run_id", type_=String),
        arrays.c.key,
        arrays.c.step,
        arrays.c.value,
        arrays.c.wall_time,
    )
    insert = postgresql.insert(METRICS).from_select(list(_COLUMNS), source)
    return insert.on_conflict_do_update(
        index_elements=[_m.run_id, _m.key, _m.step],
        set_={"value": insert.excluded.value, "wall_time": insert.excluded.wall_time},
    )


def _upsert(session: Session, run_id: str, rows: list[Row]) -> None:
    """Insert or replace `rows` of `run_id` in chunks, inside the session's transaction."""
    connection = session.connection()
    dialect = connection.dialect.name
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start : start + INSERT_CHUNK]
        if dialect == "sqlite":
            connection.exec_driver_sql(_sqlite_upsert(), [(run_id, *row) for row in chunk])
        elif dialect == "postgresql":
            keys, steps, values, times = (list(column) for column in zip(*chunk, strict=True))
            connection.execute(
                _postgresql_upsert(),
                {"run_id": run_id, "keys": keys, "steps": steps, "values": values, "times": times},
            )
        else:  # pragma: no cover - the project supports these two
            raise RuntimeError(f"metrics ingest supports SQLite and PostgreSQL, not {dialect}")


def ingest(
    session: Session, settings: Settings, run_id: str, points: Sequence[MetricPointIn]
) -> int:
    """Store a batch for `run_id` (auth is the caller's); returns how many points it held.

    413 above `settings.max_metric_batch` points; 404 for an unknown run; 409 once the run has
    finished; 422 if any value or time is NaN/±inf (then nothing is stored).
    """
    if len(points) > settings.max_metric_batch:
        raise PayloadTooLarge(
            f"{len(points)} points in one request; the limit is {settings.max_metric_batch} "
            "(KDLAB_MAX_METRIC_BATCH): send them in several batches"
        )
    # FOR SHARE on PostgreSQL: a concurrent "run finished" waits until this batch is in
    status = session.scalar(select(Run.status).where(Run.id == run_id).with_for_update(read=True))
    if status is None:
        raise NotFound(f"run {run_id} not found")
    if status in FINISHED:
        raise Conflict(f"run {run_id} is {status}; a finished run takes no new metric points")
    rows = _rows(points, time.time())
    if rows:
        _upsert(session, run_id, rows)
        rollups.refresh(session, run_id, rows)
        enqueue_metrics(session, run_id, rows, ranges=_ranges(rows))
    session.commit()
    return len(points)


def _end_read(session: Session) -> None:
    """End the read transaction now, before the answer is serialised: on PostgreSQL its
    snapshot, on SQLite (a deferred, query-only read) the WAL snapshot that holds back
    checkpoints."""
    session.commit()


def require_runs(session: Session, run_ids: Sequence[str]) -> None:
    """404 naming every id in `run_ids` that is not a run."""
    found = set(session.scalars(select(Run.id).where(Run.id.in_(run_ids))))
    missing = [run_id for run_id in run_ids if run_id not in found]
    if missing:
        raise NotFound(f"run{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}")


def key_summaries(session: Session, run_id: str) -> list[MetricKeyOut]:
    """Every key of a run with its point count and its last (largest-step) point."""
    require_runs(session, [run_id])
    # from the coarsest roll-up blocks (every point is in one), not a scan of the points
    _r = MetricRollup.__table__.c
    per_key = (
        select(
            _r.key.label("key"),
            func.sum(_r.count).label("count"),
            func.max(_r.last_step).label("last_step"),
        )
        .where(_r.run_id == run_id, _r.level == rollups.COARSEST)
        .group_by(_r.key)
        .subquery()
    )
    last = METRICS.alias("last")
    rows = session.execute(
        select(per_key.c.key, per_key.c.count, per_key.c.last_step, last.c.value, last.c.wall_time)
        .join(
            last,
            and_(
                last.c.run_id == run_id,
                last.c.key == per_key.c.key,
                last.c.step == per_key.c.last_step,
            ),
        )
        .order_by(per_key.c.key)
    ).all()
    _end_read(session)
    return [
        MetricKeyOut(key=key, count=count, last_step=step, last_value=value, last_time=wall_time)
        for key, count, step, value, wall_time in rows
    ]


def run_keys(session: Session, run_id: str) -> list[str]:
    """The run's keys, from its coarsest roll-up blocks (a key has one per 4,096 steps)."""
    _r = MetricRollup.__table__.c
    return list(
        session.scalars(
            select(_r.key)
            .where(_r.run_id == run_id, _r.level == rollups.COARSEST)
            .distinct()
            .order_by(_r.key)
        )
    )


def check_window(settings: Settings, window: Window) -> None:
    """422 (FastAPI's list shape) for a max_points or a range the service will not serve."""
    errors: list[dict[str, Any]] = []
    if window.max_points > settings.max_points_per_query:
        errors.append(
            {
                "loc": ["query", "max_points"],
                "msg": f"max_points is {window.max_points}; the limit is "
                f"{settings.max_points_per_query} (KDLAB_MAX_POINTS_PER_QUERY)",
                "type": "less_than_equal",
            }
        )
    for name, low, high in (
        ("step", window.min_step, window.max_step),
        ("time", window.min_time, window.max_time),
    ):
        if low is not None and high is not None and low > high:
            errors.append(
                {
                    "loc": ["query", f"min_{name}"],
                    "msg": f"min_{name} ({low}) is above max_{name} ({high})",
                    "type": "value_error",
                }
            )
    if errors:
        raise Invalid(errors)


def series(
    session: Session,
    settings: Settings,
    run_ids: Sequence[str],
    keys: Sequence[str] | None,
    window: Window,
) -> list[SeriesOut]:
    """Downsampled series for each run × key, in that order (a run without a key gets empty
    lists). `keys=None` means every key of each run. 404 if any run is unknown."""
    check_window(settings, window)
    if len(run_ids) * (len(keys) if keys else 1) > MAX_SERIES:
        raise Invalid.at(
            ["query", "runs"], f"more than {MAX_SERIES} series (runs × keys) in one request"
        )
    require_runs(session, run_ids)
    pairs = [
        (run_id, key)
        for run_id in run_ids
        for key in (keys if keys is not None else run_keys(session, run_id))
    ]
    if len(pairs) > MAX_SERIES:
        raise Invalid.at(
            ["query", "keys"],
            f"{len(pairs)} series (runs × keys) in one request; the limit is {MAX_SERIES}",
        )
    if session.get_bind().dialect.name == "postgresql":
        # a 100k-point series sorts ~4 MB: with the default 4 MB work_mem PostgreSQL picks an
        # external merge sort; with more it hash-aggregates in memory (~35% faster measured)
        session.execute(text("SET LOCAL work_mem = '32MB'"))
    with _series_gate(settings.series_readers):
        result = downsample_many(session, pairs, window)
    _end_read(session)
    return result
