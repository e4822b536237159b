"""Sign-in and sign-out: a token typed once becomes an HttpOnly SameSite=Strict session."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from starlette.responses import RedirectResponse, Response

from kdlab.backend.api.deps import SessionDep, SettingsDep
from kdlab.backend.errors import Forbidden, Unauthorized
from kdlab.backend.pages.security import set_session_cookie, verify_csrf
from kdlab.backend.pages.templating import render
from kdlab.backend.services import sessions

router = APIRouter(include_in_schema=False)


def _safe_next(target: str | None) -> str:
    """Only a path on this site (no scheme, no host, no `//`), else the runs page."""
    if not target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def _same_origin(request: Request) -> bool:
    """The sign-in form came from this site (it has no session, hence no CSRF token yet)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        referer = request.headers.get("referer")
        if referer is None:
            return False
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(referer))
    return origin == f"{request.url.scheme}://{request.url.netloc}"


@router.get("/signin")
def signin_page(request: Request, settings: SettingsDep, next: str | None = None) -> Response:
    if settings.open_access:
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "pages/signin.html", {"next": _safe_next(next), "error": None})


@router.post("/signin")
def signin(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    if not _same_origin(request):
        raise Forbidden("Sign in from this site's own sign-in page.")
    try:
        cookie, _ = sessions.sign_in(session, settings, token)
    except Unauthorized as err:
        context = {"next": _safe_next(next), "error": err.message}
        return render(request, "pages/signin.html", context, status_code=401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(response, request, cookie)
    return response


@router.post("/signout")
async def signout(request: Request) -> Response:
    await verify_csrf(request)
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(sessions.COOKIE_NAME, path="/")
    return response
