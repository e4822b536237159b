"""The ingest's roll-up refresh reads one index range per key, on SQLite: SQLite's own query
plan for the statement says so. (One statement with an OR of the keys' ranges was planned as
a search by `run_id` alone: every point of the run read again on every batch, so ingest slowed
as a run grew.)"""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.dialects import sqlite

from kdlab.backend.db.models import Base
from kdlab.backend.services.rollups import ROLLUP_WIDTH, _block_ranges, _refresh_blocks


def test_each_key_of_a_batch_is_refreshed_from_its_own_index_range(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    Base.metadata.create_all(engine)
    rows = [("train/loss", 130, 0.5, 1.0), ("train/lr", 5, 0.1, 1.0), ("train/loss", 64, 0.4, 1.0)]
    ranges = _block_ranges(rows)
    assert ranges == {"train/loss": (1, 2), "train/lr": (0, 0)}  # 64 // 64 = 1, 130 // 64 = 2
    with engine.connect() as connection:
        for key, (low, high) in ranges.items():
            statement = _refresh_blocks(sqlite, "run-1", key, low, high)
            compiled = statement.compile(dialect=sqlite.dialect())
            params = tuple(compiled.params[name] for name in compiled.positiontup or ())
            plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params).all()
            searches = [row[-1] for row in plan if "metrics" in row[-1]]
            assert len(searches) == 1, plan
            assert searches[0].startswith("SEARCH metrics USING INDEX"), plan
            assert searches[0].endswith("(run_id=? AND key=? AND step>? AND step<?)"), plan
            first, last = low * ROLLUP_WIDTH, (high + 1) * ROLLUP_WIDTH - 1
            assert ("run-1", key, first, last) == params[1:5]
    engine.dispose()
