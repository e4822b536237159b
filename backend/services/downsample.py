"""Downsampling metric series in SQL, every series of a request in a few statements.

Each series (run × key) of the (zoomed) window is split into at most `n = max_points` buckets;
per bucket: `min` and `max` of its values (exact, so a one-step spike always shows), `value` =
their mean, `step` = the largest step and `time` = the latest wall time in it. Empty buckets are
left out. A series with at most `n` points (or whose buckets would each hold one point) comes
back unchanged (min = max = value).

The bucket edges (the documented rule the tests recompute):

- x = step, lo/hi = the first/last step of the series inside the window (at most `n` steps:
  the points come back as they are):
  - W = the smallest power of two with at most `n` buckets `s // W - lo // W` in [lo, hi]
    (`step_width`; so between n/2 and n buckets); when W ≥ 16 (the finest roll-up level,
    `rollups.LEVELS` = 16, 32, …, 4,096 steps) step `s` falls in bucket `s // W - lo // W`:
    each bucket is one aligned block of W steps, read as one roll-up row where W ≤ 4,096, and
    the window's edges cut the first and last;
  - otherwise (W < 16) equal step ranges of the raw points: bucket `(s - lo) * n // (hi - lo + 1)`.
- x = time, lo = the larger of `min_time` and the series' earliest time, hi = the smaller of
  `max_time` and its latest, Δ = (hi - lo) / n; a time t falls in slice
  `min(floor((t - lo) * (n / (hi - lo))), n - 1)` in doubles (0 when hi = lo). Buckets are
  made of whole roll-up blocks where the blocks allow it: from the start level (`start_level`:
  the coarsest level no wider than the steps a bucket holds, estimated from the series'
  coarsest blocks and the window's share of its time range) down, a block wholly inside the
  window whose wall times span at most Δ goes whole to the slice of its latest time; a block
  wholly outside is dropped; any other is split into its two halves on the next finer level,
  and on the finest (16 steps) its points inside the window go one by one to the slice of
  their own time. So every point inside the window is in exactly one bucket, min/max are the
  exact extremes of the points a bucket holds, and a bucket's time (its latest) lies in its
  own slice; a bucket may hold points up to Δ before its slice, never more. Where time is not
  smooth in the step (a pause, a resumed run whose time jumps back), the blocks across the
  jump span more than Δ and are split down to their points.

How it is answered (`downsample_many`, statements in `rollup_reads`): one statement for the
bounds of every series; then, per roll-up level from the coarsest down, one statement over all
series: each block wholly inside the window that the rule takes whole goes to its bucket, and
only the others (a window's edge, for x = time a block spanning more than Δ) are looked at again
on the next finer level; last, one statement for the raw points of the finest such blocks (or
of the whole window when no level has `n` blocks in it, for x = step). Nothing but bucket rows
leaves the database. A window that filters on the other axis (a step range with x = time, or a
time range with x = step) is answered per series from the raw points (`downsample`): equal
ranges between the extremes of x inside the window.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from operator import truediv
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
from kdlab.backend.services.rollup_reads import Plan, Reads
from kdlab.backend.services.rollups import COARSEST, FINEST, LEVELS, MAX_STEP

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
    return _listed(run_id, key, [tuple(row) for row in rows])


def _listed(run_id: str, key: str, rows: list[tuple[Any, ...]]) -> SeriesOut:
    """A series of its raw (step, time, value) points."""
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


def _bucketed(run_id: str, key: str, columns: Sequence[Sequence[Any]]) -> SeriesOut:
    """A series of (count, mean, min, max, last step, last time) columns, one entry a bucket."""
    counts, means, mins, maxs, steps, times = columns
    # the values are the driver's ints and floats already: no validation pass over them
    return SeriesOut.model_construct(
        run_id=run_id,
        key=key,
        step=list(steps),
        time=list(times),
        value=list(means),
        min=list(mins),
        max=list(maxs),
        points=int(sum(counts)),
    )


def downsample(session: Session, run_id: str, key: str, window: Window) -> SeriesOut:
    """At most `window.max_points` buckets of one series, from its raw points: equal ranges of
    [lo, hi] (the series' extremes of x inside the window). For windows `downsample_many`
    does not answer from the roll-ups."""
    n = window.max_points
    conditions = _conditions(run_id, key, window)
    x = _m.step if window.x == "step" else _m.wall_time
    lo, hi = session.execute(select(func.min(x), func.max(x)).where(*conditions)).one()
    if lo is None:
        return _empty(run_id, key)
    if window.x == "step" and hi - lo + 1 <= n:
        return _raw(session, run_id, key, window)  # at most one point per step: nothing to merge
    rows = _grouped(session, window, conditions, lo, hi)
    total = sum(row[1] for row in rows)
    if total <= n and total != len(rows):
        return _raw(session, run_id, key, window)  # few points, but some shared a bucket
    _, counts, mins, maxs, means, steps, times = zip(*rows, strict=True)
    return _bucketed(run_id, key, (counts, means, mins, maxs, steps, times))


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


def step_width(n: int, lo: int, hi: int) -> int:
    """The smallest power of two W with at most `n` buckets `s // W - lo // W` in [lo, hi]."""
    width = 1
    while hi // width - lo // width + 1 > n:
        width *= 2
    return width


def _step_plan(one: Plan, n: int, lo: int, hi: int) -> None:
    if hi - lo + 1 <= n:
        one.listed = True  # at most one point per step: nothing to merge
        return
    width = step_width(n, lo, hi)
    if width < FINEST:
        # finer than any roll-up: equal step ranges of the raw points
        one.unit, one.base, one.mul, one.div = 1, lo, n, hi - lo + 1
        one.steps = [(lo, hi)]
        return
    one.width, one.base = width, lo // width
    # raw points at the window's edges: bucket s // W - lo // W (W = 2**63 only for n = 1)
    one.unit, one.mul, one.div = min(width, 2**62), (1 if width <= 2**62 else 0), 1
    one.level = min(width, COARSEST)
    one.blocks = [(lo // one.level, hi // one.level)]


def start_level(n: int, first: float, last: float, tlo: float, thi: float, b0: int, b1: int) -> int:
    """x = time: the coarsest level a block may be taken whole on, the coarsest no wider than
    the steps a bucket holds, estimated from the series' coarsest blocks b0..b1, its time range
    [first, last] and the window's [tlo, thi] (at least the finest level)."""
    fraction = (thi - tlo) / (last - first) if last > first else 0.0
    per_bucket = (b1 - b0 + 1) * COARSEST * fraction / n
    return max([FINEST, *(w for w in LEVELS if w <= per_bucket)])


def _time_plan(
    one: Plan, n: int, first: float, last: float, tlo: float, thi: float, b0: int, b1: int
) -> None:
    one.tlo, one.scale = tlo, (n / (thi - tlo) if thi > tlo else 0.0)
    one.delta = (thi - tlo) / n
    one.level = start_level(n, first, last, tlo, thi, b0, b1)
    per = COARSEST // one.level  # blocks of the start level in a coarsest block
    one.blocks = [(b0 * per, b1 * per + per - 1)]


def downsample_many(
    session: Session, pairs: Sequence[tuple[str, str]], window: Window
) -> list[SeriesOut]:
    """`downsample` of every (run, key) in `pairs`, in order, in a constant number of
    statements (see the module docstring)."""
    if not pairs:
        return []
    cross = (window.x == "step" and (window.min_time, window.max_time) != (None, None)) or (
        window.x == "time" and (window.min_step, window.max_step) != (None, None)
    )
    if cross:
        return [downsample(session, run_id, key, window) for run_id, key in pairs]
    n = window.max_points
    reads = Reads(session, window)
    plans = [Plan(run_id, key) for run_id, key in pairs]
    keys = json.dumps([[i, run_id, key] for i, (run_id, key) in enumerate(pairs)])
    rows_of = reads.sql.rows((("sidx", "int"), ("run_id", "text"), ("key", "text")))
    present = set()
    if window.x == "step":
        low = window.min_step if window.min_step is not None else 0
        high = window.max_step if window.max_step is not None else MAX_STEP
        # two correlated min/max per series: each one index seek
        within = "m.run_id = q.run_id AND m.key = q.key AND m.step >= :a AND m.step <= :b"
        bounds = reads.sql.execute(
            session,
            (
                f"WITH {rows_of} SELECT q.sidx, (SELECT min(m.step) FROM metrics m WHERE {within}), "
                f"(SELECT max(m.step) FROM metrics m WHERE {within}) FROM q"
            ),
            {"rows": keys, "a": low, "b": high},
        )
        for sidx, lo, hi in bounds:
            if lo is not None:
                present.add(sidx)
                _step_plan(plans[sidx], n, int(lo), int(hi))
    else:
        # the time range of each series from its coarsest blocks, in one GROUP BY
        bounds = reads.sql.execute(
            session,
            (
                f"WITH {rows_of} SELECT q.sidx, min(r.min_time), max(r.max_time), "
                "sum(r.count), min(r.block), max(r.block) FROM q JOIN metric_rollups r "
                f"ON r.run_id = q.run_id AND r.key = q.key AND r.level = {COARSEST} "
                "GROUP BY q.sidx"
            ),
            {"rows": keys},
        )
        for sidx, first, last, count, b0, b1 in bounds:
            tlo = first if window.min_time is None else max(first, window.min_time)
            thi = last if window.max_time is None else min(last, window.max_time)
            if tlo > thi:
                continue
            present.add(sidx)
            if count <= n:
                plans[sidx].listed = True
            else:
                _time_plan(plans[sidx], n, first, last, float(tlo), float(thi), int(b0), int(b1))
    active = [plans[i] for i in sorted(present) if not plans[i].listed]
    for width in reversed(LEVELS):
        reads.level(active, width)
    reads.raw(active)
    columns = {id(one): one.columns() for one in active}
    for one in active:
        # few points, but some shared a bucket: the points themselves
        buckets, counts = columns[id(one)][:2]
        total = sum(counts)
        if total <= n and total != len(buckets):
            one.listed = True
    listed = reads.listed(plans)
    result: list[SeriesOut] = []
    for index, one in enumerate(plans):
        if index not in present:
            result.append(_empty(one.run_id, one.key))
        elif one.listed:
            result.append(_listed(one.run_id, one.key, listed.get(index, [])))
        else:
            buckets, counts, totals, mins, maxs, steps, times = columns[id(one)]
            if not buckets:
                result.append(_empty(one.run_id, one.key))
                continue
            means = list(map(truediv, totals, counts))
            result.append(_bucketed(one.run_id, one.key, (counts, means, mins, maxs, steps, times)))
    return result
