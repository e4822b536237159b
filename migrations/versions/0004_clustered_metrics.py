"""metrics and metric_rollups clustered by their primary key on SQLite (WITHOUT ROWID)

A rowid table with a composite primary key is stored twice on SQLite: the rows in rowid order
and an index of (run_id, key, step) pointing into them. Every point written goes into both, and
every range read of a series looks each row up again in the table. Clustered (`WITHOUT ROWID`),
a series' points and blocks lie in key order in one b-tree: measured on 10 runs × 100k points,
the database is 40% smaller and chart reads and the ingest cost less CPU (docs/benchmarks.md).

PostgreSQL keeps its heap + primary-key index: nothing to do there. The rebuild copies each
table once (minutes for a database of 100M points); the downgrade rebuilds the rowid tables.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:30:00
"""

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")


def _metrics(name: str, rowid: bool) -> None:
    op.create_table(
        name,
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("wall_time", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "key", "step"),
        sqlite_with_rowid=rowid,
    )


def _rollups(name: str, rowid: bool) -> None:
    op.create_table(
        name,
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
        sqlite_with_rowid=rowid,
    )


TABLES = {
    "metrics": (_metrics, "run_id, key, step"),
    "metric_rollups": (_rollups, "run_id, key, level, block"),
}


def _rebuild(rowid: bool) -> None:
    """Each table copied into a new one of the other layout, in key order, then swapped in."""
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, (create, key) in TABLES.items():
        rows = op.get_bind().exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
        log.info("rebuilding %s (%s rows) %s", table, rows, "with rowid" if rowid else "clustered")
        create(f"{table}_rebuilt", rowid)
        op.execute(f"INSERT INTO {table}_rebuilt SELECT * FROM {table} ORDER BY {key}")
        op.drop_table(table)
        op.rename_table(f"{table}_rebuilt", table)


def upgrade() -> None:
    _rebuild(rowid=False)


def downgrade() -> None:
    _rebuild(rowid=True)
