"""What a web page the user visits must not make their browser do to this server.

- **Host allow-list** (DNS rebinding): a page on `evil.example` whose name is made to resolve to
  127.0.0.1 reaches a loopback server with `Host: evil.example`. In open mode (loopback, no
  token) and whenever `KDLAB_ALLOWED_HOSTS` is set, a `Host` that is not allowed gets 400
  (`Settings.host_allow_list`: loopback names, the bind host, public_url's host, the list).
- **Origin / Sec-Fetch-Site** (cross-site forms and fetches): every state-changing request
  (POST, PUT, PATCH, DELETE), pages and API alike, is refused with 403 when its `Origin` is not
  this server's own origin, or when the browser says `Sec-Fetch-Site: cross-site` / `same-site`
  (another port of 127.0.0.1 is the same *site*). Requests without these headers (workers,
  scripts, curl) go on to the normal authentication.

`RequestGuard` is a pure ASGI middleware around the app; the decisions are pure functions.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kdlab.backend.settings import Settings, host_name, is_loopback

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CROSS_SITE_FETCHES = frozenset({"cross-site", "same-site"})  # allowed: same-origin, none
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def host_refusal(host: str | None, allowed: frozenset[str] | None) -> str | None:
    """Why a request with this `Host:` header is refused, or None when it may go on. `allowed`
    None: no check. A request with no `Host:` at all (HTTP/1.0) comes from no browser."""
    if allowed is None or host is None:
        return None
    name = host_name(host)
    if name in allowed or is_loopback(name):
        return None
    return f"host {name[:100]} is not allowed; add it to KDLAB_ALLOWED_HOSTS"


def _origin_key(scheme: str, netloc: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return None
    return (scheme.lower(), (parts.hostname or "").rstrip("."), port or DEFAULT_PORTS.get(scheme))


def own_origin(scheme: str, host: str | None) -> str:
    return f"{scheme}://{host or ''}"


def is_own_origin(origin: str, scheme: str, host: str | None) -> bool:
    """`origin` (an `Origin:` header) is scheme://host[:port] of this request's `Host:`."""
    if host is None:
        return False
    theirs = urlsplit(origin.strip())
    if not theirs.scheme or theirs.path or theirs.query:
        return False  # "null" (sandboxed frames, file://) or something that is no origin
    ours = _origin_key(scheme, host)
    return ours is not None and _origin_key(theirs.scheme, theirs.netloc) == ours


def cross_site_refusal(
    method: str, scheme: str, host: str | None, origin: str | None, fetch_site: str | None
) -> str | None:
    """Why a browser request from another site is refused, or None when it may go on."""
    if method.upper() not in UNSAFE_METHODS:
        return None
    site = (fetch_site or "").strip().lower()
    if site in CROSS_SITE_FETCHES:
        where = f"origin {origin[:200]}" if origin else "another site"
        return (
            f"cross-site request refused: {where} (Sec-Fetch-Site: {site}) may not change "
            "anything on this server"
        )
    if origin is not None and not is_own_origin(origin, scheme, host):
        return (
            f"cross-site request refused: origin {origin[:200]} is not this server's "
            f"({own_origin(scheme, host)[:200]})"
        )
    return None


def refusal(scope: Scope, settings: Settings) -> tuple[int, str] | None:
    """The status and message a request is refused with, or None."""
    headers = Headers(scope=scope)
    host = headers.get("host")
    # no exemption by client address: behind uvicorn's proxy headers a page could choose it
    why = host_refusal(host, settings.host_allow_list())
    if why is not None:
        return 400, why
    why = cross_site_refusal(
        scope.get("method", "GET"),
        scope.get("scheme", "http"),
        host,
        headers.get("origin"),
        headers.get("sec-fetch-site"),
    )
    return (403, why) if why is not None else None


class RequestGuard:
    """Refuses, before anything else runs, what `refusal` says (JSON `detail` under /api/)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = refusal(scope, scope["app"].state.settings)
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, message = refused
        response: Response
        if scope.get("path", "").startswith("/api/"):
            response = JSONResponse({"detail": message}, status_code=status)
        else:
            response = PlainTextResponse(message, status_code=status)
        await response(scope, receive, send)
