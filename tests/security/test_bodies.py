"""Request bodies are bounded as they are read, whatever the framing (issue 9): the attacks
replayed against a real uvicorn with real chunked bodies (no Content-Length).

The limits are lowered for these tests (KDLAB_MAX_BODY_BYTES 11 MiB: a 10 MB field still fits,
KDLAB_MAX_UPLOAD_BYTES 1 MiB), so an attack of 200 MB is refused after a small part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from kdlab.backend.services.uploads import MULTIPART_OVERHEAD
from kdlab.backend.settings import Settings

BODY_LIMIT = 11 * 1024 * 1024
UPLOAD_LIMIT = 1024 * 1024
MB = 1000 * 1000
PIECE = 64 * 1024


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"max_body_bytes": BODY_LIMIT, "max_upload_bytes": UPLOAD_LIMIT}
    )


def external_run(url: str) -> tuple[str, dict[str, str]]:
    """A registered external run: its id and its own token's header (the attacker's)."""
    created = httpx.post(f"{url}/api/runs", json={"kind": "external", "name": "attacker"})
    assert created.status_code == 201, created.text
    return created.json()["id"], {"Authorization": f"Bearer {created.json()['token']}"}


def json_pieces(total: int, head: bytes = b'{"points": [], "pad": "') -> Iterator[bytes]:
    """`total` bytes of a JSON object that would be valid but for its size, in pieces."""
    yield head
    sent = len(head)
    while sent < total:
        piece = b"x" * min(PIECE, total - sent)
        sent += len(piece)
        yield piece
    yield b'"}'


def bytes_pieces(total: int) -> Iterator[bytes]:
    for start in range(0, total, PIECE):
        yield b"\0" * min(PIECE, total - start)


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, sent: int) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.sent = sent  # body bytes the client got out before the server answered

    def json(self) -> object:
        return json.loads(self.body)


def _read_response(sock: socket.socket, data: bytes) -> tuple[int, dict[str, str], bytes]:
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"the connection closed before a whole response head: {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        more = sock.recv(65536)
        assert more, "the connection closed in the middle of the response body"
        body += more
    return status, headers, body[:length]


def send_chunked(url: str, method: str, path: str, headers: dict[str, str], pieces) -> RawResponse:
    """Send `pieces` as a chunked body over a raw socket, stopping as soon as the server has
    answered (or closed the connection); the answer and how much of the body got out."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sock = socket.create_connection((host, port))
    sock.settimeout(60)  # a safety net for a server that neither reads nor answers
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Transfer-Encoding: chunked"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    sent = 0
    early = b""
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for piece in pieces:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break  # the server answered: stop sending
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += len(piece)
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection (after its answer)
        try:
            status, got, body = _read_response(sock, early)
        except ConnectionResetError as err:
            raise AssertionError("the connection was reset before any answer") from err
        return RawResponse(status, got, body, sent)
    finally:
        sock.close()


def chunked_post(url: str, path: str, pieces, headers: dict[str, str] | None = None):
    """httpx with a generator body sends it chunked (no Content-Length)."""
    with httpx.Client(timeout=120) as client:
        return client.post(f"{url}{path}", content=pieces, headers=headers or {})


def assert_over_body_limit(status: int, detail: object) -> None:
    assert status == 413
    assert detail == f"request body is over {BODY_LIMIT} bytes (KDLAB_MAX_BODY_BYTES)"


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# --- the attacks of issue 9, replayed ----------------------------------------------------------


def test_chunked_200_mb_metrics_post_is_413_after_about_the_limit(live_server):
    run_id, token = external_run(live_server)
    headers = {**token, "Content-Type": "application/json"}
    answer = send_chunked(
        live_server, "POST", f"/api/runs/{run_id}/metrics", headers, json_pieces(200 * MB)
    )
    assert_over_body_limit(answer.status, answer.json()["detail"])  # type: ignore[index]
    assert answer.headers.get("connection") == "close"
    assert len(answer.body) < 1000  # no echo of the body
    # the server stopped reading: far less than the 200 MB got out (the limit plus what the
    # loopback socket buffers held)
    assert BODY_LIMIT < answer.sent < BODY_LIMIT + 40 * MB
    keys = httpx.get(f"{live_server}/api/runs/{run_id}/metrics/keys", headers=token).json()
    assert keys["keys"] == []


