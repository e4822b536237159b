"""Run artifacts: upload with sha256, list, download, the student in two formats, and the guards."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from torch import nn

from kdlab.backend.db.models import Artifact
from kdlab.backend.main import create_app
from kdlab.backend.services.auth import create_token
from kdlab.backend.settings import Settings
from kdlab.worker import kd
from tests.factories import create_run

ADMIN_TOKEN = "admin-secret-for-tests"


class TiedNet(nn.Module):
    """A student with tied weights (embedding and head share one tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embed(x)))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(
    client: TestClient,
    run_id: str,
    name: str,
    data: bytes,
    kind: str = "file",
    digest: str | None = None,
    headers: dict[str, str] | None = None,
):
    return client.put(
        f"/api/runs/{run_id}/artifacts/{name}",
        params={"kind": kind},
        content=data,
        headers={"X-Content-SHA256": digest or sha(data), **(headers or {})},
    )


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def run_id(db_session) -> str:
    run = create_run(db_session, name="r18 from r50")
    db_session.close()
    return run.id


@pytest.fixture
def auth_client(settings: Settings) -> Iterator[TestClient]:
    """The same database, with auth enforced (an admin token is configured)."""
    app = create_app(settings.model_copy(update={"token": ADMIN_TOKEN}))
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client
    app.state.engine.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def run_token(client: TestClient, run_id: str) -> str:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        token = create_token(session, f"worker {run_id}", scope="run", run_id=run_id)
        session.commit()
    return token


# --- upload, list, download ---------------------------------------------------------------------


def test_upload_list_and_download_round_trip(client, settings, run_id):
    data = os.urandom(200_000)
    response = put(client, run_id, "latest.pt", data, kind="checkpoint")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "latest.pt"
    assert body["kind"] == "checkpoint"
    assert body["sha256"] == sha(data)
    assert body["size"] == len(data)
    assert body["download_url"] == f"/api/runs/{run_id}/artifacts/latest.pt"

    listed = client.get(f"/api/runs/{run_id}/artifacts").json()
    assert listed == [body]

    download = client.get(body["download_url"])
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["x-content-sha256"] == sha(data)
    assert download.headers["content-disposition"] == 'attachment; filename="latest.pt"'


def test_file_is_stored_under_a_server_made_name_with_no_temporary_left(client, settings, run_id):
    data = b"checkpoint bytes"
    assert put(client, run_id, "best.pt", data).status_code == 201
    stored = files_under(settings.artifacts_dir)
    assert len(stored) == 1
    assert stored[0].parent == settings.artifacts_dir / run_id
    assert "best" not in stored[0].name
    assert stored[0].read_bytes() == data


def test_streamed_body_without_content_length_is_hashed_and_stored(client, run_id):
    parts = [os.urandom(70_000) for _ in range(5)]

    def chunks() -> Iterator[bytes]:
        yield from parts

    response = client.put(
        f"/api/runs/{run_id}/artifacts/log.txt",
        params={"kind": "log"},
        content=chunks(),
        headers={"X-Content-SHA256": sha(b"".join(parts))},
    )
    assert response.status_code == 201, response.text
    assert response.json()["size"] == sum(map(len, parts))
    assert client.get(f"/api/runs/{run_id}/artifacts/log.txt").content == b"".join(parts)


def test_reupload_replaces_the_file_and_removes_the_old_one(client, settings, db_session, run_id):
    assert put(client, run_id, "latest.pt", b"first version").status_code == 201
    first_file = files_under(settings.artifacts_dir)
    response = put(client, run_id, "latest.pt", b"second, longer version", kind="checkpoint")
    assert response.status_code == 200, response.text
    assert response.json()["sha256"] == sha(b"second, longer version")
    remaining = files_under(settings.artifacts_dir)
    assert len(remaining) == 1 and remaining != first_file
    assert client.get(f"/api/runs/{run_id}/artifacts/latest.pt").content == (
        b"second, longer version"
    )
    rows = db_session.scalars(select(Artifact).where(Artifact.run_id == run_id)).all()
    assert [(r.name, r.kind, r.size) for r in rows] == [("latest.pt", "checkpoint", 22)]


def test_list_is_empty_for_a_run_without_artifacts_and_404_for_an_unknown_run(client, run_id):
    assert client.get(f"/api/runs/{run_id}/artifacts").json() == []
    response = client.get("/api/runs/nope/artifacts")
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


def test_unknown_artifact_and_unknown_run_are_404(client, run_id):
    assert client.get(f"/api/runs/{run_id}/artifacts/missing.bin").status_code == 404
    assert put(client, "nope", "a.bin", b"x").status_code == 404


