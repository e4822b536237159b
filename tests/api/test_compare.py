"""GET /api/compare: SQL-side downsampling checked against numpy on the same points, on SQLite
and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from kdlab.backend.services.auth import create_token
from tests.db.rollup_oracle import assert_series, expected_series
from tests.factories import create_run

KEY = "train/loss_total"


def _run(db_session, name: str = "run") -> str:
    return create_run(db_session, name=name, status="running").id


def _post(client, run_id: str, key: str, steps, values, times=None) -> None:
    times = np.asarray(times if times is not None else 1.7e9 + np.asarray(steps) * 0.5)
    points = [
        {"key": key, "step": int(s), "value": float(v), "time": float(t)}
        for s, v, t in zip(steps, values, times, strict=True)
    ]
    for start in range(0, len(points), 10_000):
        response = client.post(
            f"/api/runs/{run_id}/metrics", json={"points": points[start : start + 10_000]}
        )
        assert response.status_code == 200, response.text


def _compare(client, runs, keys, **params):
    response = client.get(
        "/api/compare", params={"runs": ",".join(runs), "keys": ",".join(keys), **params}
    )
    assert response.status_code == 200, response.text
    return response.json()["series"]


FINEST = 16  # the documented finest roll-up level (block width in steps)


def _step_buckets(steps: np.ndarray, lo: int, hi: int, max_points: int) -> np.ndarray:
    """The documented bucket of each step: W = the smallest power of two with at most
    max_points buckets `s // W - lo // W`; those buckets when W ≥ the finest roll-up level,
    otherwise equal step ranges."""
    width = 1
    while hi // width - lo // width + 1 > max_points:
        width *= 2
    if width >= FINEST:
        return steps // width - lo // width
    return (steps - lo) * max_points // (hi - lo + 1)


def _expected_buckets(bucket: np.ndarray, steps, times, values) -> dict[str, list]:
    """Per non-empty bucket, in order: what the API must answer, computed with numpy."""
    steps, times, values = np.asarray(steps), np.asarray(times), np.asarray(values)
    out: dict[str, list] = {k: [] for k in ("step", "time", "value", "min", "max")}
    for b in np.unique(bucket):
        inside = bucket == b
        out["step"].append(int(steps[inside].max()))
        out["time"].append(float(times[inside].max()))
        out["value"].append(float(values[inside].mean()))
        out["min"].append(float(values[inside].min()))
        out["max"].append(float(values[inside].max()))
    return out


def _assert_series_equal(series: dict, expected: dict[str, list]) -> None:
    assert series["step"] == expected["step"]
    assert series["time"] == expected["time"]
    assert series["min"] == expected["min"]
    assert series["max"] == expected["max"]
    np.testing.assert_allclose(series["value"], expected["value"], rtol=1e-12, atol=0)


def test_a_one_step_spike_and_dip_survive_downsampling(client, db_session):
    rng = np.random.default_rng(7)
    n_points = 20_000
    steps = np.arange(n_points)
    values = 1.0 + 0.05 * rng.standard_normal(n_points)
    spike_step, dip_step = (int(s) for s in rng.choice(n_points, size=2, replace=False))
    values[spike_step] = 1e3
    values[dip_step] = -1e3
    run_id = _run(db_session)
    _post(client, run_id, KEY, steps, values)

    (series,) = _compare(client, [run_id], [KEY], max_points=100)
    assert series["run_id"] == run_id and series["key"] == KEY
    assert 0 < len(series["step"]) <= 100
    assert all(len(series[k]) == len(series["step"]) for k in ("time", "value", "min", "max"))
    # the spike is a bucket max, in the bucket that holds its step; the dip likewise a min
    bucket = _step_buckets(steps, 0, n_points - 1, 100)  # every bucket holds points
    assert series["max"][int(bucket[spike_step])] == 1e3
    assert series["min"][int(bucket[dip_step])] == -1e3
    assert max(series["max"]) == 1e3 and min(series["min"]) == -1e3
    # while the means smooth both away
    assert max(series["value"]) < 20 and min(series["value"]) > -20


def test_step_buckets_match_numpy(client, db_session):
    rng = np.random.default_rng(11)
    steps = np.sort(rng.choice(50_000, size=7_000, replace=False)) + 123  # gaps, offset start
    values = rng.standard_normal(steps.size) * 3 + np.linspace(5, 0, steps.size)
    times = 1.7e9 + np.cumsum(rng.uniform(0.01, 2.0, steps.size))
    run_id = _run(db_session)
    _post(client, run_id, KEY, steps, values, times)

    for max_points in (1, 7, 100, 999):
        (series,) = _compare(client, [run_id], [KEY], max_points=max_points)
        lo, hi = steps.min(), steps.max()
        bucket = _step_buckets(steps, lo, hi, max_points)
        assert len(series["step"]) <= max_points
        _assert_series_equal(series, _expected_buckets(bucket, steps, times, values))


def test_time_buckets_follow_the_rule_and_keep_every_point_once(client, db_session):
    rng = np.random.default_rng(12)
    steps = np.arange(5_000)
    # uneven logging and a pause in the middle: the blocks across it span an hour, so they
    # are split down to their points
    gaps = rng.uniform(0.05, 0.2, steps.size)
    gaps[2_500] = 3_600.0
    times = 1.7e9 + np.cumsum(gaps)
    values = rng.standard_normal(steps.size)
    values[1_234] = 50.0  # a one-step spike
    run_id = _run(db_session)
    _post(client, run_id, KEY, steps, values, times)

    points = [(int(s), float(v), float(t)) for s, v, t in zip(steps, values, times, strict=True)]
    lo, hi = times.min(), times.max()
    for max_points in (7, 64, 1_000):
        (series,) = _compare(client, [run_id], [KEY], max_points=max_points, x="time")
        assert_series(series, expected_series(points, max_points, x="time"), max_points)
        assert 0 < len(series["step"]) <= max_points and series["points"] == steps.size
        assert series["time"] == sorted(series["time"])
        assert max(series["max"]) == 50.0 and min(series["min"]) == values.min()
        # each bucket's latest time lies in its own time slice: its position on the chart
        width = (hi - lo) / max_points
        slices = np.minimum(np.floor((np.asarray(series["time"]) - lo) / width), max_points - 1)
        assert len(set(slices.tolist())) == len(slices)


def test_a_short_series_comes_back_unchanged(client, db_session):
    run_id = _run(db_session)
    steps, values = [0, 1, 1_000, 5_000], [4.0, 3.0, 2.0, 1.0]
    times = [10.0, 11.0, 12.0, 13.0]
    _post(client, run_id, KEY, steps, values, times)
    expected = {"step": steps, "time": times, "value": values, "min": values, "max": values}
    # 4 points ≤ max_points: all of them, although steps 0 and 1 share a bucket of 1/5th
    for max_points in (4, 5, 1_000):
        for x in ("step", "time"):
            (series,) = _compare(client, [run_id], [KEY], max_points=max_points, x=x)
            assert {k: series[k] for k in expected} == expected
    # 4 points > 3: buckets of 5001 / 3 = 1667 steps hold steps {0, 1, 1000}, {}, {5000}
    (merged,) = _compare(client, [run_id], [KEY], max_points=3)
    assert merged["step"] == [1_000, 5_000] and merged["time"] == [12.0, 13.0]
    assert merged["value"] == [3.0, 1.0]
    assert merged["min"] == [2.0, 1.0] and merged["max"] == [4.0, 1.0]


def test_zooming_refines_the_buckets_inside_the_range(client, db_session):
    steps = np.arange(10_000)
    values = np.sin(steps / 50.0)
    run_id = _run(db_session)
    _post(client, run_id, KEY, steps, values)

    (zoomed,) = _compare(client, [run_id], [KEY], max_points=100, min_step=2_000, max_step=2_999)
    assert len(zoomed["step"]) == 63  # 16-step buckets: 2,000 // 16 = 125 … 2,999 // 16 = 187
    assert zoomed["step"][0] >= 2_000 and zoomed["step"][-1] == 2_999
    inside = (steps >= 2_000) & (steps <= 2_999)
    bucket = _step_buckets(steps[inside], 2_000, 2_999, 100)
    (equal,) = _compare(client, [run_id], [KEY], max_points=100, min_step=2_000, max_step=2_499)
    assert len(equal["step"]) == 100  # W would be 8 < 16: equal ranges of 5 steps
    expected = _expected_buckets(bucket, steps[inside], 1.7e9 + steps[inside] * 0.5, values[inside])
    _assert_series_equal(zoomed, expected)

    (raw,) = _compare(client, [run_id], [KEY], max_points=100, min_step=500, max_step=549)
    assert raw["step"] == list(range(500, 550))
    t0 = 1.7e9 + 500 * 0.5
    (by_time,) = _compare(
        client, [run_id], [KEY], max_points=100, x="time", min_time=t0, max_time=t0 + 10
    )
    assert by_time["step"] == list(range(500, 521))


def test_series_come_run_by_run_then_key_by_key(client, db_session):
    first, second = _run(db_session, "first"), _run(db_session, "second")
    _post(client, first, "a", [0, 1], [1.0, 2.0])
    _post(client, first, "b", [0], [3.0])
    _post(client, second, "a", [5], [4.0])
    series = _compare(client, [second, first], ["b", "a"], max_points=10)
    assert [(s["run_id"], s["key"]) for s in series] == [
        (second, "b"),
        (second, "a"),
        (first, "b"),
        (first, "a"),
    ]
    assert series[0]["step"] == [] and series[0]["value"] == []  # no such key in that run
    assert series[1]["value"] == [4.0]
    assert series[3]["value"] == [1.0, 2.0]


def test_compare_refusals(client, db_session):
    run_id = _run(db_session)
    _post(client, run_id, KEY, [0], [1.0])
    cap = client.app.state.settings.max_points_per_query

    def get(**params):
        return client.get("/api/compare", params={"runs": run_id, "keys": KEY, **params})

    assert get().status_code == 200
    unknown = client.get("/api/compare", params={"runs": f"{run_id},nope", "keys": KEY})
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    over = get(max_points=cap + 1)
    assert over.status_code == 422
    assert over.json()["detail"][0]["loc"] == ["query", "max_points"]
    assert str(cap) in over.json()["detail"][0]["msg"]
    assert get(x="epoch").status_code == 422
    assert get(min_step=-1).status_code == 422
    assert client.get("/api/compare", params={"runs": run_id}).status_code == 422
    assert client.get("/api/compare", params={"runs": " , ", "keys": KEY}).status_code == 422
    assert client.get("/api/compare", params={"runs": run_id, "keys": "a b"}).status_code == 422
    many = ",".join(f"run{i}" for i in range(401))
    too_many = client.get("/api/compare", params={"runs": many, "keys": KEY})
    assert too_many.status_code == 422 and "400 series" in too_many.text


def test_a_run_token_may_only_compare_its_own_run(client, db_session):
    mine, other = _run(db_session, "mine"), _run(db_session, "other")
    token = create_token(db_session, "worker", scope="run", run_id=mine)
    db_session.commit()
    headers = {"Authorization": f"Bearer {token}"}
    ok = client.get("/api/compare", params={"runs": mine, "keys": KEY}, headers=headers)
    assert ok.status_code == 200
    both = client.get(
        "/api/compare", params={"runs": f"{mine},{other}", "keys": KEY}, headers=headers
    )
    assert both.status_code == 403


@pytest.mark.parametrize("x", ["step", "time"])
def test_buckets_never_exceed_max_points(client, db_session, x):
    rng = np.random.default_rng(3)
    steps = np.unique(rng.integers(0, 10**9, size=3_000))  # a sparse, huge step range
    values = rng.standard_normal(steps.size)
    times = 1.7e9 + rng.uniform(0, 1e5, steps.size)  # times unrelated to steps
    run_id = _run(db_session)
    _post(client, run_id, KEY, steps, values, times)
    for max_points in (2, 3, 10, 2_999):
        (series,) = _compare(client, [run_id], [KEY], max_points=max_points, x=x)
        assert 0 < len(series["step"]) <= max_points
        assert max(series["max"]) == values.max() and min(series["min"]) == values.min()


def test_steps_spread_over_the_whole_bigint_range_still_bucket(client, db_session):
    """(hi - lo) · max_points would overflow 64 bits: the bucket is computed in doubles."""
    steps = [0, 10, 2**40, 2**61, 2**63 - 1]
    values = [5.0, -1.0, 2.0, 3.0, 7.0]
    run_id = _run(db_session)
    _post(client, run_id, KEY, steps, values, times=[1.0, 2.0, 3.0, 4.0, 5.0])
    (series,) = _compare(client, [run_id], [KEY], max_points=3)
    # thirds of [0, 2^63): {0, 10, 2^40, 2^61} | {} | {2^63 - 1}
    assert series["step"] == [2**61, 2**63 - 1]
    assert series["min"] == [-1.0, 7.0] and series["max"] == [5.0, 7.0]
    assert series["value"] == [2.25, 7.0]


def test_a_replaced_point_leaves_no_stale_extreme_in_the_rollups(client, db_session):
    steps = np.arange(20_000)
    values = np.zeros(steps.size)
    values[5_000] = 1e3
    run_id = _run(db_session)
    _post(client, run_id, KEY, steps, values)
    (before,) = _compare(client, [run_id], [KEY], max_points=100)
    assert max(before["max"]) == 1e3
    _post(client, run_id, KEY, [5_000], [-2.0])  # a resumed attempt re-logs the step
    (after,) = _compare(client, [run_id], [KEY], max_points=100)
    bucket = _step_buckets(steps, 0, 19_999, 100)
    assert max(after["max"]) == 0.0
    assert after["min"][int(bucket[5_000])] == -2.0
    assert sum(after["value"]) == pytest.approx(-2.0 / np.sum(bucket == bucket[5_000]))
