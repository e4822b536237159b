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
  `max_time` and its latest: bucket `min(floor((t - lo) * (n / (hi - lo))), n - 1)` in doubles
  (0 when hi = lo), so the last point falls in the last bucket.

How it is answered (`downsample_many`): one statement for the bounds of every series; then, per
roll-up level from the coarsest down, one statement over all series: a block wholly inside the
window whose first and last x fall in the same bucket contributes whole (for x = time its
[min_time, max_time]; a block holds points in step order, so a resumed run whose wall time jumps
back only makes its blocks straddle more), and only the blocks that straddle a bucket edge or
the window's edge are looked at again on the next finer level; last, one statement for the raw
points of the finest straddling blocks (or of the whole window when no level has `n` blocks in
it, for x = step). Nothing but bucket rows leaves the database. A window that filters on the
other axis (a step range with x = time, or a time range with x = step) is answered per series
from the raw points (`downsample`): equal ranges between the extremes of x inside the window.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from kdlab.backend.services.rollups import COARSEST, FINEST, LEVELS, MAX_STEP, RATIO

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


def _bucketed(run_id: str, key: str, rows: list[Any]) -> SeriesOut:
    """A series of (bucket, count, min, max, mean, last step, last time) rows."""
    _, counts, mins, maxs, means, steps, times = (list(c) for c in zip(*rows, strict=True))
    # the values are the driver's ints and floats already: no validation pass over them
    return SeriesOut.model_construct(
        run_id=run_id,
        key=key,
        step=steps,
        time=[float(t) for t in times],
        value=means,
        min=[float(v) for v in mins],
        max=[float(v) for v in maxs],
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
    return _bucketed(run_id, key, rows)


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


# ---------------------------------------------------------------------------------------------
# many series at once, from the roll-ups


@dataclass
class _Series:
    """One series' plan: its bucket rule (see the module docstring) and what is left to read.

    x = step: bucket(s) = ((s // unit) - base) * mul // div, with (unit, base, mul, div) =
    (w, lo // w, 1, k) on blocks or (1, lo, n, hi - lo + 1) on raw points.
    x = time: bucket(t) = min(floor((t - tlo) * scale), n - 1).
    """

    run_id: str
    key: str
    unit: int = 1
    base: int = 0
    mul: int = 1
    div: int = 1
    tlo: float = 0.0
    scale: float = 0.0
    listed: bool = False  # few points: all of them, unbucketed
    level: int = COARSEST  # the roll-up level `blocks` are ranges of
    width: int = 1  # x = step on roll-ups: the bucket width W (a power of two ≥ FINEST)
    start: int = 0  # x = time: the level to go to straight from the coarsest (0: the next)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # block ranges at this level
    steps: list[tuple[int, int]] = field(default_factory=list)  # raw step ranges
    buckets: dict[int, list[Any]] = field(default_factory=dict)

    def params(self) -> list[Any]:
        return [self.run_id, self.key, self.unit, self.base, self.mul, self.div]

    def add(self, bucket: int, count: int, total: float, low: float, high: float,
            step: int, time: float) -> None:  # fmt: skip
        acc = self.buckets.get(bucket)
        if acc is None:
            self.buckets[bucket] = [count, total, low, high, step, time]
        else:
            acc[0] += count
            acc[1] += total
            acc[2] = min(acc[2], low)
            acc[3] = max(acc[3], high)
            acc[4] = max(acc[4], step)
            acc[5] = max(acc[5], time)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, adjacent or overlapping ranges merged."""
    merged: list[list[int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return [(low, high) for low, high in merged]


class _Sql:
    """The dialect's spelling of the few things the statements need."""

    def __init__(self, session: Session) -> None:
        self.sqlite = session.get_bind().dialect.name == "sqlite"

    def rows(self, names: Sequence[tuple[str, str]]) -> str:
        """A materialized CTE `q` of the JSON array of arrays bound to :rows, columns `names`
        ((name, PostgreSQL type)): each JSON element is parsed once, not once per row that
        refers to it."""
        if self.sqlite:
            columns = ", ".join(
                f"json_extract(value, '$[{i}]') AS {name}" for i, (name, _) in enumerate(names)
            )
            return f"q AS MATERIALIZED (SELECT {columns} FROM json_each(:rows))"
        columns = ", ".join(
            f"CAST(e ->> {i} AS {kind}) AS {name}" for i, (name, kind) in enumerate(names)
        )
        return f"q AS MATERIALIZED (SELECT {columns} FROM json_array_elements(CAST(:rows AS json)) AS e)"

    def execute(self, session: Session, statement: str, params: dict[str, Any]) -> list[Any]:
        """Plain tuples straight from the driver (`:name` parameters): the statements return
        up to a few hundred thousand rows, and SQLAlchemy's Row objects would cost more than
        the query."""
        if not self.sqlite:  # psycopg's named style
            statement = re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", statement.replace("%", "%%"))
        result = session.connection().exec_driver_sql(statement, params)
        try:
            return list(result.cursor.fetchall()) if result.cursor is not None else []
        finally:
            result.close()

    def floor(self, expression: str) -> str:
        """floor() of a non-negative double as an integer (as `_floor_to_int`)."""
        if self.sqlite:
            return f"CAST({expression} AS INTEGER)"
        return f"CAST(floor({expression}) AS BIGINT)"


_KEYS = (("sidx", "int"), ("run_id", "text"), ("key", "text"), ("lo", "bigint"), ("hi", "bigint"))
_STEP_RULE = (("unit", "bigint"), ("base", "bigint"), ("mul", "bigint"), ("div", "bigint"))
_TIME_RULE = (("tlo", "float8"), ("scale", "float8"), ("n", "bigint"))


class _Request:
    """The statements of one `downsample_many` call."""

    def __init__(self, session: Session, window: Window) -> None:
        self.session = session
        self.window = window
        self.sql = _Sql(session)
        self.time = window.x == "time"
        self.columns = _KEYS + (_TIME_RULE if self.time else _STEP_RULE)
        self.binds: dict[str, Any] = {}
        # the window's own filters on the roll-up rows (r) and points (m)
        self.inside: list[str] = []  # a block wholly inside the window
        self.outside: list[str] = []  # a block wholly outside it
        self.points: list[str] = []  # a point inside it
        w = window
        for name, value, inside, outside, point in (
            ("a", w.min_step, "r.first_step >= :a", "r.last_step < :a", "m.step >= :a"),
            ("b", w.max_step, "r.last_step <= :b", "r.first_step > :b", "m.step <= :b"),
            ("ta", w.min_time, "r.min_time >= :ta", "r.max_time < :ta", "m.wall_time >= :ta"),
            ("tb", w.max_time, "r.max_time <= :tb", "r.min_time > :tb", "m.wall_time <= :tb"),
        ):
            if value is not None:
                self.binds[name] = value
                self.inside.append(inside)
                self.outside.append(outside)
                self.points.append(point)

    def bucket(self, x: str) -> str:
        if self.time:
            raw = self.sql.floor(f"(({x}) - q.tlo) * q.scale")
            return f"CASE WHEN {raw} >= q.n THEN q.n - 1 ELSE {raw} END"
        return f"((({x}) / q.unit) - q.base) * q.mul / q.div"

    def param_rows(self, series: list[_Series], which: str, width: int = 0) -> str:
        rows: list[list[Any]] = []
        for index, one in enumerate(series):
            if which == "blocks" and one.level != width:
                continue
            rule: list[Any] = (
                [one.tlo, one.scale, self.window.max_points]
                if self.time
                else [one.unit, one.base, one.mul, one.div]
            )
            for low, high in one.blocks if which == "blocks" else one.steps:
                rows.append([index, one.run_id, one.key, low, high, *rule])
        return json.dumps(rows)

    def execute(self, statement: str, rows: str) -> list[Any]:
        return self.sql.execute(self.session, statement, {**self.binds, "rows": rows})

    def level(self, series: list[_Series], width: int) -> None:
        """Whole blocks of level `width` into their buckets; the straddling ones become the
        next finer level's block ranges (or, on the finest, raw step ranges)."""
        if not any(one.blocks and one.level == width for one in series):
            return
        straddling = self.time_level(series, width) if self.time else self.step_level(series, width)
        for index, one in enumerate(series):
            if one.level != width:
                continue
            found = straddling.get(index, [])
            finer = min(width // RATIO, one.start or width)
            one.blocks, one.level = [], finer
            if width == FINEST:
                one.steps += _coalesce(
                    [(b * width, min(b * width + width - 1, MAX_STEP)) for b in found]
                )
            else:
                per = width // finer  # children of a block on the next level visited
                one.blocks = _coalesce([(b * per, b * per + per - 1) for b in found])

    def step_level(self, series: list[_Series], width: int) -> dict[int, list[int]]:
        """x = step: every block of level `width` (≤ the series' bucket width, so it lies in
        one bucket) that is wholly inside the window goes to bucket
        `block // (W / width) - base`, row by row (mostly one block per bucket: no GROUP BY);
        those that cross the window's edge are returned."""
        inside = " AND ".join(self.inside) or "1 = 1"
        outside = "".join(f" AND NOT ({condition})" for condition in self.outside)
        statement = (
            f"WITH {self.sql.rows(self.columns)} "
            "SELECT q.sidx, r.block, r.count, r.total, r.min_value, r.max_value, r.last_step, "
            f"r.max_time, CASE WHEN {inside} THEN 1 ELSE 0 END FROM q JOIN metric_rollups r "
            f"ON r.run_id = q.run_id AND r.key = q.key AND r.level = {width} "
            f"AND r.block >= q.lo AND r.block <= q.hi{outside}"
        )
        straddling: dict[int, list[int]] = {}
        rows = self.execute(statement, self.param_rows(series, "blocks", width))
        for sidx, block, n, total, low, high, step, time, whole in rows:
            if not whole:
                straddling.setdefault(sidx, []).append(block)
                continue
            one = series[sidx]
            one.add(block // (one.width // width) - one.base, n, total, low, high, step, time)
        return straddling

    def time_level(self, series: list[_Series], width: int) -> dict[int, list[int]]:
        """x = time: blocks of level `width` wholly inside the window whose [min_time,
        max_time] lies in one bucket, summed per bucket in SQL; the others are returned."""
        inside = " AND ".join(self.inside) or "1 = 1"
        outside = "".join(f" AND NOT ({condition})" for condition in self.outside)
        b0, b1 = self.bucket("r.min_time"), self.bucket("r.max_time")
        # one pass: a whole block is grouped under its bucket (≥ 0), a straddling one alone
        # under -1 - block
        group = f"CASE WHEN {inside} AND {b0} = {b1} THEN {b0} ELSE -1 - r.block END"
        statement = (
            f"WITH {self.sql.rows(self.columns)} "
            "SELECT sidx, g, sum(n), sum(total), min(lo), max(hi), max(ls), max(t1) FROM ("
            f"SELECT q.sidx AS sidx, {group} AS g, r.count AS n, r.total AS total, "
            "r.min_value AS lo, r.max_value AS hi, r.last_step AS ls, r.max_time AS t1 "
            "FROM q JOIN metric_rollups r "
            f"ON r.run_id = q.run_id AND r.key = q.key AND r.level = {width} "
            f"AND r.block >= q.lo AND r.block <= q.hi{outside}) AS c GROUP BY sidx, g"
        )
        rows = self.execute(statement, self.param_rows(series, "blocks", width))
        straddling: dict[int, list[int]] = {}
        for sidx, g, n, total, low, high, step, time in rows:
            if g >= 0:
                series[sidx].add(g, n, total, low, high, step, time)
            else:
                straddling.setdefault(sidx, []).append(-1 - g)
        return straddling

    def raw(self, series: list[_Series]) -> None:
        """The points of every series' raw step ranges into their buckets."""
        if not any(one.steps for one in series):
            return
        inside = "".join(f" AND {condition}" for condition in self.points)
        statement = (
            f"WITH {self.sql.rows(self.columns)} "
            "SELECT sidx, b, count(*), sum(v), min(v), max(v), max(s), max(t) FROM ("
            f"SELECT q.sidx AS sidx, {self.bucket('m.wall_time' if self.time else 'm.step')} "
            "AS b, m.value AS v, m.step AS s, m.wall_time AS t "
            "FROM q JOIN metrics m "
            "ON m.run_id = q.run_id AND m.key = q.key AND m.step >= q.lo AND m.step <= q.hi"
            f"{inside}) AS p GROUP BY sidx, b"
        )
        for sidx, b, n, total, low, high, step, time in self.execute(
            statement, self.param_rows(series, "steps")
        ):
            series[sidx].add(int(b), int(n), total, low, high, int(step), time)
        for one in series:
            one.steps = []

    def listed(self, series: list[_Series]) -> dict[int, list[tuple[Any, ...]]]:
        """The raw (step, time, value) points of the series marked `listed`, in x order, by
        their index in `series`."""
        low = self.window.min_step if self.window.min_step is not None else 0
        high = self.window.max_step if self.window.max_step is not None else MAX_STEP
        for one in series:
            one.steps = [(low, high)] if one.listed else []
        if not any(one.listed for one in series):
            return {}
        inside = "".join(f" AND {condition}" for condition in self.points)
        order = "m.wall_time, m.step" if self.time else "m.step"
        statement = (
            f"WITH {self.sql.rows(self.columns)} SELECT q.sidx, m.step, m.wall_time, m.value "
            "FROM q JOIN metrics m "
            "ON m.run_id = q.run_id AND m.key = q.key AND m.step >= q.lo AND m.step <= q.hi"
            f"{inside} ORDER BY q.sidx, {order}"
        )
        out: dict[int, list[tuple[Any, ...]]] = {}
        for sidx, step, time, value in self.execute(statement, self.param_rows(series, "steps")):
            out.setdefault(sidx, []).append((step, time, value))
        for one in series:
            one.steps = []
        return out


def step_width(n: int, lo: int, hi: int) -> int:
    """The smallest power of two W with at most `n` buckets `s // W - lo // W` in [lo, hi]."""
    width = 1
    while hi // width - lo // width + 1 > n:
        width *= 2
    return width


def _step_plan(one: _Series, n: int, lo: int, hi: int) -> None:
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
    request = _Request(session, window)
    series = [_Series(run_id, key) for run_id, key in pairs]
    keys = json.dumps([[i, run_id, key] for i, (run_id, key) in enumerate(pairs)])
    rows_of = request.sql.rows((("sidx", "int"), ("run_id", "text"), ("key", "text")))
    if window.x == "step":
        low = window.min_step if window.min_step is not None else 0
        high = window.max_step if window.max_step is not None else MAX_STEP
        # two correlated min/max per series: each one index seek
        within = "m.run_id = q.run_id AND m.key = q.key AND m.step >= :a AND m.step <= :b"
        bounds = request.sql.execute(
            session,
            (
                f"WITH {rows_of} SELECT q.sidx, (SELECT min(m.step) FROM metrics m WHERE {within}), "
                f"(SELECT max(m.step) FROM metrics m WHERE {within}) FROM q"
            ),
            {"rows": keys, "a": low, "b": high},
        )
        present = set()
        for sidx, lo, hi in bounds:
            if lo is not None:
                present.add(sidx)
                _step_plan(series[sidx], n, int(lo), int(hi))
    else:
        # the time range of each series from its coarsest blocks, in one GROUP BY
        bounds = request.sql.execute(
            session,
            (
                f"WITH {rows_of} SELECT q.sidx, min(r.min_time), max(r.max_time), "
                "sum(r.count), min(r.block), max(r.block) FROM q JOIN metric_rollups r "
                f"ON r.run_id = q.run_id AND r.key = q.key AND r.level = {COARSEST} "
                "GROUP BY q.sidx"
            ),
            {"rows": keys},
        )
        present = set()
        for sidx, first, last, count, b0, b1 in bounds:
            one = series[sidx]
            tlo = first if window.min_time is None else max(first, window.min_time)
            thi = last if window.max_time is None else min(last, window.max_time)
            if tlo > thi:
                continue
            present.add(sidx)
            if count <= n:
                one.listed = True
                continue
            one.tlo, one.scale = float(tlo), (n / (thi - tlo) if thi > tlo else 0.0)
            one.blocks = [(int(b0), int(b1))]
            # blocks coarser than a bucket's (estimated) steps all straddle an edge: from the
            # coarsest (which prunes what lies outside the window) straight to the coarsest
            # level that fits a bucket
            fraction = (thi - tlo) / (last - first) if last > first else 0.0
            per_bucket = (int(b1) - int(b0) + 1) * COARSEST * fraction / n
            one.start = max([FINEST, *(w for w in LEVELS if w <= per_bucket)])
    active = [series[i] for i in sorted(present) if not series[i].listed]
    for width in reversed(LEVELS):
        request.level(active, width)
    request.raw(active)
    # few points, but some shared a bucket: the points themselves
    for one in active:
        total = sum(acc[0] for acc in one.buckets.values())
        if total <= n and total != len(one.buckets):
            one.listed = True
    listed = request.listed(series)
    result: list[SeriesOut] = []
    for index, one in enumerate(series):
        if index not in present:
            result.append(_empty(one.run_id, one.key))
        elif one.listed:
            result.append(_listed(one.run_id, one.key, listed.get(index, [])))
        elif not one.buckets:
            result.append(_empty(one.run_id, one.key))
        else:
            result.append(
                _bucketed(
                    one.run_id,
                    one.key,
                    [
                        (b, acc[0], acc[2], acc[3], acc[1] / acc[0], acc[4], acc[5])
                        for b, acc in sorted(one.buckets.items())
                    ],
                )
            )
    return result
