"""/api/runs: create, external runs, list, read, cancel, clone, delete, logs, live events."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from sqlalchemy import func, select

from kdlab.backend.db.models import ApiToken, Artifact, Metric, Run, RunEvent
from kdlab.backend.services.live import LiveWatcher
from kdlab.backend.services.run_events import event_stream
from tests.factories import DIGITS_KD, DIGITS_TEACHER, config, create_run

RUN_FIELDS = {
    "id",
    "name",
    "experiment",
    "kind",
    "status",
    "attempt",
    "config",
    "error",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "teacher_run_id",
    "cloned_from",
    "mlflow_run_id",
}


def test_create_queues_a_validated_run(client, db_session):
    response = client.post("/api/runs", json=DIGITS_TEACHER)
    assert response.status_code == 201, response.text
    run = response.json()
    assert set(run) >= RUN_FIELDS
    assert (run["name"], run["experiment"], run["kind"]) == ("digits-teacher", "digits-kd", "train")
    assert (run["status"], run["attempt"], run["error"]) == ("queued", 0, None)
    assert run["config"]["train"]["batch_size"] == 64  # stored resolved: defaults filled in
    assert run["config"]["resources"] == {"gpus": 0}
    assert datetime.fromisoformat(run["created_at"]).tzinfo is not None
    assert "token" not in run

    assert client.get(f"/api/runs/{run['id']}").json() == run
    second = client.post("/api/runs", json=config(DIGITS_TEACHER, name="again")).json()
    events = db_session.scalars(
        select(RunEvent.message).where(RunEvent.run_id == run["id"], RunEvent.kind == "status")
    ).all()
    experiments = {r.experiment_id for r in db_session.scalars(select(Run))}
    db_session.rollback()
    assert events == ["queued"]
    assert len(experiments) == 1  # get-or-create by name
    assert second["experiment"] == "digits-kd"


def test_external_run_gets_a_run_token_once(client, db_session):
    body = {"kind": "external", "name": "colab-run", "experiment": "ext", "params": {"lr": 0.1}}
    response = client.post("/api/runs", json=body)
    assert response.status_code == 201, response.text
    run = response.json()
    assert (run["kind"], run["status"], run["experiment"]) == ("external", "running", "ext")
    assert run["config"]["params"] == {"lr": 0.1}
    assert run["token"].startswith("kdl_")
    assert run["started_at"] is not None
    assert "token" not in client.get(f"/api/runs/{run['id']}").json()
    stored = db_session.execute(
        select(ApiToken.scope, ApiToken.token_hash).where(ApiToken.run_id == run["id"])
    ).all()
    db_session.rollback()
    assert len(stored) == 1 and stored[0].scope == "run"
    assert stored[0].token_hash != run["token"]  # only the hash is stored

    bad = client.post("/api/runs", json={"kind": "external", "name": "x", "epochs": 3})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "epochs"]
    # an external run is not a config: it cannot be cloned
    clone = client.post(f"/api/runs/{run['id']}/clone")
    assert clone.status_code == 409


def test_list_filters_pages_and_orders_newest_first(client, db_session):
    a = create_run(db_session, name="alpha-1", experiment="e1", status="queued")
    b = create_run(db_session, name="beta-1", experiment="e1", status="running")
    c = create_run(db_session, name="Alpha-2", experiment="e2", status="succeeded")
    d = create_run(db_session, name="ext", experiment="e2", kind="external", status="running")
    db_session.close()

    def ids(**params):
        body = client.get("/api/runs", params=params).json()
        return [r["id"] for r in body["runs"]], body["total"]

    assert ids() == ([d.id, c.id, b.id, a.id], 4)
    assert ids(experiment="e1") == ([b.id, a.id], 2)
    assert ids(status=["running", "succeeded"]) == ([d.id, c.id, b.id], 3)
    assert ids(kind="external") == ([d.id], 1)
    assert ids(q="alpha") == ([c.id, a.id], 2)
    assert ids(q="%") == ([], 0)  # LIKE wildcards are literal
    assert ids(limit=2, offset=1) == ([c.id, b.id], 4)
    assert client.get("/api/runs", params={"limit": 0}).status_code == 422
    assert client.get("/api/runs", params={"limit": 501}).status_code == 422
    assert client.get("/api/runs", params={"status": "bogus"}).status_code == 422


def test_unknown_run_is_404_naming_it(client):
    for method, path in (
        ("get", "/api/runs/nope"),
        ("post", "/api/runs/nope/cancel"),
        ("post", "/api/runs/nope/clone"),
        ("delete", "/api/runs/nope"),
        ("get", "/api/runs/nope/logs"),
        ("get", "/api/runs/nope/events?once=1"),
    ):
        response = client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert "'nope'" in response.json()["detail"]


def test_cancel_queued_running_and_finished(client, db_session):
    queued = create_run(db_session, name="q", status="queued")
    running = create_run(db_session, name="r", status="running")
    done = create_run(db_session, name="d", status="succeeded")
    db_session.close()

    cancelled = client.post(f"/api/runs/{queued.id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancel_requested"] is True
    assert cancelled["finished_at"] is not None

    asked = client.post(f"/api/runs/{running.id}/cancel").json()
    assert asked["status"] == "running"  # the worker stops it
    assert asked["cancel_requested"] is True
    assert asked["finished_at"] is None

    for run_id, status in ((done.id, "succeeded"), (queued.id, "cancelled")):
        response = client.post(f"/api/runs/{run_id}/cancel")
        assert response.status_code == 409
        assert response.json()["detail"] == f"run {run_id} already {status}"


def test_clone_revalidates_and_links_the_source(client, db_session):
    source = client.post("/api/runs", json=DIGITS_KD).json()
    clone = client.post(f"/api/runs/{source['id']}/clone", json={"name": "digits-kd-2"})
    assert clone.status_code == 201, clone.text
    body = clone.json()
    assert body["cloned_from"] == source["id"]
    assert (body["status"], body["name"]) == ("queued", "digits-kd-2")
    assert {**body["config"], "name": "digits-kd"} == source["config"]
    same_name = client.post(f"/api/runs/{source['id']}/clone").json()
    assert same_name["name"] == "digits-kd"

    broken_config = config(DIGITS_TEACHER, student={"name": "mlp", "params": {"hidden": [0]}})
    broken = create_run(db_session, name="broken", run_config=broken_config)
    db_session.close()
    response = client.post(f"/api/runs/{broken.id}/clone")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["config", "student", "params", "hidden", 0]
    assert (
        client.post(f"/api/runs/{source['id']}/clone", json={"name": "bad name"}).status_code == 422
    )
    assert client.get("/api/runs").json()["total"] == 4


def test_delete_finished_run_removes_rows_and_files(client, db_session, settings):
    running = create_run(db_session, name="r", status="running")
    done = create_run(db_session, name="d", status="failed")
    db_session.add_all(
        [
            Metric(run_id=done.id, key="train/loss_total", step=0, value=1.0, wall_time=0.0),
            RunEvent(run_id=done.id, kind="log", message="hello"),
            Artifact(
                run_id=done.id,
                name="best.safetensors",
                kind="checkpoint",
                sha256="0" * 64,
                size=1,
                path=f"{done.id}/best.safetensors",
            ),
        ]
    )
    db_session.commit()
    db_session.close()
    folder = settings.artifacts_dir / done.id
    folder.mkdir(parents=True)
    (folder / "best.safetensors").write_bytes(b"x")
    keep = settings.artifacts_dir / running.id
    keep.mkdir(parents=True)

    refused = client.delete(f"/api/runs/{running.id}")
    assert refused.status_code == 409
    assert "running" in refused.json()["detail"]

    assert client.delete(f"/api/runs/{done.id}").status_code == 204
    assert client.get(f"/api/runs/{done.id}").status_code == 404
    assert not folder.exists()
    assert keep.exists()
    counts = [
        db_session.scalar(select(func.count()).select_from(table).where(table.run_id == done.id))
        for table in (Metric, RunEvent, Artifact)
    ]
    db_session.rollback()
    assert counts == [0, 0, 0]


def test_logs_append_and_tail(client, db_session):
    run = create_run(db_session, name="r", status="running")
    db_session.close()
    lines = [f"line {i}" for i in range(5)]
    posted = client.post(f"/api/runs/{run.id}/logs", json={"lines": lines})
    assert posted.json() == {"accepted": 5}
    client.post(f"/api/runs/{run.id}/logs", json={"lines": ["boom"], "kind": "error"})
    assert client.get(f"/api/runs/{run.id}/logs").json() == {"lines": [*lines, "boom"]}
    assert client.get(f"/api/runs/{run.id}/logs?tail=2").json() == {"lines": ["line 4", "boom"]}
    assert client.get(f"/api/runs/{run.id}/logs?tail=0").status_code == 422
    assert client.post(f"/api/runs/{run.id}/logs", json={"lines": "x"}).status_code == 422


def _events(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body."""
    found = []
    for block in text.strip().split("\n\n"):
        event, data = None, []
        for line in block.splitlines():
            field, _, value = line.partition(": ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        if event is not None:
            found.append((event, "\n".join(data)))  # data lines join with newlines (SSE spec)
    return found


def test_events_once_then_following_the_run_until_it_finishes(client, db_session):
    """The stream polls with a short session each time: the test's own writes never wait."""
    run = create_run(db_session, name="r", status="running")
    db_session.close()
    client.post(f"/api/runs/{run.id}/logs", json={"lines": ["step 1", "step 2"]})
    response = client.get(f"/api/runs/{run.id}/events?once=1")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert events[0][0] == "status"
    assert json.loads(events[0][1])["status"] == "running"
    assert events[1:] == [("log", "step 1"), ("log", "step 2")]

    factory = client.app.state.session_factory

    async def follow() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        watcher = LiveWatcher(factory, interval=0.01)  # the stream is an async generator
        stream = event_stream(factory, run.id, watcher)
        first = _events(await anext(stream))
        with factory() as session:
            session.add(RunEvent(run_id=run.id, kind="log", message="epoch 1\nwith two lines"))
            row = session.get(Run, run.id)
            assert row is not None
            row.status = "succeeded"
            session.commit()
        rest = "".join([chunk async for chunk in stream])  # ends once the run is finished
        await watcher.stop()
        return first, _events(rest)

    first, rest = asyncio.run(follow())
    assert [e for e, _ in first] == ["status", "log", "log"]
    assert [e for e, _ in rest] == ["status", "log", "end"]
    assert json.loads(rest[0][1])["status"] == "succeeded"
    assert rest[1][1] == "epoch 1\nwith two lines"  # one data field per line
    # a finished run's stream (no ?once) ends on its own too
    assert (
        client.get(f"/api/runs/{run.id}/events").text.rstrip().endswith('{"status": "succeeded"}')
    )
