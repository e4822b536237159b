from sqlalchemy import inspect

from kdlab.backend.db.engine import make_engine
from kdlab.backend.db.migrate import current_revision, downgrade, head_revision, upgrade
from kdlab.backend.db.models import Base

TABLES = {
    "experiments",
    "runs",
    "metrics",
    "artifacts",
    "uploads",
    "run_events",
    "mlflow_outbox",
    "api_tokens",
}


def test_upgrade_to_head_then_downgrade_to_empty(database_url):
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert set(inspect(engine).get_table_names()) >= TABLES
        downgrade(engine, "base")
        assert current_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_match_the_models(database_url):
    """The head schema has every column the models declare (no model change without a migration)."""
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            columns = {c["name"] for c in inspector.get_columns(table.name)}
            assert columns == {c.name for c in table.columns}, table.name
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_0003_backfills_the_rollups_and_its_downgrade_restores_0002s(database_url):
    """Upgrade and downgrade with points present: every roll-up row equals a brute-force
    computation over the points, 0003's levels after the upgrade, 0002's 64-step blocks after
    the downgrade."""
    import random

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from kdlab.backend.db.migrate import downgrade as downgrade_to
    from tests.db.rollup_oracle import assert_same_rollups, expected_rollups, stored_rollups
    from tests.factories import create_run

    rng = random.Random(3)
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0002")
        upgrade(engine)  # head, to create a run through the ORM; points go in at 0002 below
        with Session(engine) as session:
            runs = [create_run(session, name=f"m{i}", status="running").id for i in range(2)]
            session.commit()
        downgrade_to(engine, "0002")
        points: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
        for run_id in runs:
            for key in ("a", "b/c"):
                steps = [*rng.sample(range(50000), 3000), 2**40 + 5]
                points[(run_id, key)] = {
                    s: (rng.choice([rng.gauss(0, 1), 1e3]), 1.7e9 + rng.uniform(0, 1e5))
                    for s in steps
                }
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO metrics (run_id, key, step, value, wall_time) "
                    "VALUES (:r, :k, :s, :v, :t)"
                ),
                [
                    {"r": r, "k": k, "s": s, "v": v, "t": t}
                    for (r, k), by_step in points.items()
                    for s, (v, t) in by_step.items()
                ],
            )
        upgrade(engine, "0003")
        assert current_revision(engine) == "0003"
        with Session(engine) as session:
            assert_same_rollups(stored_rollups(session), expected_rollups(points))
        downgrade_to(engine, "0002")
        with Session(engine) as session:
            rows = session.execute(
                text(
                    "SELECT run_id, key, block, count, total, min_value, max_value, last_step, "
                    "last_time FROM metric_rollups"
                )
            ).all()
        old = {tuple(row[:3]): tuple(row[3:]) for row in rows}
        want = {
            (r, k, block): (count, total, low, high, last, max_time)
            for (r, k, level, block), (count, total, low, high, _, last, _, _, _, max_time) in (
                expected_rollups(points, levels=(64,)).items()
            )
        }
        assert old.keys() == want.keys()
        for name, (count, total, low, high, last, max_time) in want.items():
            got = old[name]
            assert (got[0], got[2], got[3], got[4], got[5]) == (count, low, high, last, max_time)
            assert abs(got[1] - total) <= 1e-9 * max(1.0, abs(total))
        upgrade(engine)  # and up again
        with Session(engine) as session:
            assert_same_rollups(stored_rollups(session), expected_rollups(points))
    finally:
        engine.dispose()


def test_0004_clusters_the_metric_tables_on_sqlite_and_keeps_every_row(database_url):
    """0003 → 0004 → 0003 → 0004 with points and roll-ups stored: every row comes through each
    rebuild unchanged; on SQLite the two tables are WITHOUT ROWID at 0004 and rowid tables at
    0003 (on PostgreSQL 0004 changes nothing)."""
    import random

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from kdlab.backend.db.migrate import downgrade as downgrade_to
    from tests.factories import create_run

    rng = random.Random(4)
    engine = make_engine(database_url)

    def contents() -> dict[str, list]:
        with engine.connect() as connection:
            return {
                "metrics": connection.execute(
                    text("SELECT * FROM metrics ORDER BY run_id, key, step")
                ).all(),
                "metric_rollups": connection.execute(
                    text("SELECT * FROM metric_rollups ORDER BY run_id, key, level, block")
                ).all(),
            }

    def clustered() -> set[str]:
        if engine.dialect.name != "sqlite":
            return set()
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE name IN ('metrics', 'metric_rollups')"
            ).all()
        return {name for name, sql in rows if sql.rstrip().endswith("WITHOUT ROWID")}

    try:
        upgrade(engine)
        with Session(engine) as session:
            run_id = create_run(session, name="m", status="running").id
            session.commit()
        downgrade_to(engine, "0003")
        assert clustered() == set()
        rows = [(run_id, k, s, rng.gauss(0, 1), 1.7e9 + s) for k in "ab" for s in range(3000)]
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO metrics VALUES (:r, :k, :s, :v, :t)"),
                [dict(zip("rksvt", row, strict=True)) for row in rows],
            )
            connection.execute(
                text(
                    "INSERT INTO metric_rollups SELECT run_id, key, 16, step / 16, count(*), "
                    "sum(value), min(value), max(value), min(step), max(step), min(wall_time), "
                    "max(wall_time), min(wall_time), max(wall_time) FROM metrics "
                    "GROUP BY run_id, key, step / 16"
                )
            )
        before = contents()
        assert len(before["metrics"]) == 6000 and len(before["metric_rollups"]) == 2 * 188
        upgrade(engine)
        assert current_revision(engine) == "0004"
        sqlite = engine.dialect.name == "sqlite"
        assert clustered() == ({"metrics", "metric_rollups"} if sqlite else set())
        assert contents() == before
        downgrade_to(engine, "0003")
        assert clustered() == set() and contents() == before
        upgrade(engine)
        assert contents() == before
        # the foreign key still cascades from the rebuilt tables
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM runs WHERE id = :r"), {"r": run_id})
        assert contents() == {"metrics": [], "metric_rollups": []}
    finally:
        engine.dispose()
