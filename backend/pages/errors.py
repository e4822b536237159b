"""Errors on pages: in words, as HTML (a fragment into #flash for htmx, else a whole page)."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from kdlab.backend.pages.templating import is_fragment_request, render

TITLES = {
    400: "That request was not understood",
    401: "Sign in first",
    403: "Not allowed",
    404: "Not found",
    409: "Not possible right now",
    413: "Too large",
    422: "Something in the request is not valid",
}


def is_page_request(request: Request) -> bool:
    path = request.url.path
    return not path.startswith(("/api/", "/static/", "/docs"))


def page_error(request: Request, status_code: int, message: str) -> Response:
    """The error page, or for htmx the message swapped into #flash (the page stays)."""
    context = {"title": TITLES.get(status_code, "Something went wrong"), "message": message}
    if is_fragment_request(request):
        headers = {"HX-Retarget": "#flash", "HX-Reswap": "innerHTML"}
        return render(
            request,
            "partials/_flash.html",
            {**context, "level": "error"},
            status_code=status_code,
            headers=headers,
        )
    return render(request, "pages/error.html", context, status_code=status_code)
