"""POST /api/runs/{id}/metrics, GET /api/runs/{id}/metrics and .../metrics/keys, on SQLite and
PostgreSQL (the `client` fixture runs each test on both)."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select

from kdlab.backend.db.models import Metric
from kdlab.backend.services.auth import create_token
from tests.factories import create_run


def _run(db_session, status: str = "running", name: str = "run") -> str:
    return create_run(db_session, name=name, status=status).id


def _stored(db_session, run_id: str) -> dict[tuple[str, int], tuple[float, float]]:
    """(key, step) -> (value, wall_time) as the database holds them; ends its transaction."""
    rows = db_session.execute(
        select(Metric.key, Metric.step, Metric.value, Metric.wall_time).where(
            Metric.run_id == run_id
        )
    ).all()
    db_session.rollback()  # SQLite: never hold a transaction while the app writes
    return {(key, step): (value, wall_time) for key, step, value, wall_time in rows}


def _token(db_session, run_id: str) -> dict[str, str]:
    token = create_token(db_session, "worker", scope="run", run_id=run_id)
    db_session.commit()
    return {"Authorization": f"Bearer {token}"}


def _post_raw(client, run_id: str, body: dict, **kwargs):
    """Python's json writes NaN/Infinity tokens, as a careless client would."""
    return client.post(
        f"/api/runs/{run_id}/metrics",
        content=json.dumps(body),
        headers={"content-type": "application/json", **kwargs.pop("headers", {})},
        **kwargs,
    )


def test_points_are_stored_and_read_back(client, db_session):
    run_id = _run(db_session)
    before = time.time()
    points = [
        {"key": "train/loss_total", "step": 0, "value": 2.5, "time": 1763900000.0},
        {"key": "train/loss_total", "step": 10, "value": 1.25, "time": 1763900010.5},
        {"key": "train/kd/output~output", "step": 10, "value": 0.5},  # time defaults to now
    ]
    response = client.post(f"/api/runs/{run_id}/metrics", json={"points": points})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 3}

    stored = _stored(db_session, run_id)
    assert stored[("train/loss_total", 0)] == (2.5, 1763900000.0)
    assert stored[("train/loss_total", 10)] == (1.25, 1763900010.5)
    value, wall_time = stored[("train/kd/output~output", 10)]
    assert value == 0.5 and before <= wall_time <= time.time()

    body = client.get(f"/api/runs/{run_id}/metrics", params={"keys": "train/loss_total"}).json()
    assert body == {
        "series": [
            {
                "run_id": run_id,
                "key": "train/loss_total",
                "step": [0, 10],
                "time": [1763900000.0, 1763900010.5],
                "value": [2.5, 1.25],
                "min": [2.5, 1.25],
                "max": [2.5, 1.25],
                "points": 2,
            }
        ]
    }
    every_key = client.get(f"/api/runs/{run_id}/metrics").json()["series"]
    assert [s["key"] for s in every_key] == ["train/kd/output~output", "train/loss_total"]


def test_reposting_stores_each_point_once_and_the_last_write_wins(client, db_session):
    run_id = _run(db_session)
    first = [
        {"key": "train/lr", "step": s, "value": float(s), "time": 100.0 + s} for s in range(50)
    ]
    second = [{**p, "value": p["value"] + 0.5, "time": p["time"] + 1} for p in first[25:]]
    for batch in (first, first, second):
        response = client.post(f"/api/runs/{run_id}/metrics", json={"points": batch})
        assert response.json() == {"accepted": len(batch)}

    stored = _stored(db_session, run_id)
    assert len(stored) == 50
    assert db_session.scalar(select(func.count()).select_from(Metric)) == 50
    db_session.rollback()
    for step in range(50):
        expected = (step + 0.5, 101.0 + step) if step >= 25 else (float(step), 100.0 + step)
        assert stored[("train/lr", step)] == expected


def test_a_point_repeated_inside_one_batch_is_stored_once_with_its_last_value(client, db_session):
    run_id = _run(db_session)
    points = [
        {"key": "eval/acc", "step": 3, "value": 0.1, "time": 1.0},
        {"key": "eval/acc", "step": 3, "value": 0.2, "time": 2.0},
    ]
    response = client.post(f"/api/runs/{run_id}/metrics", json={"points": points})
    assert response.json() == {"accepted": 2}
    assert _stored(db_session, run_id) == {("eval/acc", 3): (0.2, 2.0)}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_refuse_the_whole_batch(client, db_session, bad):
    run_id = _run(db_session)
    points = [{"key": "train/loss_total", "step": s, "value": 1.0} for s in range(6)]
    points[3]["value"] = bad
    response = _post_raw(client, run_id, {"points": points})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "points", 3, "value"]
    word = {"nan": "NaN", "inf": "inf", "-inf": "-inf"}[str(bad)]
    assert error["msg"].startswith(f"points[3].value for train/loss_total is {word}; ")
    assert "nothing from this batch was stored" in error["msg"]
    assert _stored(db_session, run_id) == {}


