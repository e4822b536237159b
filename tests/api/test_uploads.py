"""Uploaded weights: safetensors kept, .pt/.pth loaded safely and converted, everything refused
that should be (code-bearing pickles, non-state-dicts, corrupt files, oversize, non-admins)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load, save
from sqlalchemy import select

from kdlab.backend.db.models import Upload
from kdlab.backend.main import create_app
from kdlab.backend.services.auth import create_token
from kdlab.backend.settings import Settings
from tests.factories import DIGITS_KD, config, create_run

ADMIN_TOKEN = "admin-secret-for-tests"
REFUSED = "refused: the file needs arbitrary code to load; save a state_dict or safetensors"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pt_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def post(client: TestClient, filename: str, data: bytes, **kwargs):
    return client.post("/api/uploads", files={"file": (filename, data)}, **kwargs)


def stored_files(settings: Settings) -> list[Path]:
    root = settings.uploads_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "body.0.weight": torch.randn(8, 6, generator=generator),
        "body.0.bias": torch.randn(8, generator=generator),
        "head.weight": torch.randn(4, 8, generator=generator).to(torch.bfloat16),
        "steps": torch.tensor([3, 1, 4], dtype=torch.int64),
    }


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        assert torch.equal(actual[key], value), key


@pytest.fixture
def auth_client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"token": ADMIN_TOKEN}))
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client
    app.state.engine.dispose()


# --- accepted -----------------------------------------------------------------------------------


def test_safetensors_is_stored_as_sent(client, settings):
    data = save(weights())
    response = post(client, "teacher.safetensors", data)
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"id", "filename", "format", "sha256", "size", "tensor_count", "created_at"}
    assert body["filename"] == "teacher.safetensors"
    assert body["format"] == "safetensors"
    assert body["sha256"] == sha(data)
    assert body["size"] == len(data)
    assert body["tensor_count"] == 4
    [stored] = stored_files(settings)
    assert stored.name == f"{body['id']}.safetensors"
    assert stored.read_bytes() == data

    assert client.get(f"/api/uploads/{body['id']}").json() == body
    assert client.get("/api/uploads").json() == [body]
    download = client.get(f"/api/uploads/{body['id']}/file")
    assert download.content == data
    assert download.headers["x-content-sha256"] == sha(data)


@pytest.mark.parametrize("filename", ["teacher.pt", "teacher.pth", "TEACHER.PT"])
def test_pt_state_dict_is_converted_to_safetensors_exactly(client, settings, filename):
    state = weights()
    response = post(client, filename, pt_bytes(state))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "pt"
    assert body["filename"] == filename
    assert body["tensor_count"] == len(state)
    [stored] = stored_files(settings)
    data = stored.read_bytes()
    assert body["sha256"] == sha(data)
    assert body["size"] == len(data)
    assert_same(load(data), state)
    assert client.get(f"/api/uploads/{body['id']}/file").content == data


def test_shared_and_strided_storage_is_stored_as_independent_tensors(client, settings):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    embed = torch.randn(10, 4)
    state = {
        "embed.weight": embed,
        "head.weight": embed,  # tied: the same tensor under two names
        "rows": base[1:3],  # a view into another tensor's storage
        "base": base,
        "transposed": base.t(),  # not contiguous
    }
    response = post(client, "tied.pt", pt_bytes(state))
    assert response.status_code == 201, response.text
    assert response.json()["tensor_count"] == 5
    [stored] = stored_files(settings)
    assert_same(load(stored.read_bytes()), {k: v.contiguous() for k, v in state.items()})


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_a_checkpoint_dict_with_a_state_dict_inside_is_accepted(client, settings, key):
    state = weights()
    response = post(client, "ckpt.pth", pt_bytes({key: state, "epoch": 7, "note": "best"}))
    assert response.status_code == 201, response.text
    assert response.json()["tensor_count"] == len(state)
    [stored] = stored_files(settings)
    assert_same(load(stored.read_bytes()), state)


def test_a_downloaded_student_pt_uploads_back_with_its_metadata(client, settings):
    state = weights()
    metadata = '{"format": "kdlab.student/1", "run": "r1"}'
    response = post(client, "r1-student.pt", pt_bytes({**state, "kdlab_metadata": metadata}))
    assert response.status_code == 201, response.text
    assert response.json()["tensor_count"] == len(state)
    [stored] = stored_files(settings)
    with safe_open(str(stored), framework="pt") as handle:
        assert handle.metadata() == {"kdlab": metadata}
    assert_same(load(stored.read_bytes()), state)


def test_the_client_file_name_is_reduced_to_its_base_name(client, settings):
    response = post(client, "../../../etc/evil.safetensors", save(weights()))
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "evil.safetensors"
    windows = post(client, "C:\\Users\\me\\teacher.pt", pt_bytes(weights()))
    assert windows.json()["filename"] == "teacher.pt"
    assert {p.parent for p in stored_files(settings)} == {settings.uploads_dir}
    assert not (settings.data_path.parent / "etc").exists()
    names = {p.name for p in stored_files(settings)}
    assert names == {f"{response.json()['id']}.safetensors", f"{windows.json()['id']}.safetensors"}


def test_listing_is_newest_first(client):
    first = post(client, "a.safetensors", save(weights())).json()
    second = post(client, "b.pt", pt_bytes(weights())).json()
    assert [u["id"] for u in client.get("/api/uploads").json()] == [second["id"], first["id"]]


# --- refused ------------------------------------------------------------------------------------


class Payload:
    """Pickles to a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_pickle_that_runs_code_is_refused_and_never_run(client, settings, db_session, tmp_path):
    marker = tmp_path / "pwned"
    for obj in (
        {"weight": torch.ones(2), "payload": Payload(f"echo pwned > {marker}")},
        Payload("echo pwned"),
    ):
        response = post(client, "evil.pt", pt_bytes(obj))
        assert response.status_code == 422
        assert response.json()["detail"][0]["msg"].startswith(REFUSED)
    assert not marker.exists()
    assert stored_files(settings) == []
    assert db_session.scalars(select(Upload)).all() == []


