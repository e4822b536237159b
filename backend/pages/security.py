"""What every response of the app carries (CSP and friends: `SecurityHeaders`), and the pages'
session gate.

The gate resolves the browser session of each request (`request.state.browser`): on an
open-access server (loopback, no token) every browser gets a session on its first visit; with
a token, pages need one from the sign-in page, and a request without it is sent there
(htmx: `HX-Redirect`). CSRF is checked where state changes: `verify_csrf` on the page routers
and `kdlab.backend.api.deps.get_principal` for cookie-authenticated API calls.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kdlab.backend.errors import Forbidden
from kdlab.backend.origin_guard import UNSAFE_METHODS, RequestGuard
from kdlab.backend.services import sessions
from kdlab.backend.settings import Settings

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
PUBLIC_PATHS = ("/static/", "/signin", "/api/", "/favicon.ico")
SIGNIN_PATH = "/signin"

# some systems map .js to text/plain, which browsers refuse for modules
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("text/css", ".css")

Handler = Callable[[Request], Awaitable[Response]]


SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
)


class SecurityHeaders:
    """Pure ASGI middleware: every response (pages, API JSON, static files, errors, redirects,
    streams) gets `SECURITY_HEADERS`, except those a route set itself (the /docs page's CSP)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                add_security_headers(message.setdefault("headers", []))
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_security_headers(headers: list[tuple[bytes, bytes]]) -> None:
    """Append the `SECURITY_HEADERS` missing from raw ASGI `headers` (names in lower case)."""
    present = {name.lower() for name, _ in headers}
    headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)


def set_session_cookie(response: Response, request: Request, value: str) -> None:
    response.set_cookie(
        sessions.COOKIE_NAME,
        value,
        max_age=sessions.SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def _resolve(
    request: Request, settings: Settings
) -> tuple[sessions.BrowserSession | None, str | None]:
    """The request's session, and a new cookie value when one was just opened. The database
    is read only for a session signed in with a token from `kdlab token create`."""
    factory = request.app.state.read_session_factory
    browser = sessions.decode(factory, settings, request.cookies.get(sessions.COOKIE_NAME))
    if browser is None and settings.open_access:
        cookie, browser = sessions.encode(settings, sessions.OPEN)
        return browser, cookie
    return browser, None


def _needs_session(request: Request) -> bool:
    """API calls with a bearer token (workers, scripts) never look at cookies."""
    path = request.url.path
    if path.startswith("/static/"):
        return False
    if path.startswith("/api/"):
        return "authorization" not in request.headers and sessions.COOKIE_NAME in request.cookies
    return True


def _to_signin(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    location = f"{SIGNIN_PATH}?next={quote(target, safe='')}"
    if request.headers.get("hx-request") == "true":
        return PlainTextResponse(
            "sign in first", status_code=401, headers={"HX-Redirect": location}
        )
    if request.method in ("GET", "HEAD"):
        return RedirectResponse(location, status_code=303)
    return PlainTextResponse("Sign in first: your session is missing or expired.", 401)


def install(app: FastAPI) -> None:
    """The session gate, inside `RequestGuard` (a refused request opens no session), inside
    `SecurityHeaders` (outermost, so its headers reach every response, refusals included)."""

    @app.middleware("http")
    async def pages_gate(request: Request, call_next: Handler) -> Response:
        path = request.url.path
        new_cookie = None
        request.state.browser = None
        if _needs_session(request):
            request.state.browser, new_cookie = await run_in_threadpool(
                _resolve, request, request.app.state.settings
            )
        if request.state.browser is None and not path.startswith(PUBLIC_PATHS):
            response = _to_signin(request)
        else:
            response = await call_next(request)
        if new_cookie is not None and not path.startswith("/api/"):
            set_session_cookie(response, request, new_cookie)
        return response

    app.add_middleware(RequestGuard)
    app.add_middleware(SecurityHeaders)


async def verify_csrf(request: Request) -> None:
    """Router dependency of the pages: a state change needs the session's CSRF token, in the
    `X-CSRF-Token` header (htmx) or the `csrf_token` field (plain forms)."""
    if request.method not in UNSAFE_METHODS:
        return
    given = request.headers.get(sessions.CSRF_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get(sessions.CSRF_FIELD)
        given = value if isinstance(value, str) else None
    if not sessions.csrf_matches(request.state.browser, given):
        raise Forbidden(
            "This form is missing its security token (CSRF) or it is out of date; "
            "reload the page and try again."
        )
