"""Multi-resolution roll-ups and the buckets read from them, against brute force in Python: every
bucket's min/max/mean/count/step/time over the points the documented rule puts in it, for
random series with spikes, replaced points, zoom windows, both x axes and resumed runs whose
wall time goes back; the roll-up rows themselves after random re-sends; and a constant number
of SQL statements for many series. SQLite and PostgreSQL."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import event

from tests.db.rollup_oracle import (
    LEVELS,
    assert_same_rollups,
    assert_series,
    expected_rollups,
    expected_series,
    stored_rollups,
)
from tests.factories import create_run

KEY = "train/loss"
T0 = 1.7e9


def _post(client, run_id: str, points: list[tuple[str, int, float, float]]) -> None:
    for start in range(0, len(points), 10_000):
        body = [
            {"key": key, "step": s, "value": v, "time": t}
            for key, s, v, t in points[start : start + 10_000]
        ]
        response = client.post(f"/api/runs/{run_id}/metrics", json={"points": body})
        assert response.status_code == 200, response.text


def _compare(client, runs: list[str], keys: list[str], **params) -> list[dict]:
    response = client.get(
        "/api/compare", params={"runs": ",".join(runs), "keys": ",".join(keys), **params}
    )
    assert response.status_code == 200, response.text
    return response.json()["series"]


def _series(rng: random.Random, count: int, start: int = 0) -> dict[int, tuple[float, float]]:
    """{step: (value, time)}: gaps, noise, a few one-step spikes and dips, uneven time."""
    steps = sorted(rng.sample(range(start, start + count * 3), count))
    t = T0
    out: dict[int, tuple[float, float]] = {}
    for s in steps:
        t += rng.uniform(0.01, 1.0) if rng.random() > 0.001 else 500.0  # rare pauses
        value = rng.gauss(1.0, 0.1)
        if rng.random() < 0.002:
            value = rng.choice([1e3, -1e3]) * rng.uniform(1, 2)
        out[s] = (value, t)
    return out


def _points(by_step: dict[int, tuple[float, float]]) -> list[tuple[int, float, float]]:
    return [(s, v, t) for s, (v, t) in sorted(by_step.items())]


def _as_batch(key: str, by_step: dict[int, tuple[float, float]], rng: random.Random | None = None):
    rows = [(key, s, v, t) for s, (v, t) in by_step.items()]
    if rng is not None:
        rng.shuffle(rows)
    return rows


def test_rollups_stay_exact_when_points_are_replaced(client, db_session):
    rng = random.Random(5)
    run_id = create_run(db_session, name="replaced", status="running").id
    series = {KEY: _series(rng, 6_000), "other": _series(rng, 700, start=10**6)}
    for key, by_step in series.items():
        _post(client, run_id, _as_batch(key, by_step, rng))
    for _ in range(4):  # re-sent points: new values (spikes included) and new times
        for key, by_step in series.items():
            chosen = rng.sample(sorted(by_step), 300)
            for s in chosen:
                by_step[s] = (rng.choice([rng.gauss(0, 1), 5e3, -5e3]), T0 + rng.uniform(0, 1e4))
            _post(client, run_id, [(key, s, *by_step[s]) for s in chosen])
    db_session.expire_all()
    expected = expected_rollups({(run_id, key): by_step for key, by_step in series.items()})
    assert_same_rollups(stored_rollups(db_session), expected)


def _check(client, run_id: str, points, windows, context: str) -> None:
    for x, n, window in windows:
        (got,) = _compare(client, [run_id], [KEY], max_points=n, x=x, **window)
        want = expected_series(points, n, x, **window)
        assert len(got["step"]) <= n
        assert_series(got, want, (context, x, n, window))
        assert got["points"] == sum(
            1
            for s, _, t in points
            if window.get("min_step", -1) <= s <= window.get("max_step", 2**63)
            and window.get("min_time", -1e300) <= t <= window.get("max_time", 1e300)
        )


def test_buckets_match_brute_force_on_random_series_and_windows(client, db_session):
    rng = random.Random(17)
    run_id = create_run(db_session, name="random", status="running").id
    by_step = _series(rng, 12_000, start=37)
    _post(client, run_id, _as_batch(KEY, by_step, rng))
    # replace some points, spikes among them
    for s in rng.sample(sorted(by_step), 200):
        by_step[s] = (rng.choice([2e3, -2e3, 0.5]), by_step[s][1])
    _post(client, run_id, [(KEY, s, v, t) for s, (v, t) in by_step.items() if abs(v) >= 0.5])
    points = _points(by_step)
    steps = [s for s, _, _ in points]
    times = sorted(t for _, _, t in points)
    windows: list[tuple[str, int, dict]] = []
    for n in (1, 3, 50, 333, 1000, 4000, 10_000):
        for x in ("step", "time"):
            windows.append((x, n, {}))
    for _ in range(12):
        a, b = sorted(rng.sample(range(steps[0], steps[-1]), 2))
        ta, tb = sorted(rng.sample(times, 2))
        n = rng.choice([5, 64, 200, 1000, 2500])
        windows.append(("step", n, {"min_step": a, "max_step": b}))
        windows.append(("step", n, {"min_step": a}))
        windows.append(("time", n, {"min_time": ta, "max_time": tb}))
        windows.append(("time", n, {"max_time": tb}))
        windows.append(("time", n, {"min_time": ta - 1e5, "max_time": tb}))  # beyond the data
    # the other axis' filters too (answered from the raw points)
    windows.append(("step", 100, {"min_time": times[100], "max_time": times[9000]}))
    windows.append(("time", 100, {"min_step": steps[100], "max_step": steps[9000]}))
    _check(client, run_id, points, windows, "random")


@pytest.mark.parametrize("later", [True, False], ids=["time-jumps-ahead", "time-goes-back"])
def test_a_resumed_run_whose_wall_time_jumps(client, db_session, later):
    """Attempt 1 logs steps 0..11,999; attempt 2 resumes from step 8,000 and re-logs up to 9,999
    — with times after attempt 1's last, or with times before it (attempt 1's steps 10,000 on
    keep their later times: time is not monotonic in the step)."""
    rng = random.Random(23)
    run_id = create_run(db_session, name="resumed", status="running").id
    by_step = {s: (1.0 + 0.01 * rng.random(), T0 + s * 0.5) for s in range(12_000)}
    _post(client, run_id, _as_batch(KEY, by_step))
    start = T0 + 12_000 * 0.5 + 3_600 if later else T0 + 9_000 * 0.5
    attempt2 = {
        s: (0.5 + 0.01 * rng.random(), start + (s - 8_000) * 0.2) for s in range(8_000, 10_000)
    }
    attempt2[9_123] = (777.0, attempt2[9_123][1])  # a one-step spike in attempt 2
    by_step.update(attempt2)
    _post(client, run_id, _as_batch(KEY, attempt2, rng))
    db_session.expire_all()
    assert_same_rollups(stored_rollups(db_session), expected_rollups({(run_id, KEY): by_step}))
    points = _points(by_step)
    spike_time = by_step[9_123][1]
    windows: list[tuple[str, int, dict]] = []
    for n in (2, 10, 100, 500, 1000, 3000):
        windows += [("step", n, {}), ("time", n, {})]
        windows.append(("time", n, {"min_time": spike_time - 50, "max_time": spike_time + 50}))
        windows.append(("time", n, {"min_time": T0 + 4_400, "max_time": T0 + 4_700}))
        windows.append(("step", n, {"min_step": 7_000, "max_step": 10_500}))
    _check(client, run_id, points, windows, f"resumed later={later}")
    for x, n, window in windows:
        if window.get("min_step", 0) <= 9_123 <= window.get("max_step", 10**9) and window.get(
            "min_time", 0
        ) <= spike_time <= window.get("max_time", 1e300):
            (got,) = _compare(client, [run_id], [KEY], max_points=n, x=x, **window)
            assert 777.0 in got["max"], (x, n, window)


def test_a_one_step_spike_is_always_some_buckets_max(client, db_session):
    rng = random.Random(31)
    run_id = create_run(db_session, name="spike", status="running").id
    by_step = {s: (rng.gauss(0, 0.01), T0 + s * 0.25) for s in range(30_000)}
    spike = 21_077
    by_step[spike] = (99.0, by_step[spike][1])
    _post(client, run_id, _as_batch(KEY, by_step))
    for _ in range(25):
        n = rng.choice([1, 2, 7, 100, 640, 1000, 2000, 4000])
        a = rng.randrange(0, spike + 1)
        b = rng.randrange(spike, 30_000)
        for x, window in (
            ("step", {"min_step": a, "max_step": b}),
            ("step", {}),
            ("time", {"min_time": by_step[a][1], "max_time": by_step[b][1]}),
            ("time", {}),
        ):
            (got,) = _compare(client, [run_id], [KEY], max_points=n, x=x, **window)
            assert max(got["max"]) == 99.0, (x, n, window)


def _count_statements(client, call) -> int:
    engine = client.app.state.engine
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", before)
    return len(seen)


def test_many_series_take_a_constant_number_of_statements(client, db_session):
    rng = random.Random(41)
    keys = [f"sweep/k{i}" for i in range(4)]
    runs = [create_run(db_session, name=f"sweep-{i}", status="running").id for i in range(100)]
    data: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for run_id in runs:
        batch = []
        for key in keys:
            data[(run_id, key)] = {s: (rng.random(), T0 + s) for s in range(0, 3_000, 7)}
            batch += _as_batch(key, data[(run_id, key)])
        _post(client, run_id, batch)
    (wide,) = [create_run(db_session, name="wide", status="running").id]
    wide_keys = [f"run/k{i:02d}" for i in range(20)]
    batch = []
    for key in wide_keys:
        data[(wide, key)] = {s: (rng.random(), T0 + s * 0.1) for s in range(5_000)}
        batch += _as_batch(key, data[(wide, key)])
    _post(client, wide, batch)

    counts = {}
    for x in ("step", "time"):
        for name, run_ids, key_list in (
            ("one", runs[:1], keys[:1]),
            ("sweep", runs, keys),
            ("wide", [wide], wide_keys),
        ):
            result: dict[str, list] = {}

            def call(run_ids=run_ids, key_list=key_list, x=x, result=result) -> None:
                result["series"] = _compare(client, run_ids, key_list, max_points=100, x=x)

            counts[(x, name)] = _count_statements(client, call)
            got = result["series"]
            assert len(got) == len(run_ids) * len(key_list)
            for series in got[:: max(1, len(got) // 9)]:
                points = _points(data[(series["run_id"], series["key"])])
                assert_series(series, expected_series(points, 100, x), (x, name, series["key"]))
    # x = step: the same statements for 1 series as for 400 or 20; x = time: at most one
    # per roll-up level visited (a level no series needs is skipped), never one per series
    assert counts[("step", "sweep")] == counts[("step", "one")] == counts[("step", "wide")]
    # auth/run lookups + bounds + the levels + raw points + listed points
    assert max(counts.values()) <= 4 + len(LEVELS) + 2, counts
