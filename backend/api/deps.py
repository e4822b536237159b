"""Dependencies, declared once as named types."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from kdlab.backend.db.engine import session_scope
from kdlab.backend.errors import Forbidden
from kdlab.backend.schemas.runs import RunStatus
from kdlab.backend.services import sessions
from kdlab.backend.services.auth import ADMIN, Principal, authenticate
from kdlab.backend.services.runs import DEFAULT_SORT
from kdlab.backend.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_read_session(request: Request) -> Iterator[Session]:
    """A session that only reads: on SQLite it never takes (or waits for) the write lock."""
    yield from session_scope(request.app.state.read_session_factory)


ReadSessionDep = Annotated[Session, Depends(get_read_session)]


def get_session(request: Request, read: ReadSessionDep) -> Iterator[Session]:
    """The request's session: the read session for GET/HEAD/OPTIONS, else one that writes
    (its first statement takes SQLite's write lock, held until it commits or closes)."""
    if request.method in SAFE_METHODS:
        yield read
        return
    yield from session_scope(request.app.state.session_factory)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(request: Request, session: ReadSessionDep, settings: SettingsDep) -> Principal:
    """The bearer token's principal; without one, a signed-in browser is the admin (the pages'
    charts and download buttons), and a state change from it needs its CSRF token."""
    header = request.headers.get("authorization")
    browser = getattr(request.state, "browser", None)
    if header is None and browser is not None and browser.token_hash != sessions.OPEN:
        if request.method not in SAFE_METHODS and not sessions.csrf_matches(
            browser, request.headers.get(sessions.CSRF_HEADER)
        ):
            raise Forbidden("a browser session needs its X-CSRF-Token header for this call")
        return ADMIN
    try:
        return authenticate(session, settings, header)
    finally:
        session.rollback()  # end the read snapshot: a POST's body and work come after


def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    principal.require_admin()
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]


@dataclass
class RunFilters:
    """The filters and order of a run list, from the query (`GET /api/runs` and the runs page);
    blank values mean no filter."""

    experiment: str | None = None
    status: Annotated[list[RunStatus] | None, Query()] = None
    kind: str | None = None
    q: Annotated[str | None, Query(description="Part of the run name (any case).")] = None
    sort: Annotated[
        str,
        Query(description="created, name, status, kind or experiment; a leading - reverses."),
    ] = DEFAULT_SORT

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment or None,
            "status": list(self.status) if self.status else None,
            "kind": self.kind or None,
            "q": (self.q or "").strip() or None,
            "sort": self.sort,
        }


RunFiltersDep = Annotated[RunFilters, Depends()]
