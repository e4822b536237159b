"""A finished run's token can no longer write; security headers on every kind of response; the
API docs from vendored files, behind the token; a long token off loopback."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from kdlab.backend.main import create_app
from kdlab.backend.pages.templating import STATIC_DIR
from kdlab.backend.settings import Settings

TOKEN = "an-admin-token-of-32-characters!"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
POINTS = {"points": [{"key": "train/loss_total", "step": 1, "value": 0.5}]}
REVOKED = "this run's token was revoked when the run finished"


@pytest.fixture
def secure(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"token": TOKEN}))
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as client:
        yield client
    app.state.engine.dispose()


def _external_run(client: TestClient, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    created = client.post("/api/runs", json={"kind": "external", "name": "ext"}, headers=headers)
    assert created.status_code == 201, created.text
    body = created.json()
    return body["id"], {"Authorization": f"Bearer {body['token']}"}


def _put_student(client: TestClient, run_id: str, headers: dict[str, str]) -> Response:
    data = b"student weights"
    return client.put(
        f"/api/runs/{run_id}/artifacts/student.safetensors?kind=file",
        content=data,
        headers={**headers, "X-Content-SHA256": hashlib.sha256(data).hexdigest()},
    )


# --------------------------------------------------------------------------- finished run token


def test_a_succeeded_runs_token_cannot_write(secure: TestClient) -> None:
    run_id, mine = _external_run(secure, ADMIN)
    assert secure.post(f"/api/runs/{run_id}/heartbeat", json={}, headers=mine).status_code == 200
    assert secure.post(f"/api/runs/{run_id}/metrics", json=POINTS, headers=mine).status_code == 200
    logs = {"lines": ["training"], "kind": "log"}
    assert secure.post(f"/api/runs/{run_id}/logs", json=logs, headers=mine).status_code == 200
    assert _put_student(secure, run_id, mine).status_code in (200, 201)

    done = secure.post(f"/api/runs/{run_id}/status", json={"status": "succeeded"}, headers=mine)
    assert done.status_code == 200 and done.json()["status"] == "succeeded"

    refused = [
        secure.post(f"/api/runs/{run_id}/heartbeat", json={}, headers=mine),
        secure.post(f"/api/runs/{run_id}/metrics", json=POINTS, headers=mine),
        secure.post(f"/api/runs/{run_id}/logs", json=logs, headers=mine),
        _put_student(secure, run_id, mine),
        secure.post(f"/api/runs/{run_id}/status", json={"status": "succeeded"}, headers=mine),
    ]
    for response in refused:
        assert response.status_code == 401, (response.request.url, response.text)
        assert response.json()["detail"] == REVOKED
    assert secure.get(f"/api/runs/{run_id}/logs", headers=ADMIN).json()["lines"] == ["training"]
    unknown = secure.get(f"/api/runs/{run_id}", headers={"Authorization": "Bearer kdl_nope"})
    assert unknown.status_code == 401 and unknown.json()["detail"] == "invalid or revoked token"
    # the run's other tokens stay as they were: another run is not touched
    other_id, other = _external_run(secure, ADMIN)
    beat = secure.post(f"/api/runs/{other_id}/heartbeat", json={}, headers=other)
    assert beat.status_code == 200


@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
def test_every_finished_status_revokes(secure: TestClient, outcome: str) -> None:
    run_id, mine = _external_run(secure, ADMIN)
    ended = secure.post(f"/api/runs/{run_id}/status", json={"status": outcome}, headers=mine)
    assert ended.status_code == 200, ended.text
    beat = secure.post(f"/api/runs/{run_id}/heartbeat", json={}, headers=mine)
    assert beat.status_code == 401 and beat.json()["detail"] == REVOKED


# --------------------------------------------------------------------------- headers


def _assert_security_headers(response: Response, what: str) -> None:
    headers = response.headers
    assert headers.get("x-content-type-options") == "nosniff", what
    assert headers.get("x-frame-options") == "DENY", what
    assert headers.get("referrer-policy") == "same-origin", what
    assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), what


def test_security_headers_on_every_kind_of_response(settings: Settings) -> None:
    small = settings.model_copy(update={"max_body_bytes": 64})
    app = create_app(small)
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as client:
        run_id = client.post("/api/runs", json={"kind": "external", "name": "h"}).json()["id"]
        client.post(f"/api/runs/{run_id}/status", json={"status": "succeeded"})
        cases = {
            "API JSON": (client.get("/api/runs"), 200),
            "API 404": (client.get("/api/runs/nope"), 404),
            "unknown API path": (client.get("/api/nothing-here"), 404),
            "413": (client.post(f"/api/runs/{run_id}/logs", content=b"x" * 100), 413),
            "422": (client.post("/api/runs", json={"kind": "bogus"}), 422),
            "static file": (client.get("/static/css/app.css"), 200),
            "static 404": (client.get("/static/none.css"), 404),
            "redirect": (client.get("/favicon.ico"), 308),
            "page": (client.get("/"), 200),
            "page 404": (client.get("/runs/nope"), 404),
            "stream": (client.get(f"/api/runs/{run_id}/events?once=true"), 200),
            "cross-site refused": (
                client.post(f"/api/runs/{run_id}/cancel", headers={"Origin": "http://e.example"}),
                403,
            ),
        }
        for what, (response, status) in cases.items():
            assert response.status_code == status, (what, response.text[:300])
            _assert_security_headers(response, what)
    app.state.engine.dispose()


def test_security_headers_on_a_refused_foreign_host(settings: Settings) -> None:
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.get("/api/runs", headers={"Host": "evil.example"})
        assert response.status_code == 400
        _assert_security_headers(response, "400 foreign host")
    app.state.engine.dispose()


# --------------------------------------------------------------------------- /docs


def test_docs_are_served_from_vendored_assets(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert not re.search(r"https?://", html), "the docs page must load nothing from elsewhere"
    assert "<script>" not in html and "<script " in html  # no inline script
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in assets
    assert "/static/vendor/swagger-ui/swagger-ui.css" in assets
    assert "/static/js/pages/docs.js" in assets
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200, asset
        if asset.endswith(".js"):
            assert served.headers["content-type"].startswith("text/javascript"), asset
    module = client.get("/static/js/pages/docs.js").text
    assert 'url: "/api/openapi.json"' in module and 'dom_id: "#swagger-ui"' in module
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-eval" not in csp and "script-src 'self' 'unsafe-inline'" not in csp
    assert (STATIC_DIR / "vendor" / "swagger-ui" / "LICENSE").is_file()
    schema = client.get("/api/openapi.json")
    assert schema.status_code == 200 and schema.json()["info"]["title"] == "KD Lab"
    assert client.get("/redoc").status_code == 404  # no CDN-loaded ReDoc either


def test_docs_and_schema_need_the_token(secure: TestClient) -> None:
    page = secure.get("/docs")
    assert page.status_code == 303 and page.headers["location"] == "/signin?next=%2Fdocs"
    schema = secure.get("/api/openapi.json")
    assert schema.status_code == 401
    assert secure.get("/api/openapi.json", headers=ADMIN).status_code == 200
    signed_in = secure.post(
        "/signin", data={"token": TOKEN, "next": "/docs"}, headers={"Origin": "http://127.0.0.1"}
    )
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/docs"
    assert secure.get("/docs").status_code == 200
    assert secure.get("/api/openapi.json").status_code == 200  # the browser's session


# --------------------------------------------------------------------------- token length


def test_a_short_token_off_loopback_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32") as refused:
        Settings(host="0.0.0.0", token="x").check_bind()
    assert "secrets.token_urlsafe(32)" in str(refused.value)
    with pytest.raises(ValueError, match="KDLAB_TOKEN"):
        Settings(host="::", token="y" * 31).check_bind()
    Settings(host="0.0.0.0", token="z" * 32).check_bind()
    Settings(host="127.0.0.1", token="x").check_bind()  # loopback: any token
