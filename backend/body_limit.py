"""Request bodies bounded as they are read, whatever the framing (Content-Length or chunked).

`BodyLimit` is a pure ASGI middleware around the app. It counts the bytes of every request's
`http.request` messages as the app reads them (`request.body()`, `.json()`, `.form()` or
`.stream()` alike): past the route's limit (`limit_for`, the one home of each limit) it stops
reading and answers 413 naming the limit and the setting that raises it, whatever the app would
have answered once its read failed; a Content-Length over the limit is refused before anything
is read. The 413 closes the connection, so the rest of the body is not read either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kdlab.backend.errors import PayloadTooLarge
from kdlab.backend.pages.errors import is_page_request, page_error
from kdlab.backend.services.uploads import MULTIPART_OVERHEAD
from kdlab.backend.settings import Settings

UPLOAD_PATHS = frozenset({"/api/uploads", "/runs/new/upload"})  # multipart: file + framing
ARTIFACT_PUT = re.compile(r"^/api/runs/[^/]+/artifacts/[^/]+$")  # raw bytes of one file


@dataclass(frozen=True)
class Limit:
    """The most bytes a request body may have, and the setting (env variable) that raises it."""

    max_bytes: int
    setting: str
    note: str = ""

    @property
    def message(self) -> str:
        return f"request body is over {self.max_bytes} bytes ({self.setting}{self.note})"


def limit_for(settings: Settings, path: str) -> Limit:
    """The body limit of the route at `path`: uploads and artifacts have the upload limit (plus
    the multipart framing for uploads), everything else (JSON, forms) KDLAB_MAX_BODY_BYTES."""
    if path in UPLOAD_PATHS:
        return Limit(
            settings.max_upload_bytes + MULTIPART_OVERHEAD,
            "KDLAB_MAX_UPLOAD_BYTES",
            f"={settings.max_upload_bytes} plus {MULTIPART_OVERHEAD} bytes of multipart framing",
        )
    if ARTIFACT_PUT.match(path):
        return Limit(settings.max_upload_bytes, "KDLAB_MAX_UPLOAD_BYTES")
    return Limit(settings.max_body_bytes, "KDLAB_MAX_BODY_BYTES")


class BodyTooLarge(PayloadTooLarge):
    """Raised by the wrapped `receive` once the body passed its limit."""


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _refusal(scope: Scope, limit: Limit) -> Response:
    request = Request(scope)
    response: Response
    if is_page_request(request):
        response = page_error(request, 413, limit.message)
    else:
        response = JSONResponse({"detail": limit.message}, status_code=413)
    response.headers["Connection"] = "close"  # the rest of the body is never read
    return response


class BodyLimit:
    """See the module docstring; the limits come from `scope["app"].state.settings`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = limit_for(scope["app"].state.settings, scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit.max_bytes:
            await _refusal(scope, limit)(scope, receive, send)
            return

        received = 0
        over = False
        started = False  # the app's response began before the body went over

        async def counted_receive() -> Message:
            nonlocal received, over
            if over:
                raise BodyTooLarge(limit.message)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    over = True
                    raise BodyTooLarge(limit.message)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to its failed read (400, 422, 500...): the 413 wins
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await _refusal(scope, limit)(scope, receive, send)
