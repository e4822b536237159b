"""Worker routes: POST /api/runs/{id}/status (transition table) and /heartbeat; `set_status`."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import select

from kdlab.backend.db.models import Run, RunEvent
from kdlab.backend.errors import Conflict
from kdlab.backend.services.auth import create_token
from kdlab.backend.services.runs import TRANSITIONS, set_status
from tests.factories import create_run

FINGERPRINT = "ab" * 32
# Tests keep run ids in locals: touching an expired ORM object would open a transaction on the
# test's session, and on SQLite (BEGIN IMMEDIATE) that blocks the server's writes.


def run_token(session, run_id: str) -> dict[str, str]:
    token = create_token(session, name=f"run {run_id}", scope="run", run_id=run_id)
    session.commit()
    return {"Authorization": f"Bearer {token}"}


def status_events(session, run_id: str) -> list[str]:
    rows = session.scalars(
        select(RunEvent.message)
        .where(RunEvent.run_id == run_id, RunEvent.kind == "status")
        .order_by(RunEvent.id)
    ).all()
    session.rollback()
    return list(rows)


def test_worker_reports_running_then_succeeded(client, db_session):
    run = create_run(db_session, name="r", status="starting")
    run_id = run.id
    headers = run_token(db_session, run_id)

    running = client.post(f"/api/runs/{run_id}/status", json={"status": "running"}, headers=headers)
    assert running.status_code == 200, running.text
    body = running.json()
    assert body["status"] == "running"
    assert datetime.fromisoformat(body["started_at"]).tzinfo is not None
    assert body["finished_at"] is None

    done = client.post(
        f"/api/runs/{run_id}/status",
        json={"status": "succeeded", "teacher_fingerprint": FINGERPRINT},
        headers=headers,
    )
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "succeeded"
    assert done.json()["finished_at"] is not None
    assert done.json()["started_at"] == body["started_at"]

    db_session.expire_all()
    row = db_session.get(Run, run_id)
    assert row is not None
    assert (row.teacher_fingerprint, row.heartbeat_at is not None) == (FINGERPRINT, True)
    db_session.rollback()
    assert status_events(db_session, run_id) == ["running", "succeeded"]


def test_failed_stores_the_error_and_cancelled_ends_the_run(client, db_session):
    failing = create_run(db_session, name="f", status="running")
    failing_id = failing.id
    stopping = create_run(db_session, name="c", status="running")
    stopping_id = stopping.id
    error = "NaN in train/kd/output~output (at step 10)\n\nTraceback (most recent call last):\n..."
    response = client.post(
        f"/api/runs/{failing_id}/status", json={"status": "failed", "error": error}
    )
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["error"]) == ("failed", error)

    response = client.post(f"/api/runs/{stopping_id}/status", json={"status": "cancelled"})
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert status_events(db_session, stopping_id) == ["cancelled"]


@pytest.mark.parametrize(
    ("start", "new"),
    [
        ("queued", "succeeded"),
        ("queued", "failed"),
        ("starting", "succeeded"),
        ("succeeded", "running"),
        ("failed", "running"),
        ("cancelled", "succeeded"),
        ("succeeded", "failed"),
    ],
)
def test_illegal_transition_is_409_naming_both_states(client, db_session, start, new):
    run = create_run(db_session, name="r", status=start)
    run_id = run.id
    response = client.post(f"/api/runs/{run_id}/status", json={"status": new})
    assert response.status_code == 409, response.text
    assert response.json()["detail"] == f"run {run_id} cannot go from {start} to {new}"
    assert client.get(f"/api/runs/{run_id}").json()["status"] == start
    assert status_events(db_session, run_id) == []


def test_repeating_the_current_status_is_a_no_op(client, db_session):
    """A retried request whose first try got through must not fail."""
    run = create_run(db_session, name="r", status="running")
    run_id = run.id
    for _ in range(2):
        response = client.post(f"/api/runs/{run_id}/status", json={"status": "running"})
        assert response.status_code == 200, response.text
    client.post(f"/api/runs/{run_id}/status", json={"status": "succeeded"})
    again = client.post(f"/api/runs/{run_id}/status", json={"status": "succeeded"})
    assert again.status_code == 200
    assert status_events(db_session, run_id) == ["succeeded"]


def test_external_run_ends_through_the_same_route(client):
    body = {"kind": "external", "name": "colab", "experiment": "ext"}
    created = client.post("/api/runs", json=body).json()
    headers = {"Authorization": f"Bearer {created['token']}"}
    path = f"/api/runs/{created['id']}/status"
    assert client.post(path, json={"status": "running"}, headers=headers).status_code == 200
    beat = client.post(f"/api/runs/{created['id']}/heartbeat", json={}, headers=headers)
    assert beat.json() == {"cancel_requested": False, "status": "running"}
    done = client.post(path, json={"status": "succeeded"}, headers=headers)
    assert done.json()["status"] == "succeeded"
    again = client.post(path, json={"status": "running"}, headers=headers)  # token revoked
    assert again.status_code == 401 and "revoked when the run finished" in again.text
    assert client.post(path, json={"status": "running"}).status_code == 409  # the admin: 409


def test_bodies_are_validated(client, db_session):
    run = create_run(db_session, name="r", status="running")
    run_id = run.id
    path = f"/api/runs/{run_id}/status"
    for body in (
        {"status": "queued"},  # supervisor-owned: not a worker report
        {"status": "starting"},
        {"status": "bogus"},
        {"status": "failed", "teacher_fingerprint": "not-hex"},
        {"status": "failed", "extra": 1},
        {},
    ):
        assert client.post(path, json=body).status_code == 422, body
    assert client.post("/api/runs/nope/status", json={"status": "running"}).status_code == 404
    assert client.post("/api/runs/nope/heartbeat", json={}).status_code == 404


def test_another_runs_token_is_403(client, db_session):
    mine = create_run(db_session, name="mine", status="running")
    mine_id = mine.id
    other = create_run(db_session, name="other", status="running")
    other_id = other.id
    headers = run_token(db_session, mine_id)
    for path, body in (
        (f"/api/runs/{other_id}/status", {"status": "failed"}),
        (f"/api/runs/{other_id}/heartbeat", {}),
    ):
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 403, response.text
        assert (
            response.json()["detail"] == f"this token belongs to run {mine_id}, not run {other_id}"
        )
    assert client.get(f"/api/runs/{other_id}").json()["status"] == "running"
    bad = {"Authorization": "Bearer kdl_not-a-token"}
    assert client.post(f"/api/runs/{mine_id}/heartbeat", json={}, headers=bad).status_code == 401


def test_heartbeat_refreshes_and_carries_the_cancel_flag(client, db_session):
    run = create_run(db_session, name="r", status="running")
    run_id = run.id
    headers = run_token(db_session, run_id)
    path = f"/api/runs/{run_id}/heartbeat"

    first = client.post(path, json={}, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"cancel_requested": False, "status": "running"}
    db_session.expire_all()
    beat1 = db_session.get(Run, run_id).heartbeat_at
    db_session.rollback()
    assert beat1 is not None
    assert client.post(path, headers=headers).status_code == 200  # no body at all is fine too
    db_session.expire_all()
    assert db_session.get(Run, run_id).heartbeat_at >= beat1
    db_session.rollback()

    assert client.post(f"/api/runs/{run_id}/cancel").json()["cancel_requested"] is True
    assert client.post(path, json={}, headers=headers).json() == {
        "cancel_requested": True,
        "status": "running",
    }
    client.post(f"/api/runs/{run_id}/status", json={"status": "cancelled"}, headers=headers)
    finished = client.post(path, json={}, headers=headers)  # the token is revoked now
    assert finished.status_code == 401 and "revoked when the run finished" in finished.text
    finished = client.post(path, json={})  # open mode: the admin gets the run's own answer
    assert finished.status_code == 409
    assert "already cancelled" in finished.json()["detail"]


def test_set_status_is_the_one_transition_function(client, db_session):
    """The supervisor's moves go through `set_status` too; it flushes but does not commit."""
    run = create_run(db_session, name="r", status="queued")
    run_id = run.id
    set_status(db_session, run, "starting")
    db_session.commit()
    set_status(db_session, run, "running")
    started = run.started_at
    run.heartbeat_at = run.started_at
    set_status(db_session, run, "queued", error="attempt 1 lost: no heartbeat for 60 s")
    assert (run.heartbeat_at, run.error) == (None, "attempt 1 lost: no heartbeat for 60 s")
    set_status(db_session, run, "starting")
    set_status(db_session, run, "running")
    assert run.started_at == started  # a resumed attempt keeps the first start
    set_status(db_session, run, "succeeded")
    assert run.error is None and run.finished_at is not None
    with pytest.raises(Conflict, match=f"run {run_id} cannot go from succeeded to running"):
        set_status(db_session, run, "running")
    db_session.commit()
    assert status_events(db_session, run_id) == [
        "starting",
        "running",
        "queued",
        "starting",
        "running",
        "succeeded",
    ]

    other = create_run(db_session, name="o", status="running")
    other_id = other.id
    set_status(db_session, other, "failed", error="boom")
    db_session.rollback()  # not committed by set_status: rolled back with the transaction
    assert client.get(f"/api/runs/{other_id}").json()["status"] == "running"
    assert all(not TRANSITIONS[s] for s in ("succeeded", "failed", "cancelled"))
