"""Metric roll-ups: count/sum/min/max/last per aligned block of ROLLUP_WIDTH steps.

The ingest refreshes the blocks a batch touched (recomputed from the stored points, so a
replaced point can never leave a stale min or max behind); `downsample` reads them when each
output bucket spans at least one block.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import BigInteger, Table, func, literal, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Metric, MetricRollup

ROLLUP_WIDTH = 64
MAX_STEP = 2**63 - 1  # steps are signed 64-bit integers

METRICS = cast(Table, Metric.__table__)
ROLLUPS = cast(Table, MetricRollup.__table__)
_m = METRICS.c
_r = ROLLUPS.c


def _block_ranges(rows: list[tuple[str, int, float, float]]) -> dict[str, tuple[int, int]]:
    """Per key, the first and last block a batch of (key, step, value, time) rows touched."""
    ranges: dict[str, tuple[int, int]] = {}
    for key, step, _value, _time in rows:
        block = step // ROLLUP_WIDTH
        low, high = ranges.get(key, (block, block))
        ranges[key] = (min(low, block), max(high, block))
    return ranges


def refresh(session: Session, run_id: str, rows: list[tuple[str, int, float, float]]) -> None:
    """Recompute, in the ingest's transaction, every block the batch `rows` touched: one
    statement per key, so each reads one index range (run, key, steps). One statement with an
    OR of the keys' ranges made SQLite scan all of the run's points on every batch."""
    dialect: Any = sqlite if session.get_bind().dialect.name == "sqlite" else postgresql
    for key, (low, high) in _block_ranges(rows).items():
        session.execute(_refresh_blocks(dialect, run_id, key, low, high))


def _refresh_blocks(dialect: Any, run_id: str, key: str, low: int, high: int) -> Any:
    """INSERT ... SELECT ... ON CONFLICT DO UPDATE of blocks [low, high] of one series."""
    block = (_m.step // literal(ROLLUP_WIDTH, BigInteger)).label("block")
    source = (
        select(
            _m.run_id,
            _m.key,
            block,
            func.count(),
            func.sum(_m.value),
            func.min(_m.value),
            func.max(_m.value),
            func.max(_m.step),
            func.max(_m.wall_time),
        )
        .where(
            _m.run_id == run_id,
            _m.key == key,
            _m.step >= low * ROLLUP_WIDTH,
            _m.step <= min((high + 1) * ROLLUP_WIDTH - 1, MAX_STEP),
        )
        .group_by(_m.run_id, _m.key, block)
    )
    columns = ["run_id", "key", "block", "count", "total", "min_value", "max_value"]
    columns += ["last_step", "last_time"]
    if dialect is sqlite:
        # SQLite's parser needs a WHERE on INSERT ... SELECT ... ON CONFLICT (an ambiguity)
        source = source.where(literal(True))
    insert = dialect.insert(ROLLUPS).from_select(columns, source)
    return insert.on_conflict_do_update(
        index_elements=[_r.run_id, _r.key, _r.block],
        set_={name: insert.excluded[name] for name in columns[3:]},
    )


def downsample_blocks(
    session: Session, run_id: str, key: str, lo: int, hi: int, max_points: int
) -> list[Any] | None:
    """Buckets of whole blocks covering steps [lo, hi], or None when blocks are too coarse.

    Bucket i holds blocks [b0 + i·k, b0 + (i+1)·k) with k = ceil(blocks / max_points); the range
    snaps outward to block edges (≤ ROLLUP_WIDTH − 1 steps each side). Rows: (bucket, count,
    min, max, mean, last step, last time).
    """
    first, last = lo // ROLLUP_WIDTH, hi // ROLLUP_WIDTH
    blocks = last - first + 1
    if blocks < max_points:
        return None  # finer than a block per bucket: the raw points are needed
    per_bucket = -(-blocks // max_points)
    bucket = ((_r.block - literal(first, BigInteger)) // literal(per_bucket, BigInteger)).label(
        "bucket"
    )
    return list(
        session.execute(
            select(
                bucket,
                func.sum(_r.count),
                func.min(_r.min_value),
                func.max(_r.max_value),
                func.sum(_r.total) / func.sum(_r.count),
                func.max(_r.last_step),
                func.max(_r.last_time),
            )
            .where(_r.run_id == run_id, _r.key == key, _r.block >= first, _r.block <= last)
            .group_by(literal_column("bucket"))  # by name: one expression, one set of binds
            .order_by(literal_column("bucket"))
        ).all()
    )
