"""The ingest's roll-up refresh reads one index range per key and level, on SQLite: SQLite's
own query plan for each statement says so. (One statement with an OR of the keys' ranges was
planned as a search by `run_id` alone: every point of the run read again on every batch, so
ingest slowed as a run grew.)"""

from __future__ import annotations

from sqlalchemy import create_engine

from kdlab.backend.db.models import Base
from kdlab.backend.services.rollups import _FINER, _POINTS, FINEST, LEVELS, _block_ranges


def _plan(connection, statement, params):
    compiled = statement.compile(dialect=connection.dialect)
    values = tuple(params[name] for name in compiled.positiontup or ())
    return [row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", values)]


def test_each_key_of_a_batch_is_refreshed_from_its_own_index_range(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    Base.metadata.create_all(engine)
    rows = [("train/loss", 40, 0.5, 1.0), ("train/lr", 5, 0.1, 1.0), ("train/loss", 16, 0.4, 1.0)]
    assert FINEST == 16
    assert _block_ranges(rows) == {"train/loss": (1, 2), "train/lr": (0, 0)}
    params = {"run_id": "run-1", "key": "train/loss", "low": 16, "high": 47}
    with engine.connect() as connection:
        plan = _plan(connection, _POINTS, params)
        scans = [line for line in plan if "SCAN" in line and "SUBQUERY" not in line]
        assert not [line for line in scans if "metrics" in line], plan
        searches = [line for line in plan if line.startswith("SEARCH m ")]
        assert len(searches) == 1, plan
        assert searches[0].endswith("(run_id=? AND key=? AND step>? AND step<?)"), plan
        for width in LEVELS[1:]:
            plan = _plan(connection, _FINER[width], params)
            searches = [line for line in plan if line.startswith("SEARCH r ")]
            assert len(searches) == 1, plan
            assert "(run_id=? AND key=? AND level=? AND block>? AND block<?)" in searches[0], plan
            assert not [line for line in plan if line.startswith("SCAN metric_rollups")], plan
    engine.dispose()
