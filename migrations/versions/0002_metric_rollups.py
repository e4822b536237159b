"""metric roll-ups: aggregates per 64-step block for fast downsampled compare

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 15:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLLUP_WIDTH = 64  # must equal kdlab.backend.services.rollups.ROLLUP_WIDTH


def upgrade() -> None:
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
    # existing points get their roll-ups now
    op.execute(
        sa.text(
            "INSERT INTO metric_rollups "
            "(run_id, key, block, count, total, min_value, max_value, last_step, last_time) "
            f"SELECT run_id, key, step / {ROLLUP_WIDTH}, count(*), sum(value), min(value), "
            "max(value), max(step), max(wall_time) FROM metrics "
            f"GROUP BY run_id, key, step / {ROLLUP_WIDTH}"
        )
    )


def downgrade() -> None:
    op.drop_table("metric_rollups")
