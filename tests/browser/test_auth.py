"""Sign-in on a server with KDLAB_TOKEN: redirect, wrong and right token, the session cookie's
flags, CSRF on a form post, and the API docs behind the sign-in."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import Server, assert_no_axe_violations, console_log

pytestmark = pytest.mark.browser

# Chrome logs the 401 of the wrong-token answer (a full page) as a console error.
REJECTED = (r"status of 401",)


def sign_in(page: Page, token: str) -> None:
    page.get_by_label("Token", exact=True).fill(token)
    page.get_by_role("button", name="Sign in").click()


def test_sign_in_with_token(open_page: Callable[..., Page], token_server: Server) -> None:
    """Flow 8: `/` → the sign-in page; a wrong token is refused with a message; the right one
    lands on `/` with an HttpOnly, SameSite=Strict session cookie."""
    assert token_server.token is not None
    page = open_page(token_server)
    base = token_server.url
    page.goto("/")
    expect(page).to_have_url(f"{base}/signin?next=%2F")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to KD Lab")

    sign_in(page, "not-the-token")
    error = page.locator("#signin-error")
    expect(error).to_be_visible()
    expect(error).not_to_be_empty()
    expect(page.get_by_label("Token", exact=True)).to_have_attribute("aria-invalid", "true")
    expect(page).to_have_url(re.compile(r"/signin"))
    assert not [c for c in page.context.cookies() if c["name"] == "kdlab_session"]

    sign_in(page, token_server.token)
    expect(page).to_have_url(f"{base}/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Runs")
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    cookies = [c for c in page.context.cookies() if c["name"] == "kdlab_session"]
    assert len(cookies) == 1, page.context.cookies()
    assert cookies[0]["httpOnly"] is True
    assert cookies[0]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie").find("kdlab_session") == -1  # unreadable from JS
    console_log(page).assert_clean(allow=REJECTED)


def test_api_docs_need_a_sign_in_and_render_under_the_csp(
    open_page: Callable[..., Page], token_server: Server
) -> None:
    """/docs → sign-in → Swagger UI from the vendored files, under the page's CSP (no bypass:
    any CSP violation is a console error), its schema read with the session."""
    assert token_server.token is not None
    page = open_page(token_server)
    page.goto("/docs")
    expect(page).to_have_url(f"{token_server.url}/signin?next=%2Fdocs")
    sign_in(page, token_server.token)
    expect(page).to_have_url(f"{token_server.url}/docs")
    expect(page.locator("#swagger-ui .info .title")).to_contain_text("KD Lab")
    expect(page.locator("#swagger-ui .opblock-summary-path").first).to_be_visible()
    console_log(page).assert_clean()


# An invalid launch form (the name breaks the pattern): accepted past CSRF it is a 422 re-render,
# so no run is created either way.
BAD_FORM = {"name:str": "bad name!", "kind:str": "train", "dataset.name:str": "digits"}


def test_form_post_needs_csrf_token(open_page: Callable[..., Page], token_server: Server) -> None:
    """Flow 8: with the session cookie but no CSRF token a form post is refused (403); with the
    page's token in X-CSRF-Token it gets past the check."""
    assert token_server.token is not None
    page = open_page(token_server)
    page.goto("/runs/new")
    expect(page).to_have_url(re.compile(r"/signin\?next=%2Fruns%2Fnew$"))
    sign_in(page, token_server.token)
    expect(page).to_have_url(f"{token_server.url}/runs/new")
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token

    refused = page.request.post(f"{token_server.url}/runs/new", form=BAD_FORM)
    assert refused.status == 403, refused.text()
    assert "CSRF" in refused.text()

    wrong = page.request.post(
        f"{token_server.url}/runs/new", form=BAD_FORM, headers={"X-CSRF-Token": token[::-1]}
    )
    assert wrong.status == 403

    accepted = page.request.post(
        f"{token_server.url}/runs/new", form=BAD_FORM, headers={"X-CSRF-Token": token}
    )
    assert accepted.status != 403, accepted.text()
    assert accepted.status == 422  # the form came back with its errors
    assert token_server.active_run_ids() == []


def test_axe_on_signin_and_empty_runs(open_page: Callable[..., Page], token_server: Server) -> None:
    """Flow 9: the sign-in page, its error state, and the runs page with no runs."""
    assert token_server.token is not None
    page = open_page(token_server, bypass_csp=True)
    page.goto("/signin")
    assert_no_axe_violations(page, "the sign-in page")
    sign_in(page, "not-the-token")
    expect(page.locator("#signin-error")).to_be_visible()
    assert_no_axe_violations(page, "the sign-in page with its error")
    sign_in(page, token_server.token)
    expect(page.get_by_role("heading", name="No runs yet")).to_be_visible()
    assert_no_axe_violations(page, "the runs page without runs")