# --- refused uploads ----------------------------------------------------------------------------


def test_sha256_mismatch_is_422_and_nothing_is_kept(client, settings, db_session, run_id):
    response = put(client, run_id, "a.bin", b"payload", digest=sha(b"other payload"))
    assert response.status_code == 422
    assert sha(b"payload") in json.dumps(response.json())
    assert files_under(settings.artifacts_dir) == []
    assert db_session.scalars(select(Artifact)).all() == []


@pytest.mark.parametrize(
    "headers", [{}, {"X-Content-SHA256": "not-hex"}, {"X-Content-SHA256": "ab" * 31}]
)
def test_missing_or_malformed_sha256_header_is_422(client, run_id, headers):
    response = client.put(f"/api/runs/{run_id}/artifacts/a.bin", content=b"x", headers=headers)
    assert response.status_code == 422


def test_unknown_kind_is_422(client, run_id):
    response = put(client, run_id, "a.bin", b"x", kind="weights")
    assert response.status_code == 422


@pytest.mark.parametrize(
    "name", [".hidden", "-dash", "a b", "a%3Bb", "%2E%2E", "x" * 201, "caf%C3%A9"]
)
def test_names_outside_the_pattern_are_422(client, settings, run_id, name):
    response = put(client, run_id, name, b"x")
    assert response.status_code == 422, response.text
    assert files_under(settings.artifacts_dir) == []


def test_over_the_limit_is_413_with_nothing_kept(settings, run_id, db_session):
    small = settings.model_copy(update={"max_upload_bytes": 1000})
    app = create_app(small)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        declared = put(client, run_id, "big.bin", os.urandom(1001))
        assert declared.status_code == 413
        assert "1000" in declared.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while streaming
            for _ in range(4):
                yield os.urandom(400)

        streamed = client.put(
            f"/api/runs/{run_id}/artifacts/big.bin",
            content=chunks(),
            headers={"X-Content-SHA256": "0" * 64},
        )
        assert streamed.status_code == 413
        assert put(client, run_id, "ok.bin", os.urandom(1000)).status_code == 201
    app.state.engine.dispose()
    assert len(files_under(small.artifacts_dir)) == 1  # ok.bin only: no temporary left
    assert [a.name for a in db_session.scalars(select(Artifact))] == ["ok.bin"]


# --- path traversal -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "..%2F..%2F..%2Fsecret.txt",
        "..%2f..%2fsecret.txt",
        "%2E%2E%2F%2E%2E%2Fsecret.txt",
        "..%5C..%5Csecret.txt",
        "%2Fetc%2Fpasswd",
        "%2E%2E",
        "secret.txt",
    ],
)
def test_traversal_never_reaches_a_file_outside_the_table(client, settings, run_id, path):
    secret = settings.data_path / "secret.txt"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(b"do not serve me")
    (settings.artifacts_dir / run_id).mkdir(parents=True, exist_ok=True)
    (settings.artifacts_dir / run_id / "secret.txt").write_bytes(b"not in the table either")
    response = client.get(f"/api/runs/{run_id}/artifacts/{path}")
    assert response.status_code in (404, 422), response.text
    assert b"do not serve me" not in response.content
    assert b"not in the table" not in response.content


def test_traversal_in_the_raw_url_is_refused(client, settings, run_id):
    secret = settings.data_path / "secret.txt"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(b"do not serve me")
    for url in (
        f"/api/runs/{run_id}/artifacts/../../../secret.txt",
        f"/api/runs/{run_id}/artifacts//etc/passwd",
    ):
        response = client.get(url)
        assert response.status_code in (404, 422)
        assert b"do not serve me" not in response.content


def test_upload_with_a_traversal_name_writes_nothing_outside(client, settings, run_id):
    for name in ("..%2F..%2Fevil.bin", "%2Ftmp%2Fevil.bin", ".."):
        response = put(client, run_id, name, b"evil")
        assert response.status_code in (404, 405, 422), (name, response.status_code)
    assert not (settings.data_path / "evil.bin").exists()
    assert files_under(settings.data_path) == []


# --- tokens -------------------------------------------------------------------------------------


