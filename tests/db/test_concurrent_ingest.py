"""8 writers post 400k metric points at once through a real uvicorn server (real HTTP, its own
process); every point must be stored exactly once, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from kdlab.backend.db.engine import make_engine, make_session_factory
from kdlab.backend.settings import Settings
from tests.conftest import free_port
from tests.factories import create_run

WRITERS = 8
KEYS_PER_WRITER = 5
STEPS = 10_000  # 5 keys × 10k steps = 50k points per writer
BATCH = 5_000
TIME_LIMIT_S = 60.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """`uvicorn kdlab.backend.main:create_app` on a free loopback port; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "KDLAB_DATABASE_URL": settings.resolved_database_url,
        "KDLAB_DATA_DIR": str(settings.data_dir),
        "KDLAB_EXECUTOR": "none",
        "KDLAB_HOST": "127.0.0.1",
    }
    env.pop("KDLAB_TOKEN", None)
    log = (tmp_path / "uvicorn.log").open("w")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--factory", "kdlab.backend.main:create_app"),
            *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "uvicorn.log").read_text())
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _points(writer: int) -> list[dict]:
    """Writer `writer`'s 50k points; values are multiples of 1/8, so any sum is exact."""
    return [
        {
            "key": f"train/kd/w{writer}~k{k}",
            "step": step,
            "value": ((writer * 7 + k * 13 + step) % 1024) / 8.0,
            "time": 1.7e9 + step,
        }
        for k in range(KEYS_PER_WRITER)
        for step in range(STEPS)
    ]


def test_eight_writers_store_every_point_exactly_once(server: str, settings: Settings) -> None:
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        run_ids = [create_run(session, name=f"ingest-{i}", status="running").id for i in range(2)]
    engine.dispose()

    points = [_points(writer) for writer in range(WRITERS)]
    batches = [
        [json.dumps({"points": p[start : start + BATCH]}) for start in range(0, len(p), BATCH)]
        for p in points
    ]
    errors: list[str] = []
    start_line = threading.Barrier(WRITERS)

    def write(writer: int) -> None:
        run_id = run_ids[writer % 2]
        neighbour = (writer + 2) % WRITERS  # same run, other keys
        # a neighbour's first batch at the same moment as the neighbour sends it, then the
        # writer's own batches, then its first batch again (a retry after a lost answer)
        plan = [batches[neighbour][0], *batches[writer], batches[writer][0]]
        with httpx.Client(base_url=server, timeout=120) as client:
            start_line.wait()
            for body in plan:
                response = client.post(
                    f"/api/runs/{run_id}/metrics",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                if response.status_code != 200:
                    errors.append(f"writer {writer}: {response.status_code} {response.text}")
                    return

    threads = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    assert not errors, errors

    total = WRITERS * KEYS_PER_WRITER * STEPS
    sent = WRITERS * (KEYS_PER_WRITER * STEPS + 2 * BATCH)
    print(
        f"\n{settings.resolved_database_url.split(':')[0]}: {sent} points sent "
        f"({total} distinct) in {elapsed:.1f} s = {sent / elapsed:,.0f} points/s"
    )
    engine = make_engine(settings.resolved_database_url)
    try:
        with engine.connect() as conn:
            count = conn.scalar(text("SELECT COUNT(*) FROM metrics"))
            distinct = conn.scalar(
                text("SELECT COUNT(*) FROM (SELECT DISTINCT run_id, key, step FROM metrics) d")
            )
            value_sum = conn.scalar(text("SELECT SUM(value) FROM metrics"))
            per_run = dict(
                conn.execute(text("SELECT run_id, COUNT(*) FROM metrics GROUP BY run_id")).all()
            )
    finally:
        engine.dispose()
    assert count == total
    assert distinct == total
    assert value_sum == sum(p["value"] for writer in points for p in writer)
    assert per_run == {run_id: total // 2 for run_id in run_ids}
    assert elapsed < TIME_LIMIT_S, f"{total} points took {elapsed:.1f} s"
