"""Screenshots of every page in light and dark at 1280×900 → docs/screenshots/<page>-<scheme>.png
(overwritten each run; commit them when the pages change), taken on `kdlab serve --demo` once its
runs have finished — the README shows them. Console errors are test_a11y's job."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from kdlab.backend.pages.compare import demo_view
from kdlab.backend.services.dispatch import DEMO_BASELINE, DEMO_KD, DEMO_TEACHER
from tests.browser.conftest import SCREENSHOTS, Server, wait_for_charts

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_screenshots(
    open_page: Callable[..., Page], demo_server: Server, token_server: Server, scheme: str
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    runs = {r["name"]: r for r in demo_server.api.get("/api/runs").json()["runs"]}
    teacher, kd = runs[DEMO_TEACHER], runs[DEMO_KD]
    page = open_page(demo_server, color_scheme=scheme)
    assert page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches") == (scheme == "dark")

    def shot(name: str, *, full_page: bool) -> None:
        page.evaluate("document.fonts.ready")
        if full_page:  # sticky bars (the launch form's buttons) then sit where they belong
            page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
        page.screenshot(
            path=SCREENSHOTS / f"{name}-{scheme}.png", full_page=full_page, animations="disabled"
        )

    page.goto("/")
    expect(page.get_by_role("link", name=kd["name"])).to_be_visible()
    shot("runs", full_page=False)

    page.goto("/runs/new?recipe=digits-logits-kd")
    with page.expect_response(lambda r: "/runs/new/form" in r.url):
        page.get_by_label("Teacher run", exact=True).select_option(teacher["id"])
    expect(page.locator("#f-teacher-weights-run-id")).to_have_value(teacher["id"])
    shot("launch", full_page=True)

    page.goto(f"/runs/{kd['id']}")
    expect(page.locator("#run-status")).to_have_text("succeeded")
    wait_for_charts(page)
    shot("run", full_page=True)

    page.goto(demo_view())
    wait_for_charts(page, [DEMO_TEACHER, DEMO_BASELINE, DEMO_KD])
    expect(page.locator("#config-diff table")).to_be_visible()
    shot("compare", full_page=True)

    signin = open_page(token_server, color_scheme=scheme)
    signin.goto("/signin")
    expect(signin.get_by_label("Token", exact=True)).to_be_visible()
    signin.screenshot(path=SCREENSHOTS / f"signin-{scheme}.png", animations="disabled")