def test_chunked_metrics_post_over_the_limit_is_413_not_400_through_httpx(live_server):
    run_id, token = external_run(live_server)
    response = chunked_post(
        live_server,
        f"/api/runs/{run_id}/metrics",
        json_pieces(BODY_LIMIT + PIECE),
        {**token, "Content-Type": "application/json"},
    )
    assert_over_body_limit(response.status_code, response.json()["detail"])
    assert len(response.content) < 1000


def test_chunked_run_creation_over_the_limit_is_413_and_no_run_is_made(live_server):
    before = httpx.get(f"{live_server}/api/runs").json()["total"]
    head = b'{"kind": "external", "name": "huge", "params": {"pad": "'
    answer = send_chunked(
        live_server,
        "POST",
        "/api/runs",
        {"Content-Type": "application/json"},
        json_pieces(50 * MB, head),
    )
    assert_over_body_limit(answer.status, answer.json()["detail"])  # type: ignore[index]
    assert answer.sent < 50 * MB
    runs = httpx.get(f"{live_server}/api/runs").json()
    assert runs["total"] == before
    assert "huge" not in {r["name"] for r in runs["runs"]}


def test_chunked_log_post_over_the_limit_is_413_and_no_line_is_stored(live_server):
    run_id, token = external_run(live_server)
    head = b'{"lines": ["'
    answer = send_chunked(
        live_server,
        "POST",
        f"/api/runs/{run_id}/logs",
        {**token, "Content-Type": "application/json"},
        (p.replace(b'"}', b'"]}') for p in json_pieces(200 * MB, head)),
    )
    assert_over_body_limit(answer.status, answer.json()["detail"])  # type: ignore[index]
    assert answer.sent < 200 * MB
    logs = httpx.get(f"{live_server}/api/runs/{run_id}/logs", headers=token).json()
    assert logs["lines"] == []


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_sent(live_server):
    run_id, token = external_run(live_server)
    parts = urlsplit(live_server)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.settimeout(60)
        sock.sendall(
            f"POST /api/runs/{run_id}/metrics HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: {token['Authorization']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {200 * MB}\r\n\r\n".encode()
        )  # not one byte of the body follows: the answer cannot wait for it
        status, _, body = _read_response(sock, b"")
    assert_over_body_limit(status, json.loads(body)["detail"])


