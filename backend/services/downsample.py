"""Downsampling one metric series in SQL: GROUP BY an integer bucket of x, min/max exact.

The x range [lo, hi] of the (zoomed) series is split into `n` equal ranges:

- x = step: bucket = (step - lo) * n // (hi - lo + 1), integer arithmetic, so bucket `i` holds
  the steps in [lo + i·w, lo + (i+1)·w) with w = (hi - lo + 1) / n;
- x = time: bucket = min(floor((wall_time - lo) * (n / (hi - lo))), n - 1), in doubles, so the
  last point (time = hi) falls in the last bucket.

Per bucket: `min` and `max` of the values (exact, so a one-step spike always shows), `value` =
their mean, `step` = the largest step and `time` = the latest wall time in it (the last point's,
for a run that logs in order). Empty buckets are left out. A series with at most `n` points is
returned unchanged (min = max = value). Nothing but the ≤ n bucket rows leaves the database.

For x = step, when the range spans at least one 64-step block per bucket, the buckets are read
from the roll-up table (`kdlab.backend.services.rollups`) instead of the points: each bucket is then a
whole number of blocks (its edges snap to multiples of 64 steps) and min/max stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnClause,
    ColumnElement,
    Float,
    Integer,
    and_,
    case,
    cast,
    func,
    literal,
    literal_column,
    select,
)
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Metric
from kdlab.backend.schemas.metrics import SeriesOut, XAxis
from kdlab.backend.services import rollups

_m = Metric.__table__.c
# (hi - lo) * n must stay inside a signed 64-bit integer for the exact integer bucket
_INT_LIMIT = 2**62


@dataclass(frozen=True)
class Window:
    """Which part of a series to show and how finely; any bound may be None (open)."""

    max_points: int
    x: XAxis = "step"
    min_step: int | None = None
    max_step: int | None = None
    min_time: float | None = None
    max_time: float | None = None


def _conditions(run_id: str, key: str, window: Window) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [_m.run_id == run_id, _m.key == key]
    if window.min_step is not None:
        conditions.append(_m.step >= window.min_step)
    if window.max_step is not None:
        conditions.append(_m.step <= window.max_step)
    if window.min_time is not None:
        conditions.append(_m.wall_time >= window.min_time)
    if window.max_time is not None:
        conditions.append(_m.wall_time <= window.max_time)
    return conditions


def _floor_to_int(session: Session, expression: ColumnElement[float]) -> ColumnElement[int]:
    """floor() of a non-negative double as an integer. SQLite's CAST truncates (= floor here) and
    has no floor() in every build; PostgreSQL's CAST rounds, so it needs floor() first."""
    if session.get_bind().dialect.name == "sqlite":
        return cast(expression, Integer)
    return cast(func.floor(expression), BigInteger)


def _bucket(session: Session, window: Window, lo: float, hi: float) -> ColumnElement[int]:
    n = window.max_points
    if window.x == "step":
        span = int(hi) - int(lo) + 1
        if (span - 1) * n < _INT_LIMIT:
            # integer floor division on both dialects (all operands are non-negative)
            return (
                (_m.step - literal(int(lo), BigInteger))
                * literal(n, BigInteger)
                // literal(span, BigInteger)
            )
        # a span too wide for exact integers (beyond ~4.6e14 steps): doubles are close enough
        offset = _m.step - literal(int(lo), BigInteger)
        raw = _floor_to_int(session, offset * literal(n / span, Float))
    else:
        scale = n / (hi - lo) if hi > lo else 0.0
        raw = _floor_to_int(session, (_m.wall_time - literal(lo, Float)) * literal(scale, Float))
    return case((raw >= n, n - 1), else_=raw)


def _empty(run_id: str, key: str) -> SeriesOut:
    return SeriesOut(run_id=run_id, key=key, step=[], time=[], value=[], min=[], max=[])


def _raw(session: Session, run_id: str, key: str, window: Window) -> SeriesOut:
    order = (_m.step,) if window.x == "step" else (_m.wall_time, _m.step)
    rows = session.execute(
        select(_m.step, _m.wall_time, _m.value)
        .where(and_(*_conditions(run_id, key, window)))
        .order_by(*order)
    ).all()
    if not rows:
        return _empty(run_id, key)
    steps, times, values = (list(column) for column in zip(*rows, strict=True))
    return SeriesOut(
        run_id=run_id,
        key=key,
        step=steps,
        time=times,
        value=values,
        min=values,
        max=values,
        points=len(values),
    )


def downsample(session: Session, run_id: str, key: str, window: Window) -> SeriesOut:
    """At most `window.max_points` buckets of one series (see the module docstring)."""
    n = window.max_points
    conditions = _conditions(run_id, key, window)
    x = _m.step if window.x == "step" else _m.wall_time
    if window.x == "step":
        # two scalar subqueries, each a single index seek (SQLite's min/max optimisation only
        # applies to a lone min() or max())
        bounds = select(
            select(func.min(x)).where(*conditions).scalar_subquery(),
            select(func.max(x)).where(*conditions).scalar_subquery(),
        )
    else:
        bounds = select(func.min(x), func.max(x)).where(*conditions)  # one scan, no index
    lo, hi = session.execute(bounds).one()
    if lo is None:
        return _empty(run_id, key)
    if window.x == "step" and hi - lo + 1 <= n:
        return _raw(session, run_id, key, window)  # at most one point per step: nothing to merge

    rows = None
    if window.x == "step":
        rows = rollups.downsample_blocks(session, run_id, key, int(lo), int(hi), n)
    if rows is None:
        rows = _grouped(session, window, conditions, lo, hi)
    total = sum(row[1] for row in rows)
    if total <= n and total != len(rows):
        return _raw(session, run_id, key, window)  # few points, but some shared a bucket
    _, _, mins, maxs, means, steps, times = (list(column) for column in zip(*rows, strict=True))
    return SeriesOut(
        run_id=run_id,
        key=key,
        step=[int(s) for s in steps],
        time=[float(t) for t in times],
        value=[float(v) for v in means],
        min=[float(v) for v in mins],
        max=[float(v) for v in maxs],
        points=int(total),
    )


def _grouped(
    session: Session,
    window: Window,
    conditions: list[ColumnElement[bool]],
    lo: float,
    hi: float,
) -> list[Any]:
    """One GROUP BY over the raw points: (bucket, count, min, max, mean, last step, last time)."""
    bucket = _bucket(session, window, lo, hi).label("bucket")
    by_bucket: ColumnClause[Any] = literal_column(
        "bucket"
    )  # the output column: one expression, one set of binds
    rows = session.execute(
        select(
            bucket,
            func.count(),
            func.min(_m.value),
            func.max(_m.value),
            func.avg(_m.value),
            func.max(_m.step),
            func.max(_m.wall_time),
        )
        .where(*conditions)
        .group_by(by_bucket)
        .order_by(by_bucket)
    ).all()
    return list(rows)
