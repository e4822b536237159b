"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from backend.api import artifacts, catalog, compare, health, metrics, runs, uploads
from backend.db.engine import make_engine, make_session_factory
from backend.errors import PayloadTooLarge, ServiceError
from backend.settings import Settings

API_PREFIX = "/api"


def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


def _limit_body(app: FastAPI, max_bytes: int) -> None:
    @app.middleware("http")
    async def body_limit(request: Request, call_next: Callable) -> Response:
        length = request.headers.get("content-length")
        is_upload = (
            request.url.path.startswith(f"{API_PREFIX}/uploads")
            or "/artifacts/" in request.url.path
        )
        if length and length.isdigit() and int(length) > max_bytes and not is_upload:
            error = PayloadTooLarge(f"request body is {length} bytes; the limit is {max_bytes}")
            return _service_error(request, error)
        return await call_next(request)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A configured app; the database must already be at the head revision (`kdlab db upgrade`)."""
    settings = settings or Settings()
    engine = make_engine(settings.resolved_database_url)
    app = FastAPI(
        title="KD Lab",
        summary="Knowledge-distillation experiments: runs, live metrics, comparisons, students.",
        version="0.1.0",
        docs_url="/docs",
        openapi_url=f"{API_PREFIX}/openapi.json",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.add_exception_handler(ServiceError, _service_error)
    _limit_body(app, settings.max_body_bytes)
    resources = (health, catalog, runs, metrics, compare, artifacts, uploads)
    for router in (r.router for r in resources):
        app.include_router(router, prefix=API_PREFIX)
    return app
