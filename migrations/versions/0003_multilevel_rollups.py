"""multi-resolution metric roll-ups: per-block aggregates at 16, 32, 64, … 4,096 steps (powers of two)

Replaces 0002's one-level table (64-step blocks) by one with a `level` (block width) column,
first/last step and time, and the min/max wall time of each block; backfilled from the points.
The downgrade restores 0002's table, backfilled likewise.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 19:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies of kdlab.backend.services.rollups.LEVELS / RATIO as of this revision
LEVELS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
RATIO = 2
OLD_WIDTH = 64  # 0002's ROLLUP_WIDTH

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
COLUMNS = ", ".join(("run_id", "key", "level", "block", *AGGREGATES))


def _from_points(width: int) -> str:
    return (
        f"INSERT INTO metric_rollups ({COLUMNS}) "
        f"SELECT g.run_id, g.key, {width}, g.block, g.n, g.total, g.lo, g.hi, g.fs, g.ls, "
        "f.wall_time, l.wall_time, g.t0, g.t1 FROM ("
        f"SELECT run_id, key, step / {width} AS block, count(*) AS n, sum(value) AS total, "
        "min(value) AS lo, max(value) AS hi, min(step) AS fs, max(step) AS ls, "
        "min(wall_time) AS t0, max(wall_time) AS t1 FROM metrics GROUP BY 1, 2, 3) AS g "
        "JOIN metrics f ON f.run_id = g.run_id AND f.key = g.key AND f.step = g.fs "
        "JOIN metrics l ON l.run_id = g.run_id AND l.key = g.key AND l.step = g.ls"
    )


def _from_finer(width: int) -> str:
    finer = width // RATIO
    return (
        f"INSERT INTO metric_rollups ({COLUMNS}) "
        f"SELECT g.run_id, g.key, {width}, g.block, g.n, g.total, g.lo, g.hi, g.fs, g.ls, "
        "f.first_time, l.last_time, g.t0, g.t1 FROM ("
        f"SELECT run_id, key, block / {RATIO} AS block, sum(count) AS n, sum(total) AS total, "
        "min(min_value) AS lo, max(max_value) AS hi, min(first_step) AS fs, "
        "max(last_step) AS ls, min(min_time) AS t0, max(max_time) AS t1 "
        f"FROM metric_rollups WHERE level = {finer} GROUP BY 1, 2, 3) AS g "
        f"JOIN metric_rollups f ON f.run_id = g.run_id AND f.key = g.key AND f.level = {finer} "
        f"AND f.block = g.fs / {finer} "
        f"JOIN metric_rollups l ON l.run_id = g.run_id AND l.key = g.key AND l.level = {finer} "
        f"AND l.block = g.ls / {finer}"
    )


def upgrade() -> None:
    op.drop_table("metric_rollups")
    op.create_table(
        "metric_rollups",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("block", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("min_value", sa.Float(), nullable=False),
        sa.Column("max_value", sa.Float(), nullable=False),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("first_time", sa.Float(), nullable=False),
        sa.Column("last_time", sa.Float(), nullable=False),
        sa.Column("min_time", sa.Float(), nullable=False),
        sa.Column("max_time", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "key", "level", "block"),
    )
    op.execute(sa.text(_from_points(LEVELS[0])))
    for width in LEVELS[1:]:
        op.execute(sa.text(_from_finer(width)))


def downgrade() -> None:
    op.drop_table("metric_rollups")
    op.create_table(
        "metric_rollups",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("block", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("min_value", sa.Float(), nullable=False),
        sa.Column("max_value", sa.Float(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("last_time", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "key", "block"),
    )
    op.execute(
        sa.text(
            "INSERT INTO metric_rollups "
            "(run_id, key, block, count, total, min_value, max_value, last_step, last_time) "
            f"SELECT run_id, key, step / {OLD_WIDTH}, count(*), sum(value), min(value), "
            "max(value), max(step), max(wall_time) FROM metrics "
            f"GROUP BY run_id, key, step / {OLD_WIDTH}"
        )
    )
