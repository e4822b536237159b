"""Bearer tokens: admin token, run-scoped tokens, open loopback access, the bind guard."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from kdlab.backend.main import create_app
from kdlab.backend.settings import Settings
from tests.factories import create_run

ADMIN = {"Authorization": "Bearer secret"}


@pytest.fixture
def secure_client(settings: Settings) -> Iterator[TestClient]:
    """The app with an admin token configured (so no open access)."""
    app = create_app(settings.model_copy(update={"token": "secret"}))
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client
    app.state.engine.dispose()


def test_tokens_are_required_and_checked(secure_client):
    assert secure_client.get("/api/health").status_code == 200  # health needs none
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic secret"}):
        for path in ("/api/runs", "/api/catalog", "/api/runs/x"):
            response = secure_client.get(path, headers=headers)
            assert response.status_code == 401, (headers, path)
            assert response.json()["detail"]
    assert secure_client.get("/api/runs", headers=ADMIN).status_code == 200


def test_run_token_reaches_only_its_own_run(secure_client):
    factory = secure_client.app.state.session_factory
    with factory() as session:
        other = create_run(session, name="other").id
    created = secure_client.post(
        "/api/runs", json={"kind": "external", "name": "ext"}, headers=ADMIN
    ).json()
    own, token = created["id"], {"Authorization": f"Bearer {created['token']}"}

    assert secure_client.get(f"/api/runs/{own}", headers=token).status_code == 200
    posted = secure_client.post(f"/api/runs/{own}/logs", json={"lines": ["hi"]}, headers=token)
    assert posted.status_code == 200
    assert secure_client.get(f"/api/runs/{own}/logs", headers=token).json() == {"lines": ["hi"]}
    assert secure_client.get(f"/api/runs/{own}/events?once=1", headers=token).status_code == 200
    assert secure_client.get("/api/catalog", headers=token).status_code == 200

    for method, path, body in (
        ("get", f"/api/runs/{other}", None),
        ("post", f"/api/runs/{other}/logs", {"lines": ["x"]}),
        ("get", f"/api/runs/{other}/events?once=1", None),
        ("get", "/api/runs", None),  # admin only
        ("post", f"/api/runs/{own}/cancel", None),  # admin only, even on its own run
        ("delete", f"/api/runs/{own}", None),
        ("post", "/api/runs", {"kind": "external", "name": "y"}),
    ):
        response = secure_client.request(method, path, json=body, headers=token)
        assert response.status_code == 403, (method, path)
    assert "belongs to run" in secure_client.get(f"/api/runs/{other}", headers=token).text


def test_loopback_without_token_is_open(client):
    assert client.get("/api/runs").status_code == 200
    assert client.post("/api/runs", json={"kind": "external", "name": "x"}).status_code == 201


def test_binding_beyond_loopback_needs_a_token():
    with pytest.raises(ValueError, match="KDLAB_TOKEN"):
        Settings(host="0.0.0.0", token=None).check_bind()
    Settings(host="0.0.0.0", token="s" * 32).check_bind()
    Settings(host="127.0.0.1", token=None).check_bind()
    assert not Settings(host="::1", token="t").open_access
    assert Settings(host="localhost", token=None).open_access
