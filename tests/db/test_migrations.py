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
