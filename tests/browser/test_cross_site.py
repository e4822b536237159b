"""A page on another origin (another loopback port: the same *site*, so SameSite cookies would
go along) auto-posts a form to the open-mode server's cancel route: refused with 403, the run
goes on; the dashboard's own Cancel button still cancels it."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import Server, console_log, unique
from tests.conftest import free_port

ATTACK = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Free prizes</title></head>
<body>
<form method="post" action="{action}"><input type="hidden" name="why" value="csrf"></form>
<script>document.forms[0].submit();</script>
</body></html>
"""


@pytest.fixture
def attacker(server: Server) -> Iterator[Callable[[str], str]]:
    """`attacker(action)`: the URL of a page on another loopback port whose form posts to
    `action` as soon as it loads."""
    pages: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def make(action: str) -> str:
        path = f"/{len(pages)}.html"
        pages[path] = ATTACK.format(action=action)
        return f"http://127.0.0.1:{httpd.server_address[1]}{path}"

    try:
        yield make
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def victim(server: Server) -> Iterator[dict]:
    run = server.create_run(
        {
            "name": unique("cross-site-victim"),
            "experiment": "browser-cross-site",
            "kind": "train",
            "dataset": {"name": "digits"},
            "student": {"name": "mlp", "params": {"hidden": [16]}},
            "train": {"epochs": 200},
        }
    )
    try:
        yield run
    finally:
        if server.run(run["id"])["status"] not in ("succeeded", "failed", "cancelled"):
            server.api.post(f"/api/runs/{run['id']}/cancel")


def test_a_page_on_another_origin_cannot_cancel_a_run(
    page: Page, server: Server, victim: dict, attacker: Callable[[str], str]
) -> None:
    page.goto("/")  # the user has the dashboard open: the browser holds its session cookie
    cancel = f"{server.url}/api/runs/{victim['id']}/cancel"
    with page.expect_response(lambda r: r.url == cancel) as answer:
        page.goto(attacker(cancel))
    assert answer.value.status == 403
    assert "cross-site request refused" in answer.value.text()
    after = server.run(victim["id"])  # the answer came back: the server is done with it
    assert after["cancel_requested"] is False and after["status"] != "cancelled"

    page.goto(f"/runs/{victim['id']}")
    page.on("dialog", lambda dialog: dialog.accept())
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith(f"/runs/{victim['id']}/cancel")
    ) as own:
        page.get_by_role("button", name="Cancel run").click()
    assert own.value.status == 200
    status = page.locator("#run-status")
    expect(status).to_have_text(re.compile(r"^(running \(cancelling\)|cancelled)$"))
    expect(status).to_have_text("cancelled", timeout=60_000)
    console_log(page).assert_clean(allow=(r"status of 403 .*/api/runs/[0-9a-f]+/cancel",))
