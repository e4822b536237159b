"""The statements `downsample_many` answers many series with: one per roll-up level visited,
one for the raw points, one for short series listed whole (see `downsample`'s docstring for the
bucket rule they implement).

Every statement binds its series as one JSON array (`Dialect.rows`) and returns plain tuples
`(series index, bucket, count, sum, min, max, last step, last time)`, one per whole block, group
or point; a block that cannot be taken whole comes back as bucket `-1 - block` and is looked at
again on the next finer level. Rows are kept per series as they came and merged into buckets
once, at the end (`Plan.columns`): with one row per bucket, the usual case, that is a sort and
a transpose, not a loop over rows in Python.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from kdlab.backend.services.rollups import COARSEST, FINEST, MAX_STEP, RATIO

if TYPE_CHECKING:
    from kdlab.backend.services.downsample import Window

Bucket = tuple[Any, ...]  # (series index, bucket, count, sum, min, max, last step, last time)
_BUCKET = itemgetter(1)


@dataclass
class Plan:
    """One series' bucket rule (see the `downsample` docstring) and what is left to read.

    x = step: a block of level w goes to bucket `block // per - base` (per = W / w), a raw point
    to `((s // unit) - base) * mul // div`, with (unit, base, mul, div) = (W, lo // W, 1, 1) on
    roll-ups or (1, lo, n, hi - lo + 1) on raw points.
    x = time: bucket(t) = min(floor((t - tlo) * scale), n - 1); a block whose wall times span at
    most `delta` (one bucket's width) goes to the bucket of its latest time.
    """

    run_id: str
    key: str
    unit: int = 1
    base: int = 0
    mul: int = 1
    div: int = 1
    tlo: float = 0.0
    scale: float = 0.0
    delta: float = 0.0
    listed: bool = False  # few points: all of them, unbucketed
    level: int = COARSEST  # the roll-up level `blocks` are ranges of
    width: int = 1  # x = step on roll-ups: the bucket width W (a power of two ≥ FINEST)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # block ranges at this level
    steps: list[tuple[int, int]] = field(default_factory=list)  # raw step ranges
    rows: list[Bucket] = field(default_factory=list)  # bucket rows read so far
    parts: int = 0  # statements that added rows (more than one: they may share buckets)

    def add(self, rows: list[Bucket]) -> None:
        if rows:
            self.rows.extend(rows)
            self.parts += 1

    def columns(self) -> tuple[Sequence[Any], ...]:
        """(bucket, count, sum, min, max, last step, last time) as columns, one entry per
        bucket in bucket order; empty tuples when no row was read."""
        rows = self.rows
        if not rows:
            return ((),) * 7
        if self.parts > 1:
            rows.sort()
        columns = tuple(zip(*rows, strict=True))[1:]
        if len(set(columns[0])) != len(rows):  # several blocks or groups in one bucket
            columns = tuple(zip(*_merged(rows), strict=True))
        return columns


def _merged(rows: list[Bucket]) -> list[Bucket]:
    """Rows sorted by bucket, those of one bucket merged (their counts and sums added, the
    extremes kept), without the series index."""
    out: list[Bucket] = []
    for bucket, group in groupby(rows, key=_BUCKET):
        members = list(group)
        if len(members) == 1:
            out.append(members[0][1:])
            continue
        out.append(
            (
                bucket,
                sum(row[2] for row in members),
                sum(row[3] for row in members),
                min(row[4] for row in members),
                max(row[5] for row in members),
                max(row[6] for row in members),
                max(row[7] for row in members),
            )
        )
    return out


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, adjacent or overlapping ranges merged."""
    merged: list[list[int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return [(low, high) for low, high in merged]


class Dialect:
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
        """floor() of a non-negative double as an integer. SQLite's CAST truncates (= floor
        here); PostgreSQL's CAST rounds, so it needs floor() first."""
        if self.sqlite:
            return f"CAST({expression} AS INTEGER)"
        return f"CAST(floor({expression}) AS BIGINT)"


_KEYS = (("sidx", "int"), ("run_id", "text"), ("key", "text"), ("lo", "bigint"), ("hi", "bigint"))
_STEP_RULE = (("unit", "bigint"), ("base", "bigint"), ("mul", "bigint"), ("div", "bigint"))
_TIME_RULE = (("tlo", "float8"), ("scale", "float8"), ("n", "bigint"), ("delta", "float8"))
_PER = (("per", "bigint"),)  # x = step, a roll-up level: blocks per bucket


class Reads:
    """The statements of one `downsample_many` call."""

    def __init__(self, session: Session, window: Window) -> None:
        self.session = session
        self.window = window
        self.sql = Dialect(session)
        self.time = window.x == "time"
        self.rule = _TIME_RULE if self.time else _STEP_RULE
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

    def param_rows(self, plans: list[Plan], which: str, width: int = 0) -> str:
        rows: list[list[Any]] = []
        for index, one in enumerate(plans):
            if which == "blocks" and one.level != width:
                continue
            rule: list[Any] = (
                [one.tlo, one.scale, self.window.max_points, one.delta]
                if self.time
                else [one.unit, one.base, one.mul, one.div]
            )
            if which == "blocks" and not self.time:
                rule.append(max(1, one.width // width))
            for low, high in one.blocks if which == "blocks" else one.steps:
                rows.append([index, one.run_id, one.key, low, high, *rule])
        return json.dumps(rows)

    def execute(self, statement: str, rows: str) -> list[Any]:
        return self.sql.execute(self.session, statement, {**self.binds, "rows": rows})

    def level(self, plans: list[Plan], width: int) -> None:
        """The whole blocks of level `width` into their series' rows; the others become the
        next finer level's block ranges (or, on the finest, raw step ranges)."""
        if not any(one.blocks and one.level == width for one in plans):
            return
        rows = self.execute(self.level_statement(width), self.param_rows(plans, "blocks", width))
        rows.sort()  # by series, then bucket: the blocks to look at again (< 0) first
        straddling: dict[int, list[int]] = {}
        for sidx, group in groupby(rows, key=itemgetter(0)):
            members = list(group)
            cut = bisect_left(members, 0, key=_BUCKET)
            straddling[sidx] = [-1 - row[1] for row in members[:cut]]
            plans[sidx].add(members[cut:])
        for index, one in enumerate(plans):
            if one.level != width:
                continue
            found = straddling.get(index, [])
            one.blocks, one.level = [], width // RATIO
            if width == FINEST:
                one.steps += coalesce(
                    [(b * width, min(b * width + width - 1, MAX_STEP)) for b in found]
                )
            else:
                one.blocks = coalesce([(b * RATIO, b * RATIO + RATIO - 1) for b in found])

    def level_statement(self, width: int) -> str:
        """x = step: a block (no wider than its series' bucket, so inside one) wholly inside
        the window goes to bucket `block // per - base`, row by row (mostly one block per
        bucket: no GROUP BY). x = time: a block wholly inside the window whose wall times span
        at most one bucket goes to the bucket of its latest time, summed per bucket in SQL.
        Any other block that is not wholly outside the window comes back as `-1 - block`."""
        inside = " AND ".join(self.inside) or "1 = 1"
        outside = "".join(f" AND NOT ({condition})" for condition in self.outside)
        source = (
            f"FROM q JOIN metric_rollups r "
            f"ON r.run_id = q.run_id AND r.key = q.key AND r.level = {width} "
            f"AND r.block >= q.lo AND r.block <= q.hi{outside}"
        )
        values = "r.count, r.total, r.min_value, r.max_value, r.last_step, r.max_time"
        if not self.time:
            columns = _KEYS + self.rule + _PER
            bucket = f"CASE WHEN {inside} THEN r.block / q.per - q.base ELSE -1 - r.block END"
            return f"WITH {self.sql.rows(columns)} SELECT q.sidx, {bucket}, {values} {source}"
        whole = f"{inside} AND r.max_time - r.min_time <= q.delta"
        group = f"CASE WHEN {whole} THEN {self.bucket('r.max_time')} ELSE -1 - r.block END"
        return (
            f"WITH {self.sql.rows(_KEYS + self.rule)} "
            "SELECT sidx, g, sum(n), sum(total), min(lo), max(hi), max(ls), max(t1) FROM ("
            f"SELECT q.sidx AS sidx, {group} AS g, r.count AS n, r.total AS total, "
            "r.min_value AS lo, r.max_value AS hi, r.last_step AS ls, r.max_time AS t1 "
            f"{source}) AS c GROUP BY sidx, g"
        )

    def raw(self, plans: list[Plan]) -> None:
        """The points of every series' raw step ranges into their buckets, grouped in SQL."""
        if not any(one.steps for one in plans):
            return
        inside = "".join(f" AND {condition}" for condition in self.points)
        statement = (
            f"WITH {self.sql.rows(_KEYS + self.rule)} "
            "SELECT sidx, b, count(*), sum(v), min(v), max(v), max(s), max(t) FROM ("
            f"SELECT q.sidx AS sidx, {self.bucket('m.wall_time' if self.time else 'm.step')} "
            "AS b, m.value AS v, m.step AS s, m.wall_time AS t "
            "FROM q JOIN metrics m "
            "ON m.run_id = q.run_id AND m.key = q.key AND m.step >= q.lo AND m.step <= q.hi"
            f"{inside}) AS p GROUP BY sidx, b"
        )
        rows = self.execute(statement, self.param_rows(plans, "steps"))
        rows.sort()
        for sidx, group in groupby(rows, key=itemgetter(0)):
            plans[sidx].add(list(group))
        for one in plans:
            one.steps = []

    def listed(self, plans: list[Plan]) -> dict[int, list[tuple[Any, ...]]]:
        """The raw (step, time, value) points of the series marked `listed`, in x order, by
        their index in `plans`."""
        low = self.window.min_step if self.window.min_step is not None else 0
        high = self.window.max_step if self.window.max_step is not None else MAX_STEP
        for one in plans:
            one.steps = [(low, high)] if one.listed else []
        if not any(one.listed for one in plans):
            return {}
        inside = "".join(f" AND {condition}" for condition in self.points)
        order = "m.wall_time, m.step" if self.time else "m.step"
        statement = (
            f"WITH {self.sql.rows(_KEYS + self.rule)} SELECT q.sidx, m.step, m.wall_time, "
            "m.value FROM q JOIN metrics m "
            "ON m.run_id = q.run_id AND m.key = q.key AND m.step >= q.lo AND m.step <= q.hi"
            f"{inside} ORDER BY q.sidx, {order}"
        )
        out: dict[int, list[tuple[Any, ...]]] = {}
        for sidx, step, time, value in self.execute(statement, self.param_rows(plans, "steps")):
            out.setdefault(sidx, []).append((step, time, value))
        for one in plans:
            one.steps = []
        return out
