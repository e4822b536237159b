"""Shared fixtures: a real SQLite file and a real PostgreSQL server owned by the test session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from kdlab.backend.db.engine import make_engine
from kdlab.backend.db.migrate import upgrade
from kdlab.backend.db.models import Base
from kdlab.backend.main import create_app
from kdlab.backend.settings import Settings

PG_BIN = Path(os.environ.get("KDLAB_PG_BIN", "/usr/lib/postgresql/15/bin"))
# .ci/run sets this: there, a missing PostgreSQL is a failure, not a skip
REQUIRE_POSTGRES = os.environ.get("KDLAB_REQUIRE_POSTGRES") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*args: str) -> subprocess.CompletedProcess:
    command = " ".join(args)
    if os.geteuid() == 0:  # initdb refuses to run as root
        return subprocess.run(["su", "postgres", "-c", command], check=True, capture_output=True)
    return subprocess.run(["bash", "-c", command], check=True, capture_output=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on a free port; yields its base URL (no database)."""
    if not (PG_BIN / "initdb").exists():
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL not found at {PG_BIN}; install Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="kdlab-pg-"))
    data = root / "data"
    os.chmod(root, 0o777)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    _as_postgres(f"{PG_BIN}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    options = f"'-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off'"
    _as_postgres(
        f"{PG_BIN}/pg_ctl", "-D", str(data), "-o", options, "-l", f"{root}/log", "start", "-w"
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        _as_postgres(f"{PG_BIN}/pg_ctl", "-D", str(data), "stop", "-m", "fast", "-w")
        shutil.rmtree(root, ignore_errors=True)


_db_counter = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind, fresh for every test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kdlab.db'}"
        return
    base = request.getfixturevalue("postgres_server")
    name = f"kdlab_test_{os.getpid()}_{next(_db_counter)}"
    admin = make_engine(f"{base}/postgres").execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def migrated_engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def settings(database_url: str, tmp_path: Path, migrated_engine: Engine) -> Settings:
    # no MLflow mirror by default (tests/mirror turns it on against a real store)
    return Settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        executor="none",
        mlflow_tracking_uri="none",
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client
    app.state.engine.dispose()


__all__ = ["Base"]


@pytest.fixture
def db_session(client: TestClient) -> Iterator[Session]:
    """A session on the same database the client's app uses (for arranging rows)."""
    session = client.app.state.session_factory()  # type: ignore[attr-defined]
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def live_server(settings: Settings) -> Iterator[str]:
    """The app served by a real uvicorn on a free loopback port (for subprocess workers)."""
    import threading
    import time

    import httpx
    import uvicorn

    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    else:
        raise RuntimeError("live server did not start within 30 s")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.engine.dispose()
