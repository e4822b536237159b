"""Open mode (loopback, no token) against what a web page could make the browser send:
DNS rebinding (a foreign `Host:`) → 400, cross-site forms and fetches (`Origin`,
`Sec-Fetch-Site`) → 403, and nothing is done; scripts without these headers keep working."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Metric, Run, Upload
from kdlab.backend.main import create_app
from kdlab.backend.origin_guard import cross_site_refusal, host_refusal, is_own_origin
from kdlab.backend.settings import Settings
from tests.factories import create_run

SERVER = "http://127.0.0.1:8000"
EVIL = "http://evil.example"
POINTS = '{"points": [{"key": "train/loss_total", "step": 1, "value": 0.5}]}'


def browser_client(settings: Settings, base_url: str = SERVER) -> TestClient:
    """Like a browser on this machine: a loopback peer address and the Host of `base_url`."""
    return TestClient(create_app(settings), base_url=base_url, client=("127.0.0.1", 50000))


@pytest.fixture
def web(settings: Settings) -> Iterator[TestClient]:
    with browser_client(settings) as client:
        yield client
    client.app.state.engine.dispose()  # type: ignore[attr-defined]


@pytest.fixture
def run_id(web: TestClient) -> str:
    session: Session = web.app.state.session_factory()  # type: ignore[attr-defined]
    try:
        return create_run(session, name="victim", status="running").id
    finally:
        session.close()


def _count(web: TestClient, model: type) -> int:
    with web.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return session.scalar(select(func.count()).select_from(model)) or 0


def _cancel_requested(web: TestClient, run_id: str) -> bool:
    with web.app.state.session_factory() as session:  # type: ignore[attr-defined]
        run = session.get(Run, run_id)
        assert run is not None
        return run.cancel_requested


def test_open_mode_checks_hosts_and_allows_loopback_names() -> None:
    allowed = Settings(token=None, host="127.0.0.1").host_allow_list()
    assert allowed is not None
    for host in ("localhost:8000", "127.0.0.1:8000", "127.0.0.2", "[::1]:8000", "LOCALHOST"):
        assert host_refusal(host, allowed) is None, host
    assert host_refusal("evil.example:8000", allowed) == (
        "host evil.example is not allowed; add it to KDLAB_ALLOWED_HOSTS"
    )
    assert host_refusal("127.0.0.1.evil.example", allowed) is not None


def test_allowed_hosts_setting() -> None:
    listed = Settings(token="t" * 32, host="0.0.0.0", allowed_hosts="kd.lan, Lab.Example:9000")
    allowed = listed.host_allow_list()
    assert allowed is not None and {"kd.lan", "lab.example"} <= allowed
    assert host_refusal("evil.example", allowed) is not None
    assert host_refusal("127.0.0.1:8000", allowed) is None  # workers' default public_url
    public = Settings(token="t" * 32, host="0.0.0.0", allowed_hosts="kd.lan",
                      public_url="http://gpu-box.internal:8000")  # fmt: skip
    assert "gpu-box.internal" in (public.host_allow_list() or ())
    bound = Settings(token=None, host="127.0.0.5").host_allow_list()
    assert bound is not None and "127.0.0.5" in bound
    # a token off loopback without the list: the token protects, no Host check
    assert Settings(token="t" * 32, host="0.0.0.0").host_allow_list() is None
    assert Settings(token=None, allowed_hosts="*").host_allow_list() is None


def test_origin_rules() -> None:
    assert is_own_origin("http://127.0.0.1:8000", "http", "127.0.0.1:8000")
    assert is_own_origin("http://localhost", "http", "localhost:80")
    assert is_own_origin("http://[::1]:8000", "http", "[::1]:8000")
    assert not is_own_origin("http://127.0.0.1:9000", "http", "127.0.0.1:8000")  # another port
    assert not is_own_origin("https://127.0.0.1:8000", "http", "127.0.0.1:8000")
    assert not is_own_origin("null", "http", "127.0.0.1:8000")
    assert cross_site_refusal("GET", "http", "127.0.0.1:8000", EVIL, "cross-site") is None
    assert cross_site_refusal("POST", "http", "127.0.0.1:8000", None, None) is None
    assert cross_site_refusal("POST", "http", "127.0.0.1:8000", None, "same-origin") is None
    assert cross_site_refusal("DELETE", "http", "127.0.0.1:8000", None, "none") is None
    assert cross_site_refusal("PUT", "http", "127.0.0.1:8000", None, "same-site") is not None


def test_a_foreign_host_is_refused_and_nothing_is_done(web: TestClient, run_id: str) -> None:
    rebound = {"Host": "evil.example:8000"}
    page = web.get("/", headers=rebound)
    assert page.status_code == 400
    assert page.text == "host evil.example is not allowed; add it to KDLAB_ALLOWED_HOSTS"
    assert "set-cookie" not in page.headers  # no session was opened
    api = web.get("/api/runs", headers=rebound)
    assert api.status_code == 400 and "KDLAB_ALLOWED_HOSTS" in api.json()["detail"]
    cancel = web.post(f"/api/runs/{run_id}/cancel", headers=rebound)
    assert cancel.status_code == 400
    assert not _cancel_requested(web, run_id)
    assert web.get("/api/runs", headers={"Host": "localhost:8000"}).status_code == 200


def test_allowed_hosts_lets_a_named_host_in(settings: Settings) -> None:
    named = settings.model_copy(update={"allowed_hosts": "kd.lan"})
    with browser_client(named, "http://kd.lan:8000") as web:
        assert web.get("/api/runs").status_code == 200
        assert web.get("/api/runs", headers={"Host": "evil.example"}).status_code == 400
    web.app.state.engine.dispose()  # type: ignore[attr-defined]


def test_a_cross_site_multipart_upload_is_refused(web: TestClient) -> None:
    response = web.post(
        "/api/uploads",
        files={"file": ("teacher.safetensors", b"not even weights")},
        headers={"Origin": EVIL},
    )
    assert response.status_code == 403
    assert response.json()["detail"] == (
        f"cross-site request refused: origin {EVIL} is not this server's ({SERVER})"
    )
    assert _count(web, Upload) == 0


def test_a_cross_site_text_plain_metrics_post_is_refused(web: TestClient, run_id: str) -> None:
    # a <form enctype="text/plain"> needs no CORS preflight; the body parses as JSON
    plain = {"Content-Type": "text/plain", "Origin": EVIL}
    response = web.post(f"/api/runs/{run_id}/metrics", content=POINTS, headers=plain)
    assert response.status_code == 403 and EVIL in response.json()["detail"]
    assert _count(web, Metric) == 0
    # the same body from a script (no Origin) is stored: the route itself would take it
    scripted = web.post(
        f"/api/runs/{run_id}/metrics", content=POINTS, headers={"Content-Type": "text/plain"}
    )
    assert scripted.status_code == 200, scripted.text
    assert _count(web, Metric) == 1


def test_a_cross_site_cancel_is_refused(web: TestClient, run_id: str) -> None:
    for headers in (
        {"Origin": EVIL},
        {"Origin": "http://127.0.0.1:9999"},  # another local port is another origin
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:9999"},
    ):
        api = web.post(f"/api/runs/{run_id}/cancel", headers=headers)
        assert api.status_code == 403, headers
        assert api.json()["detail"].startswith("cross-site request refused"), headers
        page = web.post(f"/runs/{run_id}/cancel", headers=headers)  # the page's own route
        assert page.status_code == 403, headers
    assert not _cancel_requested(web, run_id)


def test_same_origin_and_headerless_requests_go_on(web: TestClient, run_id: str) -> None:
    same = web.post(
        f"/api/runs/{run_id}/cancel",
        headers={"Origin": SERVER, "Sec-Fetch-Site": "same-origin"},
    )
    assert same.status_code == 200, same.text
    assert same.json()["cancel_requested"] is True
    assert web.get(f"/api/runs/{run_id}", headers={"Origin": EVIL}).status_code == 200  # reads
    other = web.post("/api/runs", json={"kind": "external", "name": "scripted"})  # curl-like
    assert other.status_code == 201, other.text


def test_the_dashboards_own_forms_still_work(web: TestClient, run_id: str) -> None:
    page = web.get(f"/runs/{run_id}")
    assert page.status_code == 200
    csrf = page.text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    answer = web.post(
        f"/runs/{run_id}/cancel",
        headers={"Origin": SERVER, "Sec-Fetch-Site": "same-origin", "X-CSRF-Token": csrf,
                 "HX-Request": "true"},
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert _cancel_requested(web, run_id)


def test_no_client_address_escapes_the_host_check(settings: Settings) -> None:
    # behind uvicorn's proxy headers the peer address is whatever X-Forwarded-For says, so
    # the check must not depend on it (not even on Starlette's in-process "testclient")
    app = create_app(settings)
    for peer in (("testclient", 50000), ("127.0.0.1", 50000)):
        with TestClient(app, base_url="http://evil.example:8000", client=peer) as client:
            assert client.get("/api/health").status_code == 400, peer
    app.state.engine.dispose()