def test_every_non_finite_point_is_named_and_a_nan_time_is_refused_too(client, db_session):
    run_id = _run(db_session)
    points = [
        {"key": "a", "step": 0, "value": float("nan")},
        {"key": "b", "step": 0, "value": 1.0},
        {"key": "c", "step": 0, "value": 1.0, "time": float("inf")},
    ]
    response = _post_raw(client, run_id, {"points": points})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [
        ["body", "points", 0, "value"],
        ["body", "points", 2, "time"],
    ]
    assert _stored(db_session, run_id) == {}


@pytest.mark.parametrize("value", ["nan", "0.5", True, None, [1.0]])
def test_values_must_be_json_numbers(client, db_session, value):
    """kdlab.worker.metrics.JsonlSink writes non-finite values as strings; replaying that file must not
    sneak a NaN in, nor a number in quotes."""
    run_id = _run(db_session)
    points = [{"key": "train/loss_total", "step": 0, "value": value}]
    response = client.post(f"/api/runs/{run_id}/metrics", json={"points": points})
    assert response.status_code == 422
    assert _stored(db_session, run_id) == {}


def test_only_the_runs_own_token_or_an_admin_may_post(client, db_session):
    run_id = _run(db_session, name="mine")
    other_id = _run(db_session, name="other")
    own, others = _token(db_session, run_id), _token(db_session, other_id)
    body = {"points": [{"key": "train/lr", "step": 1, "value": 0.1}]}

    refused = client.post(f"/api/runs/{run_id}/metrics", json=body, headers=others)
    assert refused.status_code == 403
    assert other_id in refused.json()["detail"]
    assert client.get(f"/api/runs/{run_id}/metrics", headers=others).status_code == 403
    assert client.get(f"/api/runs/{run_id}/metrics/keys", headers=others).status_code == 403
    assert _stored(db_session, run_id) == {}

    bad_body = {"points": [{"key": "bad key", "step": -1, "value": 0.1}]}
    wrong_token_bad_body = client.post(f"/api/runs/{run_id}/metrics", json=bad_body, headers=others)
    assert wrong_token_bad_body.status_code == 403  # the token is checked before the body
    assert client.post(f"/api/runs/{run_id}/metrics", json=body, headers=own).status_code == 200
    assert client.get(f"/api/runs/{run_id}/metrics", headers=own).status_code == 200
    assert client.post(f"/api/runs/{run_id}/metrics", json=body).status_code == 200  # admin
    assert len(_stored(db_session, run_id)) == 1


def test_unknown_run_is_404(client):
    body = {"points": [{"key": "train/lr", "step": 1, "value": 0.1}]}
    assert client.post("/api/runs/nope/metrics", json=body).status_code == 404
    assert client.get("/api/runs/nope/metrics").status_code == 404
    assert client.get("/api/runs/nope/metrics/keys").status_code == 404


def test_too_many_points_in_one_batch_is_413(client, db_session):
    run_id = _run(db_session)
    client.app.state.settings.max_metric_batch = 5
    points = [{"key": "train/lr", "step": s, "value": 0.1} for s in range(6)]
    response = client.post(f"/api/runs/{run_id}/metrics", json={"points": points})
    assert response.status_code == 413
    assert "the limit is 5" in response.json()["detail"]
    assert client.post(f"/api/runs/{run_id}/metrics", json={"points": points[:5]}).json() == {
        "accepted": 5
    }


@pytest.mark.parametrize(
    "key", ["", "train loss", "train/loss?", "ünïcode", "a" * 251, "x;DROP TABLE metrics"]
)
def test_bad_keys_are_422(client, db_session, key):
    run_id = _run(db_session)
    points = [{"key": "train/ok", "step": 0, "value": 1.0}, {"key": key, "step": 0, "value": 1.0}]
    response = client.post(f"/api/runs/{run_id}/metrics", json={"points": points})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "points", 1, "key"]
    assert _stored(db_session, run_id) == {}


