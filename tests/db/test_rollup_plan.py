"""The ingest's roll-up refresh reads index ranges only, on SQLite: SQLite's own query plan for
each of its reads says so. (One statement with an OR of the keys' ranges was once planned as a
search by `run_id` alone: every point of the run read again on every batch, so ingest slowed as a
run grew.)"""

from __future__ import annotations

from sqlalchemy import create_engine

from kdlab.backend.db.models import Base
from kdlab.backend.services.rollups import blocks_read_sql, points_read_sql


def _plan(connection, sql: str, params: tuple) -> list[str]:
    return [row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]


def test_the_refresh_reads_points_and_blocks_through_their_primary_keys(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    Base.metadata.create_all(engine)
    with engine.connect() as connection:
        # stored points of two step ranges of one series
        params = ("run-1", "train/loss", 16, 31, "run-1", "train/loss", 992, 1007)
        plan = _plan(connection, points_read_sql("?", 2), params)
        assert not [line for line in plan if line.startswith("SCAN")], plan
        searches = [line for line in plan if line.startswith("SEARCH metrics")]
        assert len(searches) == 2, plan
        assert all(s.endswith("(run_id=? AND key=? AND step>? AND step<?)") for s in searches)
        # the untouched sibling blocks at three levels
        params = ("run-1", "k", 16, 3, 9, "run-1", "k", 32, 7, "run-1", "k", 64, 1, 2)
        plan = _plan(connection, blocks_read_sql("?", [2, 1, 2]), params)
        assert not [line for line in plan if line.startswith("SCAN")], plan
        searches = [line for line in plan if line.startswith("SEARCH metric_rollups")]
        assert len(searches) == 3, plan
        assert all("(run_id=? AND key=? AND level=? AND block=?)" in s for s in searches), plan
    engine.dispose()
