"""Row "no 500 under write contention", the lock itself: a write that cannot get SQLite's lock
in time is a 503 with `Retry-After` and stores nothing; the worker's client waits and sends it
again, and every point lands once; reads never wait for the writer.

The lock is held by another connection (as another process would), and the server's lock
wait is cut to a fraction of a second (`KDLAB_DB_LOCK_TIMEOUT_SECONDS`) so that the tests
see the timeout at once.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from kdlab.backend.settings import Settings
from kdlab.worker.client import ApiClient

LOCK_WAIT = 0.3
KEY = "train/loss_total"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    if not settings.resolved_database_url.startswith("sqlite"):
        pytest.skip("SQLite's single write lock; PostgreSQL has row locks")
    return settings.model_copy(update={"db_lock_timeout_seconds": LOCK_WAIT})


@contextmanager
def write_lock_held(settings: Settings) -> Iterator[sqlite3.Connection]:
    """SQLite's write lock, taken by a connection of our own (another process, in effect)."""
    path = settings.resolved_database_url.removeprefix("sqlite:///")
    connection = sqlite3.connect(path, isolation_level=None, timeout=30)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    finally:
        connection.rollback()
        connection.close()


def external_run(base: str) -> tuple[str, dict[str, str]]:
    body = {"kind": "external", "name": "locked", "experiment": "contention"}
    created = httpx.post(f"{base}/api/runs", json=body, timeout=30).json()
    return created["id"], {"Authorization": f"Bearer {created['token']}"}


def points(count: int) -> list[dict]:
    return [{"key": KEY, "step": s, "value": 1.0 / (s + 1)} for s in range(count)]


def stored_count(base: str, run_id: str) -> int:
    keys = httpx.get(f"{base}/api/runs/{run_id}/metrics/keys", timeout=30).json()["keys"]
    return sum(entry["count"] for entry in keys)


def test_a_write_that_cannot_get_the_lock_is_a_503_that_stores_nothing(live_server, settings):
    run_id, auth = external_run(live_server)
    with write_lock_held(settings):
        response = httpx.post(
            f"{live_server}/api/runs/{run_id}/metrics",
            json={"points": points(50)},
            headers=auth,
            timeout=30,
        )
        logs = httpx.post(
            f"{live_server}/api/runs/{run_id}/logs", json={"lines": ["x"]}, headers=auth, timeout=30
        )
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert "busy" in response.json()["detail"]
    assert logs.status_code == 503
    assert stored_count(live_server, run_id) == 0
    lines = httpx.get(f"{live_server}/api/runs/{run_id}/logs", timeout=30).json()["lines"]
    assert lines == []

    again = httpx.post(
        f"{live_server}/api/runs/{run_id}/metrics",
        json={"points": points(50)},
        headers=auth,
        timeout=30,
    )
    assert again.status_code == 200 and again.json() == {"accepted": 50}
    assert stored_count(live_server, run_id) == 50


def test_the_workers_client_waits_out_a_held_lock_and_every_point_lands_once(live_server, settings):
    run_id, auth = external_run(live_server)
    token = auth["Authorization"].removeprefix("Bearer ")
    sent: dict[str, int] = {}
    with ApiClient(live_server, token, run_id=run_id, attempts=20, backoff_base=0.05) as client:
        with write_lock_held(settings):
            poster = threading.Thread(
                target=lambda: sent.update(accepted=client.post_metrics(points(200)))
            )
            poster.start()
            poster.join(timeout=1.5)  # it is still waiting: each try got a 503
            assert poster.is_alive()
        poster.join(timeout=60)
    assert sent == {"accepted": 200}
    assert stored_count(live_server, run_id) == 200


def test_reads_do_not_wait_for_the_writer(live_server, settings):
    run_id, auth = external_run(live_server)
    httpx.post(
        f"{live_server}/api/runs/{run_id}/metrics",
        json={"points": points(20)},
        headers=auth,
        timeout=30,
    ).raise_for_status()
    with write_lock_held(settings):
        # each would be a 503 after LOCK_WAIT if a read took (or waited for) the write lock
        answers = {
            "health": httpx.get(f"{live_server}/api/health", timeout=30),
            "runs": httpx.get(f"{live_server}/api/runs", timeout=30),
            "compare": httpx.get(
                f"{live_server}/api/compare", params={"runs": run_id, "keys": KEY}, timeout=30
            ),
            "run, with its token": httpx.get(
                f"{live_server}/api/runs/{run_id}", headers=auth, timeout=30
            ),
            "runs page": httpx.get(f"{live_server}/", timeout=30),
            "run page": httpx.get(f"{live_server}/runs/{run_id}", timeout=30),
        }
    assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(answers, 200)
    series = answers["compare"].json()["series"][0]
    assert series["step"] == list(range(20))
    assert series["value"] == pytest.approx([1.0 / (s + 1) for s in range(20)])
