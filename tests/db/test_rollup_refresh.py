"""The ingest's roll-up refresh on dense series (every step logged, so a batch often holds whole
finest blocks and the refresh computes them from the batch alone) and on the edges of its reads:
unaligned batch boundaries, whole aligned ranges re-sent with new values and times, parts of a
block re-sent, scattered single points (more index ranges than one read takes), several keys in
one batch, the largest step. Every level's rows equal a brute-force computation over the points.
SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import random

from kdlab.backend.services.rollups import MAX_STEP, SPANS_PER_READ
from tests.db.rollup_oracle import assert_same_rollups, expected_rollups, stored_rollups
from tests.factories import create_run

T0 = 1.7e9


def _post(client, run_id: str, points: list[tuple[str, int, float, float]]) -> None:
    body = [{"key": k, "step": s, "value": v, "time": t} for k, s, v, t in points]
    response = client.post(f"/api/runs/{run_id}/metrics", json={"points": body})
    assert response.status_code == 200, response.text


def test_dense_series_stay_exact_under_every_kind_of_resend(client, db_session):
    rng = random.Random(11)
    run_id = create_run(db_session, name="dense", status="running").id
    series: dict[str, dict[int, tuple[float, float]]] = {"a": {}, "b": {}}

    def send(points: list[tuple[str, int]]) -> None:
        batch = []
        for key, step in points:
            value = (
                rng.choice([rng.gauss(1, 0.1), 1e4, -1e4])
                if rng.random() < 0.05
                else (rng.gauss(1, 0.1))
            )
            series[key][step] = (value, T0 + rng.uniform(0, 1e5))
            batch.append((key, step, *series[key][step]))
        _post(client, run_id, batch)

    # every step of two keys, in batches whose edges fall inside blocks
    edges = [0, 1003, 2050, 4096, 5000, 8191, 9999, 12_000]
    for low, high in itertools.pairwise(edges):
        send([(key, s) for s in range(low, high) for key in ("a", "b")])
    # whole aligned ranges again (finest blocks from the batch alone), and an unaligned one
    send([("a", s) for s in range(4096, 8192)])
    send([("b", s) for s in range(16, 48)] + [("a", s) for s in range(7, 9)])
    send([("a", s) for s in range(3000, 3333)])
    # parts of blocks: all but one step of a block (the other as stored), in reverse order
    send([("a", s) for s in range(32, 47)] + [("b", s) for s in range(63, 48, -1)])
    send([("b", s) for s in (5, 3, 17, 4095, 4096, 11_999)])
    # scattered points: more index ranges than one read takes, far from the rest too
    # (97 steps apart: each its own index range)
    scattered = [("a", s) for s in range(0, 40_000, 97)][: SPANS_PER_READ * 2 + 17]
    send([*scattered, ("a", 10**9), ("a", MAX_STEP), ("b", 10**12 + 5)])
    send([("a", 10**9 + 1), ("a", MAX_STEP - 20), ("a", MAX_STEP)])

    db_session.expire_all()
    expected = expected_rollups({(run_id, key): by_step for key, by_step in series.items()})
    assert_same_rollups(stored_rollups(db_session), expected)