def test_a_body_within_the_limit_still_goes_through_chunked(live_server):
    run_id, token = external_run(live_server)
    points = [{"key": "train/loss", "step": s, "value": 1.0 / (s + 1)} for s in range(100)]
    data = json.dumps({"points": points}).encode()
    response = chunked_post(
        live_server,
        f"/api/runs/{run_id}/metrics",
        (data[i : i + 500] for i in range(0, len(data), 500)),
        {**token, "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 100}


def test_a_page_form_over_the_limit_is_413(live_server):
    """The launch form (`request.form()` in its CSRF check) is bounded like the API: fields of
    512 KiB each (Starlette's own cap is 1 MiB a field, 1000 fields)."""
    field = b"pad=" + b"x" * (512 * 1024) + b"&"
    answer = send_chunked(
        live_server,
        "POST",
        "/runs/new",
        {"Content-Type": "application/x-www-form-urlencoded"},
        (field for _ in range(400)),
    )
    assert answer.status == 413, answer.body[:300]
    assert answer.headers["content-type"].startswith("text/html")
    assert f"request body is over {BODY_LIMIT} bytes (KDLAB_MAX_BODY_BYTES)" in answer.body.decode()
    assert answer.sent < 400 * len(field)


# --- uploads and artifacts: their own limit ---------------------------------------------------


def test_chunked_artifact_put_over_the_upload_limit_is_413_with_nothing_stored(
    live_server, settings
):
    run_id, token = external_run(live_server)
    answer = send_chunked(
        live_server,
        "PUT",
        f"/api/runs/{run_id}/artifacts/big.bin",
        {**token, "X-Content-SHA256": "0" * 64},
        bytes_pieces(200 * MB),
    )
    assert answer.status == 413
    assert answer.json() == {  # type: ignore[comparison-overlap]
        "detail": f"request body is over {UPLOAD_LIMIT} bytes (KDLAB_MAX_UPLOAD_BYTES)"
    }
    assert answer.sent < 200 * MB
    assert files_under(settings.artifacts_dir) == []
    listed = httpx.get(f"{live_server}/api/runs/{run_id}/artifacts", headers=token)
    assert listed.json() == []
    # at the limit exactly it is stored
    data = os.urandom(UPLOAD_LIMIT)
    stored = httpx.put(
        f"{live_server}/api/runs/{run_id}/artifacts/ok.bin",
        content=(data[i : i + PIECE] for i in range(0, len(data), PIECE)),
        headers={**token, "X-Content-SHA256": hashlib.sha256(data).hexdigest()},
    )
    assert stored.status_code == 201, stored.text
    assert len(files_under(settings.artifacts_dir)) == 1


def test_chunked_upload_over_the_limit_is_413_with_nothing_stored(live_server, settings):
    boundary = "kdlab-attack"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        'filename="huge.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()

    def pieces() -> Iterator[bytes]:
        yield head
        yield from bytes_pieces(200 * MB)

    answer = send_chunked(
        live_server,
        "POST",
        "/api/uploads",
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        pieces(),
    )
    assert answer.status == 413
    assert "KDLAB_MAX_UPLOAD_BYTES" in answer.json()["detail"]  # type: ignore[index]
    assert answer.sent < UPLOAD_LIMIT + MULTIPART_OVERHEAD + 40 * MB
    assert httpx.get(f"{live_server}/api/uploads").json() == []
    assert files_under(settings.uploads_dir) == []


def test_an_upload_over_the_limit_plus_framing_is_refused_by_its_content_length(live_server):
    parts = urlsplit(live_server)
    limit = UPLOAD_LIMIT + MULTIPART_OVERHEAD
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.settimeout(60)
        sock.sendall(
            f"POST /api/uploads HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n".encode()
        )
        status, _, body = _read_response(sock, b"")
    assert status == 413
    assert json.loads(body)["detail"] == (
        f"request body is over {limit} bytes (KDLAB_MAX_UPLOAD_BYTES={UPLOAD_LIMIT} plus "
        f"{MULTIPART_OVERHEAD} bytes of multipart framing)"
    )


# --- error bodies echo only a short prefix of the input ---------------------------------------


def test_a_10_mb_unknown_field_gives_a_short_422(live_server):
    run_id, token = external_run(live_server)
    body = json.dumps({"points": [], "junk": "j" * (10 * MB)}).encode()
    response = httpx.post(
        f"{live_server}/api/runs/{run_id}/metrics",
        content=body,
        headers={**token, "Content-Type": "application/json"},
        timeout=120,
    )
    assert response.status_code == 422
    assert len(response.content) < 2000
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "junk"] and error["type"] == "extra_forbidden"
    assert error["input"] == "j" * 200 + "…"


def test_a_10_mb_unknown_field_name_and_nested_value_give_a_short_422(live_server):
    """FastAPI's own validation (POST /api/runs): a huge key and a huge dict are cut too."""
    body = json.dumps(
        {"kind": "external", "name": "n", "k" * (5 * MB): {"deep": ["v" * (5 * MB)]}}
    ).encode()
    response = httpx.post(
        f"{live_server}/api/runs",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    assert response.status_code == 422
    assert len(response.content) < 4000
    assert httpx.get(f"{live_server}/api/runs").json()["total"] == 0


def test_a_1_mb_bad_value_gives_a_short_422(live_server):
    run_id, token = external_run(live_server)
    value = "1" * MB
    response = httpx.post(
        f"{live_server}/api/runs/{run_id}/metrics",
        json={"points": [{"key": "train/loss", "step": 0, "value": value}]},
        headers=token,
        timeout=120,
    )
    assert response.status_code == 422
    assert len(response.content) < 2000
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "points", 0, "value"]
    assert error["input"] == value[:200] + "…"


def test_many_errors_are_listed_up_to_50_then_counted(live_server):
    run_id, token = external_run(live_server)
    points = [{"key": "train/loss", "step": s, "value": "bad"} for s in range(5000)]
    response = httpx.post(
        f"{live_server}/api/runs/{run_id}/metrics",
        json={"points": points},
        headers=token,
        timeout=120,
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == 51
    assert [e["loc"] for e in detail[:50]] == [["body", "points", s, "value"] for s in range(50)]
    assert detail[50]["msg"].startswith("and 4950 more errors")
    assert len(response.content) < 20_000
