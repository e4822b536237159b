"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from kdlab.backend.api import artifacts, catalog, compare, health, metrics, runs, uploads
from kdlab.backend.body_limit import BodyLimit
from kdlab.backend.db.engine import is_busy, make_engine, make_read_engine, make_session_factory
from kdlab.backend.errors import Invalid, ServiceError, Unavailable
from kdlab.backend.mlflow.process import start_mirror
from kdlab.backend.pages import compare as compare_page
from kdlab.backend.pages import docs as docs_page
from kdlab.backend.pages import launch as launch_page
from kdlab.backend.pages import run as run_page
from kdlab.backend.pages import runs as runs_page
from kdlab.backend.pages import security, signin
from kdlab.backend.pages.errors import is_page_request, page_error
from kdlab.backend.pages.templating import STATIC_DIR
from kdlab.backend.settings import Settings
from kdlab.backend.short_errors import shorten

API_PREFIX = "/api"
logger = logging.getLogger(__name__)


def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    if is_page_request(request):
        return page_error(request, exc.status_code, exc.message)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _database_error(request: Request, exc: Exception) -> Response:
    """A lock wait that ran out under write contention is a 503 the caller retries (nothing
    was stored: the transaction rolled back); any other database error is a 500."""
    if is_busy(exc):
        logger.warning("database busy on %s %s: answered 503", request.method, request.url.path)
        return _service_error(request, Unavailable("the database is busy; retry in a second"))
    return _internal_error(request, exc)


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = shorten(exc.errors())  # never echo a huge input back
    if is_page_request(request):
        return page_error(request, 422, Invalid(errors).message)
    return await request_validation_exception_handler(request, RequestValidationError(errors))


def _internal_error(request: Request, exc: Exception) -> Response:
    """An unexpected error: Starlette answers it outside every middleware, so the security
    headers are added here."""
    response: Response = JSONResponse({"detail": "internal server error"}, status_code=500)
    if is_page_request(request):
        response = PlainTextResponse("Internal server error; see the server's log.", 500)
    security.add_security_headers(response.raw_headers)
    return response


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the app serves: the MLflow mirror drains the outbox in its own process (unless the
    tracking URI is `none`; `kdlab.backend.mlflow.process`), and with KDLAB_EXECUTOR=local or ray the supervisor runs (`kdlab.backend.supervisor`;
    made first, so a Ray executor without KDLAB_RAY_ADDRESS stops the start-up at once);
    stopping it leaves running workers alone. The live watcher (`kdlab.backend.services.live`) wakes
    the event streams of the runs that changed."""
    from kdlab.backend.services.live import watcher_of

    live = watcher_of(app).start()
    supervisor = None
    if app.state.settings.executor in ("local", "ray"):
        from kdlab.backend.supervisor import Supervisor

        supervisor = Supervisor(app.state.settings, app.state.session_factory, demo=app.state.demo)
    # its own process at a lower priority (KDLAB_MLFLOW_MIRROR=process, the default)
    mirror = start_mirror(
        app.state.settings, app.state.session_factory, app.state.read_session_factory
    )
    app.state.mirror = mirror
    if supervisor is not None:
        supervisor.start()
    app.state.supervisor = supervisor
    try:
        yield
    finally:
        if supervisor is not None:
            supervisor.stop()
        mirror.stop()
        await live.stop()
        if app.state.read_engine is not app.state.engine:
            app.state.read_engine.dispose()


def create_app(settings: Settings | None = None, *, demo: bool = False) -> FastAPI:
    """A configured app; the database must already be at the head revision (`kdlab db upgrade`).
    `demo`: the supervisor queues the demo's KD student once the demo teacher succeeded."""
    settings = settings or Settings()
    engine = make_engine(settings.resolved_database_url, settings.db_lock_timeout_seconds)
    app = FastAPI(
        lifespan=_lifespan,
        title="KD Lab",
        summary="Knowledge-distillation experiments: runs, live metrics, comparisons, students.",
        version="0.1.0",
        # /docs and /api/openapi.json: kdlab.backend.pages.docs (vendored Swagger UI, behind the token)
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.demo = demo
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    # readers (GET requests, authentication, event streams) never queue behind SQLite's writer
    app.state.read_engine = make_read_engine(engine, settings.db_lock_timeout_seconds)
    app.state.read_session_factory = make_session_factory(app.state.read_engine)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _request_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(SQLAlchemyTimeoutError, _database_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit)  # inside the security middleware: its 413 gets their headers
    security.install(app)
    resources = (health, catalog, runs, metrics, compare, artifacts, uploads)
    for router in (r.router for r in resources):
        app.include_router(router, prefix=API_PREFIX)
    for page in (runs_page, launch_page, run_page, compare_page, signin, docs_page):
        app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route("/favicon.ico", _favicon, include_in_schema=False)
    return app


def _favicon() -> Response:
    return RedirectResponse("/static/img/favicon.svg", status_code=308)
