"""Bearer tokens: the admin token from settings, and hashed tokens in `api_tokens`."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from kdlab.backend.db.models import ApiToken, Run, utcnow
from kdlab.backend.errors import Forbidden, Unauthorized
from kdlab.backend.schemas.runs import FINISHED
from kdlab.backend.settings import Settings
from kdlab.worker.names import RUN_FINISHED_DETAIL


@dataclass(frozen=True)
class Principal:
    """Who is calling: `admin` may do anything; `run` may only act on `run_id`."""

    scope: str
    run_id: str | None = None

    def require_admin(self) -> None:
        if self.scope != "admin":
            raise Forbidden("this token is scoped to one run; use an admin token for this call")

    def require_run(self, run_id: str) -> None:
        if self.scope != "admin" and self.run_id != run_id:
            raise Forbidden(f"this token belongs to run {self.run_id}, not run {run_id}")


ADMIN = Principal("admin")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session, name: str, scope: str = "admin", run_id: str | None = None
) -> str:
    """A new random token; only its hash is stored, so the caller must keep the returned value."""
    token = "kdl_" + secrets.token_urlsafe(32)
    session.add(ApiToken(token_hash=hash_token(token), name=name, scope=scope, run_id=run_id))
    return token


BEARER_FORMAT = "Authorization header must be 'Bearer <token>'"


def _bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; 401 for any other shape.

    Tokens are printable ASCII (ours are URL-safe base64): a header with any other byte
    (Starlette decodes header bytes as latin-1) or with spaces inside the token is refused
    here, before any comparison."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    token = value.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(BEARER_FORMAT)
    if not token.isascii() or not token.isprintable() or " " in token:
        raise Unauthorized(f"{BEARER_FORMAT}; the token must be printable ASCII without spaces")
    return token


def authenticate(session: Session, settings: Settings, header: str | None) -> Principal:
    token = _bearer(header)
    if token is None:
        if settings.open_access:
            return ADMIN
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    if settings.token is not None and hmac.compare_digest(token.encode(), settings.token.encode()):
        return ADMIN
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if row is None:
        raise Unauthorized("invalid or revoked token")
    if row.revoked_at is not None:
        if row.scope == "run" and _run_finished(session, row.run_id):
            raise Unauthorized(RUN_FINISHED)
        raise Unauthorized("invalid or revoked token")
    return Principal(row.scope, row.run_id)


RUN_FINISHED = (
    RUN_FINISHED_DETAIL  # kdlab.worker.client recognises it; its one home is kdlab.worker.names
)


def _run_finished(session: Session, run_id: str | None) -> bool:
    status = session.scalar(select(Run.status).where(Run.id == run_id))
    return status in FINISHED


def revoke_run_tokens(session: Session, run_id: str) -> None:
    """Revoke the run-scoped tokens of `run_id` (the caller commits): its worker's, or the one
    `kdlab train --server` got. `set_status` calls it when the run finishes, so a finished run
    is read-only for them (a leaked token can no longer overwrite its student)."""
    session.execute(
        update(ApiToken)
        .where(ApiToken.run_id == run_id, ApiToken.scope == "run", ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