def test_keys_with_every_allowed_character_are_accepted(client, db_session):
    run_id = _run(db_session)
    keys = ["train/kd/layer1.0~layer1.0", "sys/step_time_ms", "eval/top-1", "a" * 250]
    points = [{"key": key, "step": 0, "value": 1.0} for key in keys]
    assert client.post(f"/api/runs/{run_id}/metrics", json={"points": points}).status_code == 200
    assert {key for key, _ in _stored(db_session, run_id)} == set(keys)


@pytest.mark.parametrize("step", [-1, 1.5, "3", True, 2**63])
def test_steps_must_be_non_negative_integers(client, db_session, step):
    run_id = _run(db_session)
    points = [{"key": "train/lr", "step": step, "value": 1.0}]
    response = client.post(f"/api/runs/{run_id}/metrics", json={"points": points})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "points", 0, "step"]
    assert _stored(db_session, run_id) == {}


def test_a_finished_run_refuses_new_points(client, db_session):
    body = {"points": [{"key": "train/lr", "step": 1, "value": 0.1}]}
    for status in ("succeeded", "failed", "cancelled"):
        run_id = _run(db_session, status=status, name=status)
        response = client.post(f"/api/runs/{run_id}/metrics", json=body)
        assert response.status_code == 409, status
        assert status in response.json()["detail"]
        assert _stored(db_session, run_id) == {}
    for status in ("queued", "starting", "running"):
        run_id = _run(db_session, status=status, name=status)
        assert client.post(f"/api/runs/{run_id}/metrics", json=body).status_code == 200


def test_keys_list_counts_and_last_points(client, db_session):
    run_id = _run(db_session)
    points = [
        {"key": "train/loss_total", "step": s, "value": 10.0 - s, "time": 1000.0 + s}
        for s in range(0, 100, 10)
    ] + [{"key": "eval/student_acc", "step": 99, "value": 0.75, "time": 2000.0}]
    client.post(f"/api/runs/{run_id}/metrics", json={"points": points})
    other = _run(db_session, name="other")
    client.post(f"/api/runs/{other}/metrics", json={"points": points[:3]})

    body = client.get(f"/api/runs/{run_id}/metrics/keys").json()
    assert body == {
        "run_id": run_id,
        "keys": [
            {
                "key": "eval/student_acc",
                "count": 1,
                "last_step": 99,
                "last_value": 0.75,
                "last_time": 2000.0,
            },
            {
                "key": "train/loss_total",
                "count": 10,
                "last_step": 90,
                "last_value": -80.0,
                "last_time": 1090.0,
            },
        ],
    }
    empty = _run(db_session, name="empty")
    assert client.get(f"/api/runs/{empty}/metrics/keys").json() == {"run_id": empty, "keys": []}


def test_reading_a_run_checks_its_query(client, db_session):
    run_id = _run(db_session)
    url = f"/api/runs/{run_id}/metrics"
    cap = client.app.state.settings.max_points_per_query
    too_many = client.get(url, params={"max_points": cap + 1})
    assert too_many.status_code == 422
    assert too_many.json()["detail"][0]["loc"] == ["query", "max_points"]
    assert client.get(url, params={"max_points": cap}).status_code == 200
    assert client.get(url, params={"max_points": 0}).status_code == 422
    assert client.get(url, params={"x": "epoch"}).status_code == 422
    assert client.get(url, params={"keys": "bad key"}).status_code == 422
    reversed_range = client.get(url, params={"min_step": 10, "max_step": 5})
    assert reversed_range.status_code == 422
    assert reversed_range.json()["detail"][0]["loc"] == ["query", "min_step"]


@pytest.mark.parametrize("body", [b"", b"{not json", b'{"points": "many"}', b'{"point": []}'])
def test_a_body_that_is_not_a_batch_is_422_without_echoing_it(client, db_session, body):
    run_id = _run(db_session)
    response = client.post(
        f"/api/runs/{run_id}/metrics", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    (first, *_) = response.json()["detail"]
    assert first["loc"][0] == "body"
    if first["type"] == "json_invalid":
        assert first["input"] == {}


def test_the_batch_body_is_documented_in_openapi(client):
    spec = client.get("/api/openapi.json").json()
    body = spec["paths"]["/api/runs/{run_id}/metrics"]["post"]["requestBody"]
    point = body["content"]["application/json"]["schema"]["properties"]["points"]["items"]
    assert set(point["properties"]) == {"key", "step", "value", "time"}
    assert point["properties"]["key"]["pattern"] == "^[A-Za-z0-9_./~-]+$"
