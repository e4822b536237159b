"""The API docs: `/docs` (Swagger UI from the vendored files in frontend/static/vendor/swagger-ui/,
nothing from a CDN) and the schema `/api/openapi.json` it reads. With a token set both need it:
`/docs` is behind the pages' session gate (sign-in), the schema needs a bearer token or a
signed-in browser (`get_principal`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from kdlab.backend.api.deps import PrincipalDep
from kdlab.backend.pages.security import CSP
from kdlab.backend.pages.templating import render

router = APIRouter(include_in_schema=False)

# Swagger UI (React) sets inline `style` attributes: on this page alone styles may be inline.
# Scripts stay 'self' only: the bundle and js/pages/docs.js, no inline script, no eval.
DOCS_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")


@router.get("/docs")
def docs(request: Request) -> Response:
    return render(request, "pages/docs.html", {}, headers={"Content-Security-Policy": DOCS_CSP})


@router.get("/api/openapi.json")
def openapi(request: Request, principal: PrincipalDep) -> Response:
    return JSONResponse(request.app.openapi())
