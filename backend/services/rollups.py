"""Metric roll-ups: exact aggregates per aligned block of steps, at several block sizes.

Level `w` (one of LEVELS) holds, for each series (run, key) and each block `b` of the steps
[b·w, (b+1)·w) that holds at least one point: count, sum, min and max of the values, the first
and last step, the times of the first and last step, and the smallest and largest wall time.
Each level's blocks are whole unions of RATIO blocks of the next finer level.

The ingest refreshes, in its own transaction, the blocks a batch touched (`refresh`), computed in
Python and written in one upsert: a finest block from the batch itself when the batch holds all
of its steps, else from its stored points; each coarser block from its two child blocks, the one
just recomputed and the other as stored (exact under a replaced point: nothing is updated
incrementally, every touched block is recomputed whole). `downsample` answers
buckets from whole blocks, descending to finer levels and finally to raw points only for the
blocks that straddle a bucket edge or the zoom window.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Connection, Table
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Metric, MetricRollup

RATIO = 2
LEVELS = (
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
)  # block widths in steps, finest first; each RATIO × the last
FINEST, COARSEST = LEVELS[0], LEVELS[-1]
MAX_STEP = 2**63 - 1  # steps are signed 64-bit integers

METRICS = cast(Table, Metric.__table__)
ROLLUPS = cast(Table, MetricRollup.__table__)

AGGREGATES = (
    "count",
    "total",
    "min_value",
    "max_value",
    "first_step",
    "last_step",
    "first_time",
    "last_time",
    "min_time",
    "max_time",
)
_COLUMNS = ", ".join(("run_id", "key", "level", "block", *AGGREGATES))
_UPDATE = ", ".join(f"{name} = excluded.{name}" for name in AGGREGATES)


Agg = tuple[int, float, float, float, int, int, float, float, float, float]  # AGGREGATES


Point = tuple[str, int, float, float]  # key, step, value, wall_time (the ingest's rows)


def _of_points(points: Sequence[Point]) -> Agg:
    """The aggregate of one block's points, sorted by step."""
    _keys, steps, values, times = zip(*points, strict=True)
    return (
        len(steps),
        sum(values),
        min(values),
        max(values),
        steps[0],
        steps[-1],
        times[0],
        times[-1],
        min(times),
        max(times),
    )


def _of_children(first: Agg, second: Agg | None) -> Agg:
    """The aggregate of a block from its one or two child blocks (in block order)."""
    if second is None:
        return first
    return (
        first[0] + second[0],
        first[1] + second[1],
        min(first[2], second[2]),
        max(first[3], second[3]),
        first[4],
        second[5],
        first[6],
        second[7],
        min(first[8], second[8]),
        max(first[9], second[9]),
    )


def _placeholder(connection: Connection) -> str:
    return "?" if connection.dialect.paramstyle in ("qmark", "numeric") else "%s"


SPAN_GAP = 4  # FINEST blocks between two spans read at once rather than apart
SPANS_PER_READ = 100  # index ranges per statement (SQLite: at most 500 compound SELECTs)


def points_read_sql(q: str, spans: int) -> str:
    """The points of one series inside `spans` step ranges: parameters (run_id, key, low, high)
    per range, `q` the driver's placeholder."""
    one = (
        f"SELECT key, step, value, wall_time FROM metrics WHERE run_id = {q} AND key = {q} "
        f"AND step >= {q} AND step <= {q}"
    )
    return " UNION ALL ".join([one] * spans)


def blocks_read_sql(q: str, counts: Sequence[int]) -> str:
    """The roll-up rows of one series at several levels, `counts[i]` blocks of the i-th:
    parameters (run_id, key, level, block...) per level, `q` the driver's placeholder."""
    return " UNION ALL ".join(
        f"SELECT level, block, {', '.join(AGGREGATES)} FROM metric_rollups "
        f"WHERE run_id = {q} AND key = {q} AND level = {q} AND block IN ({', '.join([q] * n)})"
        for n in counts
    )


def _stored_points(
    connection: Connection, run_id: str, key: str, blocks: list[int]
) -> dict[int, list[Point]]:
    """The stored points of the FINEST blocks `blocks` (sorted), per block: one index range
    (run, key, step) per run of nearby blocks, up to SPANS_PER_READ ranges a statement."""
    spans: list[tuple[int, int]] = []
    for block in blocks:
        if spans and block <= spans[-1][1] + SPAN_GAP + 1:
            spans[-1] = (spans[-1][0], block)
        else:
            spans.append((block, block))
    q = _placeholder(connection)
    wanted = set(blocks)
    found: dict[int, list[Point]] = {}
    for start in range(0, len(spans), SPANS_PER_READ):
        chunk = spans[start : start + SPANS_PER_READ]
        params: list[Any] = []
        for low, high in chunk:
            params += [run_id, key, low * FINEST, min((high + 1) * FINEST - 1, MAX_STEP)]
        sql = points_read_sql(q, len(chunk))
        for row in connection.exec_driver_sql(sql, tuple(params)):
            block = row[1] // FINEST
            if block in wanted:
                found.setdefault(block, []).append(tuple(row))
    for points in found.values():
        points.sort(key=lambda point: point[1])
    return found