def test_worker_tokens_reach_only_their_own_run(auth_client, db_session, run_id):
    other_id = create_run(db_session, name="other").id
    db_session.close()
    own, other = run_token(auth_client, run_id), run_token(auth_client, other_id)
    data = b"student weights"

    assert put(auth_client, run_id, "a.bin", data).status_code == 401
    refused = put(auth_client, run_id, "a.bin", data, headers=bearer(other))
    assert refused.status_code == 403
    assert other_id in refused.json()["detail"] and run_id in refused.json()["detail"]
    assert put(auth_client, run_id, "a.bin", data, headers=bearer(own)).status_code == 201
    assert put(auth_client, run_id, "b.bin", data, headers=bearer(ADMIN_TOKEN)).status_code == 201

    url = f"/api/runs/{run_id}/artifacts/a.bin"
    assert auth_client.get(url).status_code == 401
    assert auth_client.get(url, headers=bearer(other)).status_code == 403
    assert (
        auth_client.get(f"/api/runs/{run_id}/artifacts", headers=bearer(other)).status_code == 403
    )
    assert auth_client.get(url, headers=bearer(own)).content == data
    assert auth_client.get(url, headers=bearer(ADMIN_TOKEN)).content == data


def test_a_run_token_reads_its_teacher_runs_artifacts(auth_client, db_session, run_id):
    student_run = create_run(db_session, name="student", kind="distill")
    student_run.teacher_run_id = run_id
    db_session.commit()
    student_id = student_run.id
    db_session.close()
    assert (
        put(auth_client, run_id, "best.pt", b"teacher", headers=bearer(ADMIN_TOKEN)).status_code
        == 201
    )
    token = run_token(auth_client, student_id)
    response = auth_client.get(f"/api/runs/{run_id}/artifacts/best.pt", headers=bearer(token))
    assert response.content == b"teacher"
    assert put(auth_client, run_id, "x.bin", b"x", headers=bearer(token)).status_code == 403


# --- the exported student -----------------------------------------------------------------------


@pytest.fixture
def student_file(tmp_path) -> tuple[TiedNet, bytes, Path]:
    torch.manual_seed(0)
    model = TiedNet()
    path = kd.save(model, tmp_path / "student.safetensors", metadata={"run": "r1"})
    return model, path.read_bytes(), path


def test_no_student_yet_is_404_with_a_message(client, run_id):
    response = client.get(f"/api/runs/{run_id}/student")
    assert response.status_code == 404
    assert response.json()["detail"] == f"run {run_id} has no exported student yet"


def test_student_downloads_as_safetensors_named_after_the_run(
    client, run_id, student_file, tmp_path
):
    model, data, _ = student_file
    assert put(client, run_id, "student.safetensors", data, kind="student").status_code == 201
    response = client.get(f"/api/runs/{run_id}/student")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["x-content-sha256"] == sha(data)
    assert response.headers["content-disposition"] == (
        'attachment; filename="r18_from_r50-student.safetensors"'
    )
    downloaded = tmp_path / "downloaded.safetensors"
    downloaded.write_bytes(response.content)
    restored = kd.restore(TiedNet(), downloaded)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)


def test_student_as_pt_is_a_weights_only_state_dict_with_the_metadata(
    client, settings, run_id, student_file
):
    model, data, path = student_file
    assert put(client, run_id, "student.safetensors", data, kind="student").status_code == 201
    response = client.get(f"/api/runs/{run_id}/student", params={"format": "pt"})
    assert response.status_code == 200, response.text
    assert response.headers["x-content-sha256"] == sha(response.content)
    assert response.headers["content-disposition"] == (
        'attachment; filename="r18_from_r50-student.pt"'
    )
    loaded = torch.load(io.BytesIO(response.content), weights_only=True)
    assert json.loads(loaded.pop("kdlab_metadata")) == kd.load_metadata(path)
    expected = model.state_dict()
    assert set(loaded) == set(expected)  # tied names included
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value)
    fresh = TiedNet()
    fresh.load_state_dict(loaded)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(x), model(x))
    # the converted file was temporary: only the stored artifact remains
    assert len(files_under(settings.artifacts_dir)) == 1


def test_unknown_student_format_is_422_listing_the_formats(client, run_id, student_file):
    _, data, _ = student_file
    put(client, run_id, "student.safetensors", data, kind="student")
    response = client.get(f"/api/runs/{run_id}/student", params={"format": "onnx"})
    assert response.status_code == 422
    detail = json.dumps(response.json())
    assert "safetensors" in detail and "pt" in detail and "onnx" in detail


def test_openapi_documents_the_routes(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    put_op = paths["/api/runs/{run_id}/artifacts/{name}"]["put"]
    assert "application/octet-stream" in put_op["requestBody"]["content"]
    assert "/api/runs/{run_id}/student" in paths
    assert "kdlab_metadata" in json.dumps(paths["/api/runs/{run_id}/student"])