@pytest.mark.parametrize(
    ("obj", "says"),
    [
        (torch.ones(3), "a single tensor of shape (3,)"),
        ([torch.ones(3), torch.zeros(2)], "a list of 2 items"),
        ({"epoch": 3, "weight": torch.ones(1)}, "'epoch' is a int"),
        ({"encoder": {"w": torch.ones(1)}}, "'encoder' is a dict"),
        ({"state_dict": {"w": 1.5}}, "'state_dict' is a dict"),
        ({}, "holds no tensors"),
    ],
)
def test_anything_but_a_state_dict_is_422_saying_what_it_was(client, settings, obj, says):
    response = post(client, "weights.pt", pt_bytes(obj))
    assert response.status_code == 422
    assert says in response.json()["detail"][0]["msg"]
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    ("filename", "data", "says"),
    [
        ("w.safetensors", b"definitely not safetensors", "not a valid safetensors file"),
        ("w.safetensors", save(weights())[:-7], "not a valid safetensors file"),
        ("w.safetensors", b"", "not a valid safetensors file"),
        ("w.safetensors", save({}), "holds no tensors"),
        ("w.pt", b"\x80\x02garbage", "not a readable PyTorch file"),
        ("w.pt", pt_bytes(weights())[:300], "not a readable PyTorch file"),
        ("w.pt", b"", "not a readable PyTorch file"),
    ],
)
def test_corrupt_files_are_422_and_nothing_is_kept(client, settings, filename, data, says):
    response = post(client, filename, data)
    assert response.status_code == 422, response.text
    assert says in response.json()["detail"][0]["msg"]
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    "filename",
    ["weights.bin", "weights.ckpt", "weights", "..", ".safetensors", "w.safetensors.exe"],
)
def test_other_extensions_are_422(client, settings, filename):
    response = post(client, filename, save(weights()))
    assert response.status_code == 422
    assert ".safetensors" in response.json()["detail"][0]["msg"]
    assert stored_files(settings) == []


