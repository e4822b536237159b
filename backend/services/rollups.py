"""Metric roll-ups: exact aggregates per aligned block of steps, at several block sizes.

Level `w` (one of LEVELS) holds, for each series (run, key) and each block `b` of the steps
[b·w, (b+1)·w) that holds at least one point: count, sum, min and max of the values, the first
and last step, the times of the first and last step, and the smallest and largest wall time.
Each level's blocks are whole unions of RATIO blocks of the next finer level.

The ingest refreshes, in its own transaction, the blocks a batch touched: the finest level from
the stored points, then each coarser level from the finer level's rows of the touched range
(both exact under a replaced point: nothing is updated incrementally). `downsample` answers
buckets from whole blocks, descending to finer levels and finally to raw points only for the
blocks that straddle a bucket edge or the zoom window.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table, text
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


def _block_ranges(
    rows: list[tuple[str, int, float, float]], width: int = FINEST
) -> dict[str, tuple[int, int]]:
    """Per key, the first and last block of `width` steps a batch of (key, step, value, time)
    rows touched."""
    ranges: dict[str, tuple[int, int]] = {}
    for key, step, _value, _time in rows:
        block = step // width
        low, high = ranges.get(key, (block, block))
        ranges[key] = (min(low, block), max(high, block))
    return ranges


def from_points_sql(width: int, where: str) -> str:
    """INSERT ... SELECT of level `width` from the points matching `where` (on table alias m),
    ON CONFLICT DO UPDATE. The first/last times come from the points at the first/last step
    (two primary-key lookups per block). `WHERE true`: SQLite's parser needs a WHERE on
    INSERT ... SELECT ... ON CONFLICT."""
    return (
        f"INSERT INTO metric_rollups ({_COLUMNS}) "
        f"SELECT g.run_id, g.key, {width}, g.block, g.n, g.total, g.lo, g.hi, g.fs, g.ls, "
        "f.wall_time, l.wall_time, g.t0, g.t1 FROM ("
        f"SELECT m.run_id AS run_id, m.key AS key, m.step / {width} AS block, count(*) AS n, "
        "sum(m.value) AS total, min(m.value) AS lo, max(m.value) AS hi, min(m.step) AS fs, "
        "max(m.step) AS ls, min(m.wall_time) AS t0, max(m.wall_time) AS t1 "
        f"FROM metrics m WHERE {where} GROUP BY 1, 2, 3) AS g "
        "JOIN metrics f ON f.run_id = g.run_id AND f.key = g.key AND f.step = g.fs "
        "JOIN metrics l ON l.run_id = g.run_id AND l.key = g.key AND l.step = g.ls "
        f"WHERE true ON CONFLICT (run_id, key, level, block) DO UPDATE SET {_UPDATE}"
    )


def from_finer_sql(width: int, where: str) -> str:
    """INSERT ... SELECT of level `width` from the rows of the level RATIO times finer that
    match `where` (on alias r, which the caller restricts to that level), ON CONFLICT DO
    UPDATE."""
    finer = width // RATIO
    return (
        f"INSERT INTO metric_rollups ({_COLUMNS}) "
        f"SELECT g.run_id, g.key, {width}, g.block, g.n, g.total, g.lo, g.hi, g.fs, g.ls, "
        "f.first_time, l.last_time, g.t0, g.t1 FROM ("
        f"SELECT r.run_id AS run_id, r.key AS key, r.block / {RATIO} AS block, "
        "sum(r.count) AS n, sum(r.total) AS total, min(r.min_value) AS lo, "
        "max(r.max_value) AS hi, min(r.first_step) AS fs, max(r.last_step) AS ls, "
        "min(r.min_time) AS t0, max(r.max_time) AS t1 "
        f"FROM metric_rollups r WHERE r.level = {finer} AND {where} GROUP BY 1, 2, 3) AS g "
        f"JOIN metric_rollups f ON f.run_id = g.run_id AND f.key = g.key AND f.level = {finer} "
        f"AND f.block = g.fs / {finer} "
        f"JOIN metric_rollups l ON l.run_id = g.run_id AND l.key = g.key AND l.level = {finer} "
        f"AND l.block = g.ls / {finer} "
        f"WHERE true ON CONFLICT (run_id, key, level, block) DO UPDATE SET {_UPDATE}"
    )


_POINTS = text(
    from_points_sql(
        FINEST, "m.run_id = :run_id AND m.key = :key AND m.step >= :low AND m.step <= :high"
    )
)
_FINER = {
    width: text(
        from_finer_sql(
            width, "r.run_id = :run_id AND r.key = :key AND r.block >= :low AND r.block <= :high"
        )
    )
    for width in LEVELS[1:]
}


def refresh(session: Session, run_id: str, rows: list[tuple[str, int, float, float]]) -> None:
    """Recompute, in the ingest's transaction, every block of every level the batch `rows`
    touched: per key one statement per level, each reading one index range (run, key, ...)."""
    for key, (low, high) in _block_ranges(rows).items():
        session.execute(
            _POINTS,
            {
                "run_id": run_id,
                "key": key,
                "low": low * FINEST,
                "high": min((high + 1) * FINEST - 1, MAX_STEP),
            },
        )
        for width in LEVELS[1:]:
            # the finer level's blocks [low, high] make up this level's [low // R, high // R]
            session.execute(
                _FINER[width],
                {
                    "run_id": run_id,
                    "key": key,
                    "low": (low // RATIO) * RATIO,
                    "high": (high // RATIO) * RATIO + RATIO - 1,
                },
            )
            low, high = low // RATIO, high // RATIO
