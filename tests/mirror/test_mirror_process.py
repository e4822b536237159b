"""The MLflow mirror in its own process, as the server runs it (`KDLAB_MLFLOW_MIRROR=process`, the
default), on SQLite and PostgreSQL app databases: started with the app, every point in MLflow
exactly once, MLflow down then up (the outbox waits and catches up), stopped with the server
(by its PID), and gone when the server dies (its stdin closes)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from sqlalchemy import func, select

from kdlab.backend.db.models import MlflowOutbox, Run
from kdlab.backend.main import create_app
from kdlab.backend.mlflow import hooks
from kdlab.backend.mlflow.process import MirrorProcess
from kdlab.backend.settings import Settings
from tests.conftest import free_port
from tests.factories import DIGITS_TEACHER

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

KEY = "train/loss_total"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-process') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def mirrored(settings: Settings, mlflow_uri: str) -> Settings:
    return settings.model_copy(update={"mlflow_tracking_uri": mlflow_uri})


@pytest.fixture(autouse=True)
def _fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as client:
            yield client
    finally:
        hooks.uninstall_outbox_hooks(app.state.session_factory)
        app.state.engine.dispose()


def points(steps: range, offset: float = 0.0) -> list[dict[str, Any]]:
    return [
        {"key": KEY, "step": s, "value": 1.0 / (s + 1) + offset, "time": 1_763_900_000.0 + s}
        for s in steps
    ]


def post(client: TestClient, run_id: str, batch: list[dict[str, Any]]) -> None:
    response = client.post(f"/api/runs/{run_id}/metrics", json={"points": batch})
    assert response.status_code == 200, response.text


def create_run(client: TestClient) -> str:
    body = {**DIGITS_TEACHER, "experiment": f"proc-{uuid.uuid4().hex[:8]}", "name": "proc"}
    response = client.post("/api/runs", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def pending(client: TestClient) -> int:
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        count = session.scalar(
            select(func.count()).select_from(MlflowOutbox).where(MlflowOutbox.done_at.is_(None))
        )
        session.rollback()
    return int(count or 0)


def wait_drained(client: TestClient, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while pending(client):
        assert time.monotonic() < deadline, f"{pending(client)} outbox rows still pending"
        time.sleep(0.2)


def mlflow_steps(client: TestClient, mlflow_uri: str, run_id: str) -> list[int]:
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        run = session.get(Run, run_id)
        assert run is not None and run.mlflow_run_id
        mlflow_run_id = run.mlflow_run_id
        session.rollback()
    history = MlflowClient(mlflow_uri).get_metric_history(mlflow_run_id, KEY)
    return sorted(m.step for m in history)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_server_runs_the_mirror_in_its_own_process_every_point_once(
    mirrored: Settings, mlflow_uri: str
) -> None:
    assert mirrored.mlflow_mirror == "process"  # the default
    with serving(mirrored) as client:
        mirror = client.app.state.mirror  # type: ignore[attr-defined]
        assert isinstance(mirror, MirrorProcess) and mirror.running
        pid = mirror.pid
        assert pid is not None and pid != os.getpid()
        run_id = create_run(client)
        post(client, run_id, points(range(0, 1500)))
        post(client, run_id, points(range(1500, 2500)))
        post(client, run_id, points(range(1000, 2000)))  # a re-sent spool: replaced, not doubled
        wait_drained(client)
        post(client, run_id, points(range(2500, 3000)))  # later batches too
        wait_drained(client)
        assert mlflow_steps(client, mlflow_uri, run_id) == list(range(3000))
        assert mirror.running
    assert not mirror.running and gone(pid)  # stopped with the server


def test_mlflow_down_the_outbox_waits_and_the_process_catches_up_exactly_once(
    mirrored: Settings, mlflow_uri: str
) -> None:
    down = mirrored.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}"})
    with serving(down) as client:
        mirror = client.app.state.mirror  # type: ignore[attr-defined]
        run_id = create_run(client)
        started = time.monotonic()
        for start in range(0, 2000, 500):
            post(client, run_id, points(range(start, start + 500)))
        assert time.monotonic() - started < 20  # nothing waited on MLflow
        factory = client.app.state.session_factory  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while True:
            with factory() as session:
                first = session.execute(
                    select(MlflowOutbox.attempts, MlflowOutbox.done_at, MlflowOutbox.last_error)
                    .order_by(MlflowOutbox.id)
                    .limit(1)
                ).one()
                session.rollback()
            if first.attempts >= 1:
                break
            assert time.monotonic() < deadline, "the mirror process never tried"
            time.sleep(0.2)
        assert first.done_at is None and first.last_error and "Connection" in first.last_error
        assert mirror.running  # failing, not dead
        assert pending(client) == 5
    # MLflow is back (here: the server restarted with a reachable store)
    with serving(mirrored) as client:
        wait_drained(client)
        assert mlflow_steps(client, mlflow_uri, run_id) == list(range(2000))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_mirror_process_ends_when_the_server_dies(mirrored: Settings) -> None:
    """A server killed with -9 cannot stop its mirror: the child sees its stdin close."""
    mirror = MirrorProcess(mirrored).start()
    process = mirror._process
    assert process is not None and process.stdin is not None
    time.sleep(0.5)
    assert mirror.running
    process.stdin.close()  # what the kernel does when the server's process ends
    assert process.wait(timeout=30) == 0
    assert not mirror.running
    mirror.stop()  # nothing left to stop


def test_the_mirror_process_stops_cleanly_on_sigterm(mirrored: Settings) -> None:
    """The server's stop (SIGTERM) ends the child with status 0: its thread watching stdin must
    not hold the buffered reader's lock at shutdown ("Fatal Python error: could not acquire lock
    for <_io.BufferedReader name='<stdin>'>", an abort, at every stop)."""
    mirror = MirrorProcess(mirrored).start()
    process = mirror._process
    assert process is not None
    status = Path(f"/proc/{process.pid}/status")
    if not status.exists():
        mirror.stop()
        pytest.skip("needs /proc to see when the child handles SIGTERM")

    def handles_sigterm() -> bool:  # installed once MLflow is open and the loop starts
        for line in status.read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
        return False

    deadline = time.monotonic() + 60
    while not handles_sigterm():
        assert mirror.running and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(0.5)  # the watching thread blocked in its read
    mirror.stop(timeout=30)
    assert process.returncode == 0
