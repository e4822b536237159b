"""Browser sessions: a signed, HttpOnly SameSite=Strict cookie, and the CSRF token bound to it.

The cookie holds `{"sid", "exp", "th"}` signed with HMAC-SHA256: `sid` a random session id,
`exp` its expiry (Unix seconds), `th` the sha256 of the admin token it signed in with ("open"
for the open-access default). A session is valid while its signature, expiry and token hold:
revoking the token (or changing `KDLAB_TOKEN`) ends every session opened with it. The CSRF token
is HMAC(secret, "csrf|" + sid), checked with `hmac.compare_digest` on each state change.

The signing secret is `KDLAB_SESSION_SECRET` when set (give every replica the same one), else a
random key kept in `<data_dir>/session.key` (0600), made on first use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from kdlab.backend.db.models import ApiToken
from kdlab.backend.errors import Unauthorized
from kdlab.backend.services.auth import authenticate, hash_token
from kdlab.backend.settings import Settings

COOKIE_NAME = "kdlab_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SESSION_SECONDS = 7 * 24 * 3600
OPEN = "open"  # the `th` of a session on an open-access server (no token configured)


SessionSource = Session | Callable[[], Session]  # a session, or a factory opened on demand


@dataclass(frozen=True)
class BrowserSession:
    sid: str
    expires: int
    token_hash: str
    csrf: str


def _secret(settings: Settings) -> bytes:
    if settings.session_secret:
        return settings.session_secret.encode()
    path: Path = settings.data_path / "session.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        try:  # O_EXCL: two processes starting at once agree on the first key written
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as handle:
            handle.write(key)
        return key


def _sign(secret: bytes, message: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(secret, message, hashlib.sha256).digest()).decode()


def csrf_token(settings: Settings, sid: str) -> str:
    return _sign(_secret(settings), f"csrf|{sid}".encode()).rstrip("=")


def _token_valid(session: SessionSource, settings: Settings, token_hash: str) -> bool:
    """The token still signs in: the open default, KDLAB_TOKEN, or an unrevoked admin token
    (the only case that reads the database)."""
    if token_hash == OPEN:
        return settings.open_access
    if settings.token is not None and hmac.compare_digest(token_hash, hash_token(settings.token)):
        return True
    if callable(session):  # a session factory: open one only now
        with session() as opened:
            return _admin_token_exists(opened, token_hash)
    return _admin_token_exists(session, token_hash)


def _admin_token_exists(session: Session, token_hash: str) -> bool:
    row = session.scalar(
        select(ApiToken.id).where(
            ApiToken.token_hash == token_hash,
            ApiToken.scope == "admin",
            ApiToken.revoked_at.is_(None),
        )
    )
    session.rollback()
    return row is not None


def encode(
    settings: Settings, token_hash: str, now: float | None = None
) -> tuple[str, BrowserSession]:
    """A new session for `token_hash`: (cookie value, the session)."""
    sid = secrets.token_urlsafe(24)
    expires = int((now or time.time()) + SESSION_SECONDS)
    payload = json.dumps({"sid": sid, "exp": expires, "th": token_hash}, separators=(",", ":"))
    body = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
    value = f"{body}.{_sign(_secret(settings), body.encode()).rstrip('=')}"
    return value, BrowserSession(sid, expires, token_hash, csrf_token(settings, sid))


def decode(session: SessionSource, settings: Settings, cookie: str | None) -> BrowserSession | None:
    """The session a cookie carries, or None when it is missing, forged, expired or its token
    no longer signs in."""
    if not cookie or "." not in cookie:
        return None
    body, _, signature = cookie.partition(".")
    expected = _sign(_secret(settings), body.encode()).rstrip("=")
    if not hmac.compare_digest(signature, expected):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        sid, expires, token_hash = str(data["sid"]), int(data["exp"]), str(data["th"])
    except (ValueError, KeyError, TypeError):
        return None
    if expires < time.time() or not _token_valid(session, settings, token_hash):
        return None
    return BrowserSession(sid, expires, token_hash, csrf_token(settings, sid))


def sign_in(session: Session, settings: Settings, token: str) -> tuple[str, BrowserSession]:
    """Check an admin token typed into the sign-in page; Unauthorized in words otherwise."""
    token = token.strip()
    if not token:
        raise Unauthorized(
            "Enter the server's token (KDLAB_TOKEN or one from `kdlab token create`)."
        )
    try:
        principal = authenticate(session, settings, f"Bearer {token}")
    except Unauthorized:
        raise Unauthorized("That token is not valid (or it was revoked).") from None
    if principal.scope != "admin":
        raise Unauthorized("That token is scoped to one run; sign in with an admin token.")
    return encode(settings, hash_token(token))


def csrf_matches(browser: BrowserSession | None, given: str | None) -> bool:
    return browser is not None and given is not None and hmac.compare_digest(given, browser.csrf)
