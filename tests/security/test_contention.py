"""Row "16 writers + 4 compare readers for 60 s": at test size (8 writers, 2 readers, a fixed
number of batches each), on SQLite and PostgreSQL: no 5xx at all, every acknowledged point
stored exactly once with the value sent. The full-size figures (and the latency) come from
`benchmarks/write_contention.py`, in docs/benchmarks.md.
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx

WRITERS = 8
READERS = 2
BATCHES = 6
KEYS = ("train/loss_total", "train/loss_kd", "train/loss_student", "train/lr")
STEPS_PER_BATCH = 125  # × 4 keys = 500 points a post


def value(writer: int, key: int, step: int) -> float:
    return writer + key / 10 + 1 / (step + 1)


def batch(writer: int, number: int) -> dict:
    first = number * STEPS_PER_BATCH
    return {
        "points": [
            {"key": key, "step": s, "value": value(writer, k, s)}
            for k, key in enumerate(KEYS)
            for s in range(first, first + STEPS_PER_BATCH)
        ]
    }


def test_writers_and_readers_together_get_no_5xx_and_lose_no_point(live_server):
    runs = []
    for i in range(WRITERS):
        body = {"kind": "external", "name": f"writer-{i}", "experiment": "contention"}
        created = httpx.post(f"{live_server}/api/runs", json=body, timeout=60).json()
        runs.append((created["id"], created["token"]))
    statuses: Counter[int] = Counter()
    acknowledged = [0] * WRITERS
    lock = threading.Lock()
    writing = threading.Event()
    writing.set()

    def write(index: int, run_id: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=live_server, headers=headers, timeout=120) as client:
            for number in range(BATCHES):
                while True:  # like the worker's client: a 429/503 is sent again
                    response = client.post(f"/api/runs/{run_id}/metrics", json=batch(index, number))
                    with lock:
                        statuses[response.status_code] += 1
                    if response.status_code not in (429, 503):
                        break
                if response.status_code == 200:
                    acknowledged[index] += response.json()["accepted"]

    def read() -> None:
        params = {"runs": ",".join(r for r, _ in runs), "keys": KEYS[0], "max_points": 100}
        with httpx.Client(base_url=live_server, timeout=120) as client:
            while writing.is_set():
                response = client.get("/api/compare", params=params)
                with lock:
                    statuses[response.status_code] += 1

    writers = [threading.Thread(target=write, args=(i, *run)) for i, run in enumerate(runs)]
    readers = [threading.Thread(target=read) for _ in range(READERS)]
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join()
    writing.clear()
    for thread in readers:
        thread.join()

    assert {status for status in statuses if status >= 500} == set(), statuses
    assert statuses[200] >= WRITERS * BATCHES
    per_run = BATCHES * STEPS_PER_BATCH * len(KEYS)
    assert acknowledged == [per_run] * WRITERS
    for index, (run_id, _) in enumerate(runs):
        keys = httpx.get(f"{live_server}/api/runs/{run_id}/metrics/keys", timeout=60).json()
        counts = {entry["key"]: entry["count"] for entry in keys["keys"]}
        assert counts == dict.fromkeys(KEYS, BATCHES * STEPS_PER_BATCH)
        series = httpx.get(
            f"{live_server}/api/runs/{run_id}/metrics",
            params={"keys": KEYS[1], "max_points": 10_000},
            timeout=60,
        ).json()["series"][0]
        steps = list(range(BATCHES * STEPS_PER_BATCH))
        assert series["step"] == steps
        assert series["value"] == [value(index, 1, s) for s in steps]
