"""A finished run's artifacts are read-only (issue 9): a PUT on a succeeded, failed or cancelled
run is 409 for every token, admin too, and nothing is stored; the original file stays served."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from kdlab.backend.db.engine import make_engine, make_session_factory
from kdlab.backend.db.models import Run
from kdlab.backend.errors import Conflict
from kdlab.backend.services import artifacts as service
from kdlab.backend.services.auth import ADMIN
from kdlab.backend.settings import Settings

ADMIN_TOKEN = "admin-token-for-the-finished-artifact-tests-0123456789"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"token": ADMIN_TOKEN})


ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def put(url: str, run_id: str, name: str, data: bytes, headers: dict[str, str]):
    return httpx.put(
        f"{url}/api/runs/{run_id}/artifacts/{name}",
        content=data,
        headers={**headers, "X-Content-SHA256": hashlib.sha256(data).hexdigest()},
        timeout=60,
    )


@pytest.mark.parametrize("final", ["succeeded", "failed", "cancelled"])
def test_a_finished_runs_artifacts_are_read_only(live_server, settings, final):
    created = httpx.post(
        f"{live_server}/api/runs",
        json={"kind": "external", "name": f"ends-{final}"},
        headers=ADMIN_HEADERS,
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    own = {"Authorization": f"Bearer {created.json()['token']}"}
    original = os.urandom(4096)
    assert put(live_server, run_id, "student.safetensors", original, own).status_code == 201
    report = {"status": final} | ({"error": "boom"} if final == "failed" else {})
    reported = httpx.post(f"{live_server}/api/runs/{run_id}/status", json=report, headers=own)
    assert reported.status_code == 200, reported.text
    assert reported.json()["status"] == final

    read_only = f"run {run_id} already {final}; its artifacts are read-only"
    replacement = os.urandom(4096)
    replaced = put(live_server, run_id, "student.safetensors", replacement, ADMIN_HEADERS)
    assert replaced.status_code == 409
    assert replaced.json() == {"detail": read_only}
    added = put(live_server, run_id, "late.bin", replacement, ADMIN_HEADERS)
    assert added.status_code == 409
    assert added.json() == {"detail": read_only}
    streamed = httpx.put(  # chunked: refused all the same
        f"{live_server}/api/runs/{run_id}/artifacts/latest.pt",
        content=(replacement[i : i + 1024] for i in range(0, len(replacement), 1024)),
        headers={**ADMIN_HEADERS, "X-Content-SHA256": hashlib.sha256(replacement).hexdigest()},
    )
    assert streamed.status_code == 409
    # the run's own token: revoked when the run finished (401), or read-only (409)
    by_own = put(live_server, run_id, "student.safetensors", replacement, own)
    assert by_own.status_code in (401, 409), by_own.text

    listed = httpx.get(f"{live_server}/api/runs/{run_id}/artifacts", headers=ADMIN_HEADERS)
    assert [(a["name"], a["sha256"]) for a in listed.json()] == [
        ("student.safetensors", hashlib.sha256(original).hexdigest())
    ]
    served = httpx.get(
        f"{live_server}/api/runs/{run_id}/artifacts/student.safetensors", headers=ADMIN_HEADERS
    )
    assert served.status_code == 200
    assert served.content == original
    assert served.headers["X-Content-SHA256"] == hashlib.sha256(original).hexdigest()
    stored = files_under(settings.artifacts_dir)
    assert len(stored) == 1 and stored[0].read_bytes() == original


def test_a_run_that_finishes_while_the_body_streams_keeps_nothing(live_server, settings):
    """The check is made again when the row is written: a run that finished during the upload
    gets 409 and the streamed file is removed (service level, the body finishing the run)."""
    created = httpx.post(
        f"{live_server}/api/runs",
        json={"kind": "external", "name": "ends-mid-upload"},
        headers=ADMIN_HEADERS,
    )
    run_id = created.json()["id"]
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    data = os.urandom(8192)

    async def body() -> AsyncIterator[bytes]:
        yield data[:4096]
        with factory() as other:  # the worker reports the outcome meanwhile
            other.execute(update(Run).where(Run.id == run_id).values(status="succeeded"))
            other.commit()
        yield data[4096:]

    async def upload() -> None:
        with factory() as session:
            await service.put_artifact(
                session,
                settings,
                ADMIN,
                run_id,
                "late.bin",
                "file",
                hashlib.sha256(data).hexdigest(),
                body(),
                None,
            )

    try:
        # in a thread of its own: the browser tests' Playwright keeps a loop in this one
        with (
            ThreadPoolExecutor(1) as pool,
            pytest.raises(Conflict, match=f"run {run_id} already succeeded; its artifacts"),
        ):
            pool.submit(asyncio.run, upload()).result()
    finally:
        engine.dispose()
    assert files_under(settings.artifacts_dir) == []
    listed = httpx.get(f"{live_server}/api/runs/{run_id}/artifacts", headers=ADMIN_HEADERS)
    assert listed.json() == []