def test_the_body_must_be_multipart_with_a_file_field(client):
    assert client.post("/api/uploads", content=b"raw").status_code == 422
    wrong_field = client.post("/api/uploads", files={"weights": ("w.pt", b"x")})
    assert wrong_field.status_code == 422
    assert "'file'" in wrong_field.json()["detail"][0]["msg"]
    text_field = client.post("/api/uploads", data={"file": "not a file"}, files={"x": ("a", b"")})
    assert text_field.status_code == 422
    assert "must be a file" in text_field.json()["detail"][0]["msg"]


def test_over_the_limit_is_413_while_streaming_and_nothing_is_kept(settings, db_session):
    small = settings.model_copy(update={"max_upload_bytes": 2048})
    data = save({"w": torch.zeros(1024)})  # > 2048 bytes
    assert len(data) > 2048
    app = create_app(small)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = post(client, "big.safetensors", data)
        assert response.status_code == 413
        assert "2048" in response.json()["detail"]

        boundary = "kdlab-test-boundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="big.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()

        def body() -> Iterator[bytes]:  # chunked, no Content-Length: the cap holds mid-stream
            yield head
            for _ in range(64):
                yield b"\0" * 1024
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = client.post(
            "/api/uploads",
            content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert streamed.status_code == 413
        assert post(client, "small.safetensors", save({"w": torch.zeros(4)})).status_code == 201
    app.state.engine.dispose()
    assert [u.filename for u in db_session.scalars(select(Upload))] == ["small.safetensors"]
    assert len(stored_files(small)) == 1


def test_a_pt_that_unpacks_beyond_the_limit_is_refused(settings):
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * 200_000)  # compresses to a few hundred bytes
    small = settings.model_copy(update={"max_upload_bytes": 10_000})
    app = create_app(small)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = post(client, "bomb.pt", buffer.getvalue())
    app.state.engine.dispose()
    assert response.status_code == 422
    assert "unpacks to 200000 bytes" in response.json()["detail"][0]["msg"]
    assert stored_files(small) == []


def test_unknown_upload_is_404(client):
    assert client.get("/api/uploads/nope").status_code == 404
    assert client.get("/api/uploads/nope/file").status_code == 404


# --- who may ------------------------------------------------------------------------------------


def test_only_admins_upload_and_list(auth_client, db_session, settings):
    run = create_run(db_session, name="worker")
    run_id = run.id
    token = create_token(db_session, "worker", scope="run", run_id=run_id)
    db_session.commit()
    db_session.close()
    data = save(weights())
    assert post(auth_client, "w.safetensors", data).status_code == 401
    refused = post(auth_client, "w.safetensors", data, headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 403
    assert stored_files(settings) == []
    ok = post(
        auth_client, "w.safetensors", data, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert ok.status_code == 201
    assert (
        auth_client.get("/api/uploads", headers={"Authorization": f"Bearer {token}"}).status_code
        == 403
    )
    listed = auth_client.get("/api/uploads", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert [u["id"] for u in listed.json()] == [ok.json()["id"]]
    upload_id = ok.json()["id"]
    assert (
        auth_client.get(
            f"/api/uploads/{upload_id}", headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 403
    )


def test_a_run_token_reads_the_upload_its_config_names_as_teacher(auth_client, db_session):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    data = save(weights())
    upload_id = post(auth_client, "teacher.safetensors", data, headers=admin).json()["id"]
    run_config = config(DIGITS_KD)
    run_config["teacher"] = {**run_config["teacher"], "weights": {"upload_id": upload_id}}
    run = create_run(db_session, name="kd", kind="distill", run_config=run_config)
    token = create_token(db_session, "worker", scope="run", run_id=run.id)
    db_session.commit()
    db_session.close()
    worker = {"Authorization": f"Bearer {token}"}
    assert auth_client.get(f"/api/uploads/{upload_id}", headers=worker).json()["id"] == upload_id
    assert auth_client.get(f"/api/uploads/{upload_id}/file", headers=worker).content == data
    other_id = post(auth_client, "other.safetensors", data, headers=admin).json()["id"]
    assert auth_client.get(f"/api/uploads/{other_id}/file", headers=worker).status_code == 403


def test_openapi_documents_the_multipart_field(client):
    operation = client.get("/api/openapi.json").json()["paths"]["/api/uploads"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"]
