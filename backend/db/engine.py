"""Engine creation: SQLite gets WAL, foreign keys and a busy timeout; Postgres is used as is.

On SQLite a write transaction starts with `BEGIN IMMEDIATE` (it takes the one write lock up
front), so a reader must never use that engine: `make_read_engine` gives the same file with
deferred, query-only transactions, which in WAL mode run beside the writer and never wait.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

LOCK_TIMEOUT_SECONDS = 15.0  # a writer waits this long for the lock, then the API answers 503


def _sqlite_pragmas(
    dbapi_connection: Any, _record: Any, *, lock_timeout: float, query_only: bool
) -> None:
    # pysqlite's own transaction handling defers BEGIN; we issue BEGIN ourselves (see below)
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={round(lock_timeout * 1000)}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    if query_only:
        cursor.execute("PRAGMA query_only=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front: concurrent writers queue on busy_timeout
    # instead of failing with "database is locked" when a read transaction upgrades.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin_read(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")  # deferred: a WAL snapshot, no lock on the writer


def is_busy(error: BaseException) -> bool:
    """The database could not take this write in time (SQLite's lock wait ran out, or the
    connection pool had nothing free): safe to retry, nothing was stored."""
    if isinstance(error, exc.TimeoutError):
        return True
    if isinstance(error, exc.OperationalError):
        text = str(error.orig).lower()
        return "database is locked" in text or "database is busy" in text
    return False


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_engine(url: str, lock_timeout: float, *, reader: bool, **pool: Any) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        from pathlib import Path

        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"check_same_thread": False, "timeout": lock_timeout}
    engine = create_engine(url, connect_args=connect_args, **pool)
    pragmas = partial(_sqlite_pragmas, lock_timeout=lock_timeout, query_only=reader)
    event.listen(engine, "connect", pragmas)
    event.listen(engine, "begin", _sqlite_begin_read if reader else _sqlite_begin)
    return engine


def make_engine(url: str, lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> Engine:
    """An engine for `url` that reads and writes; SQLite files get their parent directory
    created. On SQLite a write waits up to `lock_timeout` s for the lock (then
    `is_busy(error)`)."""
    if make_url(url).get_backend_name() == "sqlite":
        # one writer connection: this process's writers queue for it in order (SQLite's own
        # busy wait polls with growing sleeps: under 16 writers some waited 15-20 s)
        return _sqlite_engine(
            url, lock_timeout, reader=False, pool_size=1, max_overflow=0, pool_timeout=lock_timeout
        )
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_read_engine(engine: Engine, lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> Engine:
    """The engine readers use: on SQLite, the same file with deferred, query-only
    transactions (a write through it fails loudly); on PostgreSQL, `engine` itself (its
    readers never block its writers)."""
    if not is_sqlite(engine):
        return engine
    url = engine.url.render_as_string(hide_password=False)
    return _sqlite_engine(url, lock_timeout, reader=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session per request: committed by the caller, rolled back on error, always closed."""
    session = factory()
    try:
        yield session
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()
