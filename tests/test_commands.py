"""`kdlab serve`, `kdlab db` and `kdlab token`, driven through a parser built from
`kdlab.backend.commands` (the same `add_*` functions `kdlab.backend.cli` registers)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from kdlab.backend.commands import add_db, add_serve, add_token
from kdlab.backend.db.engine import make_engine
from kdlab.backend.db.migrate import current_revision, head_revision
from kdlab.backend.main import create_app
from kdlab.backend.settings import Settings
from tests.conftest import free_port
from tests.factories import create_run

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlab")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve(subparsers)
    add_db(subparsers)
    add_token(subparsers)
    return parser


def kdlab(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return int(args.handler(args))


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KDLAB_"):
            monkeypatch.delenv(name)


def test_db_upgrade_creates_the_sqlite_database_at_head(tmp_path, capsys):
    data = tmp_path / "fresh"
    assert kdlab("db", "upgrade", "--data-dir", str(data)) == 0
    database = data / "kdlab.db"
    assert database.is_file()
    engine = make_engine(f"sqlite:///{database}")
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    assert head_revision() in capsys.readouterr().out
    assert (data / "artifacts").is_dir() and (data / "uploads").is_dir()


def test_db_current_reports_empty_then_head(tmp_path, capsys):
    data = str(tmp_path / "fresh")
    kdlab("db", "current", "--data-dir", data)
    assert capsys.readouterr().out.startswith("none ")
    kdlab("db", "upgrade", "--data-dir", data)
    capsys.readouterr()
    kdlab("db", "current", "--data-dir", data)
    assert capsys.readouterr().out.strip() == f"{head_revision()} (head)"


def test_db_upgrade_follows_kdlab_database_url(database_url, tmp_path, monkeypatch):
    """On both backends: the URL from the environment, the data dir from the option."""
    monkeypatch.setenv("KDLAB_DATABASE_URL", database_url)
    assert kdlab("db", "upgrade", "--data-dir", str(tmp_path / "d")) == 0
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_db_upgrade_to_a_named_revision(tmp_path):
    data = tmp_path / "fresh"
    assert kdlab("db", "upgrade", "--revision", "base", "--data-dir", str(data)) == 0
    engine = make_engine(f"sqlite:///{data / 'kdlab.db'}")
    try:
        assert current_revision(engine) is None
    finally:
        engine.dispose()


def _app_client(data: Path) -> TestClient:
    settings = Settings(data_dir=data, token="other", executor="none")
    return TestClient(create_app(settings), base_url="http://127.0.0.1")


def test_token_create_prints_an_admin_token_that_authenticates(tmp_path, capsys):
    data = tmp_path / "data"
    kdlab("db", "upgrade", "--data-dir", str(data))
    capsys.readouterr()
    assert kdlab("token", "create", "--name", "laptop", "--data-dir", str(data)) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert token.startswith("kdl_") and "\n" not in token
    assert "only this once" in captured.err
    with _app_client(data) as client:
        assert client.get("/api/uploads").status_code == 401
        assert (
            client.get("/api/uploads", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        ok = client.get("/api/uploads", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ok.json() == []
        client.app.state.engine.dispose()  # type: ignore[attr-defined]


def test_token_create_with_run_is_scoped_to_that_run(tmp_path, capsys):
    data = tmp_path / "data"
    kdlab("db", "upgrade", "--data-dir", str(data))
    with _app_client(data) as client:
        with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
            run_id = create_run(session, name="worker").id
        capsys.readouterr()
        kdlab("token", "create", "--name", "worker", "--run", run_id, "--data-dir", str(data))
        token = capsys.readouterr().out.strip()
        headers = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/uploads", headers=headers).status_code == 403  # not admin
        assert client.get(f"/api/runs/{run_id}/artifacts", headers=headers).status_code == 200
        client.app.state.engine.dispose()  # type: ignore[attr-defined]


def test_token_create_refuses_an_unknown_run_and_an_unmigrated_database(tmp_path):
    data = tmp_path / "data"
    with pytest.raises(ValueError, match="kdlab db upgrade"):
        kdlab("token", "create", "--name", "x", "--data-dir", str(data))
    kdlab("db", "upgrade", "--data-dir", str(data))
    with pytest.raises(ValueError, match="no run nope"):
        kdlab("token", "create", "--name", "x", "--run", "nope", "--data-dir", str(data))


def test_serve_off_loopback_without_a_token_refuses_before_touching_anything(tmp_path):
    data = tmp_path / "data"
    with pytest.raises(ValueError, match="KDLAB_TOKEN"):
        kdlab("serve", "--host", "0.0.0.0", "--data-dir", str(data))
    assert not data.exists()


def test_serve_host_comes_from_the_environment_when_not_given(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_HOST", "0.0.0.0")
    with pytest.raises(ValueError, match="KDLAB_TOKEN"):
        kdlab("serve", "--data-dir", str(tmp_path / "data"))


def test_serve_starts_a_server_that_answers_health(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDLAB_")}
    env["KDLAB_EXECUTOR"] = "none"
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kdlab.backend.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data),
            ],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        response = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert response is not None, log.read_text()
        assert response.status_code == 200
        assert response.json()["schema_revision"] == head_revision()
        assert (data / "kdlab.db").is_file()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
    assert f"http://127.0.0.1:{port}/" in log.read_text()