def _stored_blocks(
    connection: Connection, run_id: str, key: str, wanted: dict[int, list[int]]
) -> dict[tuple[int, int], Agg]:
    """The stored rows {(level, block): aggregate} of the `wanted` blocks per level (rows
    this batch did not change), in one statement: per level one lookup of its blocks."""
    levels = [(level, blocks) for level, blocks in wanted.items() if blocks]
    if not levels:
        return {}
    params: list[Any] = []
    for level, blocks in levels:
        params += [run_id, key, level, *blocks]
    sql = blocks_read_sql(_placeholder(connection), [len(blocks) for _, blocks in levels])
    return {
        (row[0], row[1]): cast(Agg, tuple(row[2:]))
        for row in connection.exec_driver_sql(sql, tuple(params))
    }


def _upsert_sql(connection: Connection) -> str:
    q = _placeholder(connection)
    marks = ", ".join([q] * (4 + len(AGGREGATES)))
    return (
        f"INSERT INTO metric_rollups ({_COLUMNS}) VALUES ({marks}) "
        f"ON CONFLICT (run_id, key, level, block) DO UPDATE SET {_UPDATE}"
    )


def _key_blocks(
    connection: Connection, run_id: str, key: str, points: Sequence[Point]
) -> list[tuple[Any, ...]]:
    """Every block of every level that one key's points (sorted by step, one per step, already
    stored) touched, recomputed: a FINEST block from the batch alone when the batch holds all of
    its steps, else from its stored points; a coarser block from its two child blocks (the one
    just recomputed, the other as stored)."""
    steps = [point[1] for point in points]
    by_block: dict[int, Sequence[Point]] = {}
    start = 0
    while start < len(steps):  # each block's points: one slice, found by bisection
        block = steps[start] // FINEST
        end = bisect_left(steps, (block + 1) * FINEST, start)
        by_block[block] = points[start:end]
        start = end
    partial = [block for block, inside in by_block.items() if len(inside) < FINEST]
    current: dict[int, Agg] = {
        block: _of_points(inside) for block, inside in by_block.items() if len(inside) == FINEST
    }
    if partial:
        for block, inside in _stored_points(connection, run_id, key, sorted(partial)).items():
            current[block] = _of_points(inside)
    # which blocks each level recomputes, and which of their children this batch left as stored
    touched: list[set[int]] = [set(current)]
    wanted: dict[int, list[int]] = {}
    for width in LEVELS[1:]:
        done = touched[-1]
        parents = {block // RATIO for block in done}
        siblings = sorted(
            child
            for parent in parents
            for child in (parent * RATIO, parent * RATIO + 1)
            if child not in done
        )
        wanted[width // RATIO] = siblings
        touched.append(parents)
    stored = _stored_blocks(connection, run_id, key, wanted)
    out: list[tuple[Any, ...]] = [
        (run_id, key, FINEST, block, *agg) for block, agg in current.items()
    ]
    for width, parents in zip(LEVELS[1:], touched[1:], strict=True):
        finer = width // RATIO
        level: dict[int, Agg] = {}
        for parent in parents:
            left, right = parent * RATIO, parent * RATIO + 1
            first = current.get(left) or stored.get((finer, left))
            second = current.get(right) or stored.get((finer, right))
            if first is None:
                first, second = cast(Agg, second), None
            level[parent] = _of_children(first, second)
            out.append((run_id, key, width, parent, *level[parent]))
        current = level
    return out


def refresh(session: Session, run_id: str, rows: list[tuple[str, int, float, float]]) -> None:
    """Recompute, in the ingest's transaction, every block of every level the batch `rows`
    (key, step, value, time; one per (key, step), sorted, already stored) touched, and write
    them in one statement. Per key: at most one read of stored points (the FINEST blocks the
    batch holds only part of) and one read of the untouched sibling blocks; each level from the
    finer level's blocks, so each is exact under a replaced point."""
    connection = session.connection()
    out: list[tuple[Any, ...]] = []
    start = 0
    while start < len(rows):  # rows are sorted by key: one slice per key
        key = rows[start][0]
        end = start + 1 if rows[-1][0] != key else len(rows)
        while end < len(rows) and rows[end][0] == key:
            end += 1
        out += _key_blocks(connection, run_id, key, rows[start:end])
        start = end
    if out:
        out.sort(key=lambda row: (row[1], row[2], row[3]))  # one lock order (PostgreSQL)
        connection.exec_driver_sql(_upsert_sql(connection), out)
