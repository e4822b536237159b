"""Pages behind a token: sign-in, the session cookie, CSRF on every state change, CSP."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from kdlab.backend.main import create_app
from kdlab.backend.settings import Settings
from tests.factories import create_run

TOKEN = "page-secret"


@pytest.fixture
def secure_client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"token": TOKEN}))
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as test_client:
        yield test_client
    app.state.engine.dispose()


def _signed_in(client: TestClient) -> str:
    """Sign in through the form; the page's CSRF token."""
    answer = client.post(
        "/signin", data={"token": TOKEN, "next": "/"}, headers={"Origin": "http://127.0.0.1"}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    page = client.get("/")
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
    assert match is not None
    return match.group(1)


def test_a_page_without_a_session_redirects_to_sign_in(secure_client: TestClient) -> None:
    answer = secure_client.get("/compare?run=a")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/signin?next=%2Fcompare%3Frun%3Da"
    htmx = secure_client.get("/", headers={"HX-Request": "true"})
    assert htmx.status_code == 401 and htmx.headers["HX-Redirect"].startswith("/signin")
    assert secure_client.get("/signin").status_code == 200
    assert secure_client.get("/api/health").status_code == 200  # the API keeps its own rules


def test_sign_in_sets_an_httponly_strict_cookie(secure_client: TestClient) -> None:
    wrong = secure_client.post(
        "/signin", data={"token": "nope"}, headers={"Origin": "http://127.0.0.1"}
    )
    assert wrong.status_code == 401 and "That token is not valid" in wrong.text
    answer = secure_client.post(
        "/signin",
        data={"token": TOKEN, "next": "https://elsewhere.example/"},
        headers={"Origin": "http://127.0.0.1"},
    )
    assert answer.headers["location"] == "/"  # never off-site
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("kdlab_session=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert secure_client.get("/").status_code == 200


def test_sign_in_from_another_site_is_refused(secure_client: TestClient) -> None:
    answer = secure_client.post(
        "/signin", data={"token": TOKEN}, headers={"Origin": "https://evil.example"}
    )
    assert answer.status_code == 403
    assert "kdlab_session" not in answer.headers.get("set-cookie", "")


def test_state_changes_need_the_csrf_token(secure_client: TestClient, db_session) -> None:
    run = create_run(db_session, name="victim")
    csrf = _signed_in(secure_client)
    refused = secure_client.post(f"/runs/{run.id}/cancel")
    assert refused.status_code == 403 and "security token (CSRF)" in refused.text
    wrong = secure_client.post(f"/runs/{run.id}/cancel", data={"csrf_token": csrf[:-2] + "xx"})
    assert wrong.status_code == 403
    db_session.refresh(run)
    assert run.status == "queued"  # nothing changed
    db_session.commit()  # SQLite: end the read (every transaction takes the write lock)
    accepted = secure_client.post(f"/runs/{run.id}/cancel", headers={"X-CSRF-Token": csrf})
    assert accepted.status_code == 303
    db_session.refresh(run)
    assert run.status == "cancelled"
    db_session.commit()
    in_form = secure_client.post(f"/runs/{run.id}/delete", data={"csrf_token": csrf})
    assert in_form.status_code == 303


def test_the_api_accepts_the_session_but_its_changes_need_csrf(
    secure_client: TestClient, db_session
) -> None:
    run = create_run(db_session, name="api-victim")
    csrf = _signed_in(secure_client)
    assert secure_client.get(f"/api/runs/{run.id}").status_code == 200  # charts, downloads
    refused = secure_client.post(f"/api/runs/{run.id}/cancel")
    assert refused.status_code == 403
    assert "X-CSRF-Token" in refused.json()["detail"]
    done = secure_client.post(f"/api/runs/{run.id}/cancel", headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200 and done.json()["status"] == "cancelled"


def test_sign_out_ends_the_session(secure_client: TestClient) -> None:
    csrf = _signed_in(secure_client)
    out = secure_client.post("/signout", data={"csrf_token": csrf})
    assert out.status_code == 303
    assert secure_client.get("/").status_code == 303


def test_pages_carry_a_strict_csp_and_no_inline_script(client: TestClient) -> None:
    page = client.get("/runs/new")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "'unsafe" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["vary"] == "HX-Request"
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page.text, flags=re.S)
    for attributes, body in scripts:
        assert "src=" in attributes or 'type="application/json"' in attributes, attributes
        assert "src=" not in attributes or not body.strip()
    assert ' style="' not in page.text
    js = client.get("/static/js/pages/run.js")
    assert js.headers["content-type"].startswith("text/javascript")


def test_open_access_pages_need_no_sign_in_but_posts_need_csrf(
    client: TestClient, db_session
) -> None:
    run = create_run(db_session, name="open")
    page = client.get("/")
    assert page.status_code == 200 and "kdlab_session" in page.headers.get("set-cookie", "")
    assert client.post(f"/runs/{run.id}/cancel").status_code == 403
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    assert client.post(f"/runs/{run.id}/cancel", headers={"X-CSRF-Token": csrf}).status_code in (
        200,
        303,
    )
