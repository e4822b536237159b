"""axe-core on every page (serious/critical violations fail), and every page under the real CSP
with no console error. (The sign-in page, the empty runs page, the 422 form and a running run
are checked where those states are made: test_auth, test_launch, test_run_page.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import (
    Launched,
    Server,
    assert_no_axe_violations,
    console_log,
    wait_for_charts,
)

pytestmark = pytest.mark.browser


def test_axe_on_runs_page(axe_page: Page, teacher: Launched, kd: Launched) -> None:
    axe_page.goto("/")
    expect(axe_page.get_by_role("link", name=kd.name)).to_be_visible()
    assert_no_axe_violations(axe_page, "the runs page")


def test_axe_on_launch_page(axe_page: Page, teacher: Launched) -> None:
    axe_page.goto("/runs/new?recipe=digits-teacher")
    expect(axe_page.locator("#f-name")).to_be_visible()
    assert_no_axe_violations(axe_page, "the launch page (train recipe)")
    axe_page.goto("/runs/new?recipe=digits-logits-kd")
    with axe_page.expect_response(lambda r: "/runs/new/form" in r.url):
        axe_page.get_by_label("Teacher run", exact=True).select_option(teacher.id)
    with axe_page.expect_response(lambda r: r.url.endswith("/runs/new/validate")):
        axe_page.get_by_role("button", name="Check").click()
    expect(axe_page.locator("#validation-report")).to_be_visible()
    assert_no_axe_violations(axe_page, "the launch page (KD recipe, checked)")


def test_axe_on_finished_run_page(axe_page: Page, kd: Launched) -> None:
    axe_page.goto(f"/runs/{kd.id}")
    expect(axe_page.locator("#run-status")).to_have_text("succeeded")
    wait_for_charts(axe_page)
    assert_no_axe_violations(axe_page, "the run page of a finished run")


def test_axe_on_compare_page(axe_page: Page, teacher: Launched, kd: Launched) -> None:
    axe_page.goto("/compare")
    expect(axe_page.get_by_role("group", name="Recent runs")).to_be_visible()
    assert_no_axe_violations(axe_page, "the compare page without runs picked")
    axe_page.goto(f"/compare?run={teacher.id}&run={kd.id}")
    wait_for_charts(axe_page, [teacher.name, kd.name])
    expect(axe_page.locator("#config-diff table")).to_be_visible()
    assert_no_axe_violations(axe_page, "the compare page")


def test_pages_under_csp_log_no_errors(
    open_page: Callable[..., Page],
    server: Server,
    token_server: Server,
    teacher: Launched,
    kd: Launched,
) -> None:
    """Flow 9: without bypass_csp, every page loads, runs its scripts and draws its charts with
    no console error (a CSP refusal of an inline script/style would be one)."""
    page = open_page(server)
    answer = page.goto("/")
    assert answer is not None
    policy = answer.headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy and "style-src 'self'" in policy, policy
    expect(page.get_by_role("link", name=kd.name)).to_be_visible()
    page.goto("/runs/new?recipe=digits-logits-kd")
    with page.expect_response(lambda r: "/runs/new/form" in r.url):
        page.get_by_label("Teacher run", exact=True).select_option(teacher.id)
    with page.expect_response(lambda r: r.url.endswith("/runs/new/validate")):
        page.get_by_role("button", name="Check").click()
    expect(page.locator("#validation-report")).to_be_visible()
    page.goto(f"/runs/{kd.id}")
    wait_for_charts(page)
    page.goto(f"/compare?run={teacher.id}&run={kd.id}")
    wait_for_charts(page, [teacher.name, kd.name])
    expect(page.locator("#config-diff table")).to_be_visible()
    log = console_log(page)
    csp = [e for e in log.errors if "Content Security Policy" in e]
    assert not csp, "CSP refusals:\n" + "\n".join(csp)
    log.assert_clean()

    signin = open_page(token_server)
    signin.goto("/signin")
    expect(signin.get_by_label("Token", exact=True)).to_be_visible()
    console_log(signin).assert_clean()
