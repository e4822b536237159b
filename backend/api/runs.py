"""/api/runs routes: thin HTTP wrappers around `kdlab.backend.services.runs`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from kdlab.backend.api.deps import (
    AdminDep,
    PrincipalDep,
    RunFiltersDep,
    SessionDep,
    SettingsDep,
    get_principal,
)
from kdlab.backend.json_depth import DepthCheckedRoute
from kdlab.backend.schemas.runs import (
    CloneRequest,
    ExternalRunCreated,
    HeartbeatOut,
    LogAccepted,
    LogAppend,
    LogLines,
    RunList,
    RunOut,
    StatusReport,
    ValidationReport,
)
from kdlab.backend.services import live
from kdlab.backend.services import run_events as events
from kdlab.backend.services import runs as service

# a JSON body nested too deep is a 422 before FastAPI parses it (see kdlab.backend.json_depth)
router = APIRouter(prefix="/runs", tags=["runs"], route_class=DepthCheckedRoute)

RunBody = Annotated[
    dict[str, Any],
    Body(
        description="A RunConfig (its JSON Schema is `run_config_schema` in GET /api/catalog), "
        'or `{"kind": "external", "name": ..., "experiment": ..., "params": {...}}` to '
        "register a run trained elsewhere.",
        examples=[
            {
                "name": "digits-teacher",
                "experiment": "digits-kd",
                "kind": "train",
                "dataset": {"name": "digits"},
                "student": {"name": "mlp", "params": {"hidden": [64]}},
                "train": {"epochs": 2},
            }
        ],
    ),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=RunOut | ExternalRunCreated,
    responses={422: {"description": "The config is invalid; `detail` lists each error."}},
)
def create_run(
    body: RunBody, session: SessionDep, settings: SettingsDep, _: AdminDep
) -> RunOut | ExternalRunCreated:
    """Validate the config and queue the run (an external run gets its token, once)."""
    return service.create_run(session, settings, body)


@router.post("/validate", responses={422: {"description": "The errors POST /runs would give."}})
def validate_run(
    body: RunBody, session: SessionDep, settings: SettingsDep, _: AdminDep
) -> ValidationReport:
    """Every check of POST /runs without creating anything: the resolved config, each pair's
    shapes and adapter, and a memory estimate per GPU."""
    return service.validate(session, settings, body)


@router.get("")
def list_runs(
    session: SessionDep,
    _: AdminDep,
    filters: RunFiltersDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=service.MAX_OFFSET)] = 0,
) -> RunList:
    """Runs, newest first unless `sort` says otherwise; `status` may repeat."""
    return service.list_runs(session, **filters.as_kwargs(), limit=limit, offset=offset)


@router.get("/{run_id}")
def get_run(run_id: str, session: SessionDep, principal: PrincipalDep) -> RunOut:
    principal.require_run(run_id)
    return service.run_out(service.get_run(session, run_id))


@router.post("/{run_id}/cancel", responses={409: {"description": "The run already finished."}})
def cancel_run(run_id: str, session: SessionDep, _: AdminDep) -> RunOut:
    """Cancel a queued run now; ask a starting/running one to stop (`cancel_requested`)."""
    return service.cancel_run(session, run_id)


@router.post(
    "/{run_id}/clone",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "External runs cannot be cloned."}},
)
def clone_run(
    run_id: str,
    session: SessionDep,
    settings: SettingsDep,
    _: AdminDep,
    body: CloneRequest | None = None,
) -> RunOut:
    """Queue a new run with the same config (validated again), optionally renamed."""
    return service.clone_run(session, settings, run_id, body.name if body else None)


@router.delete(
    "/{run_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={409: {"description": "The run has not finished."}},
)
def delete_run(run_id: str, session: SessionDep, settings: SettingsDep, _: AdminDep) -> Response:
    """Delete a finished run with its metrics, events, artifacts and artifact files."""
    service.delete_run(session, settings, run_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{run_id}/logs")
def read_logs(
    run_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    tail: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> LogLines:
    """The last `tail` log lines, oldest first."""
    principal.require_run(run_id)
    return LogLines(lines=service.read_logs(session, run_id, tail))


@router.post("/{run_id}/logs")
def append_logs(
    run_id: str, body: LogAppend, session: SessionDep, principal: PrincipalDep
) -> LogAccepted:
    """Append log lines (the run's worker, with its run-scoped token)."""
    principal.require_run(run_id)
    return LogAccepted(accepted=service.append_logs(session, run_id, body))


@router.post(
    "/{run_id}/status",
    responses={409: {"description": "Not a legal change from the run's current status."}},
)
def report_status(
    run_id: str, body: StatusReport, session: SessionDep, principal: PrincipalDep
) -> RunOut:
    """The run's worker reports a state change (its run-scoped token, or admin):
    queued/starting → running; running → succeeded, failed (with `error`) or cancelled;
    starting → failed or cancelled. Repeating the current status is a no-op (a retried
    request); any other change → 409 naming both states."""
    principal.require_run(run_id)
    return service.report_status(session, run_id, body)


@router.post(
    "/{run_id}/heartbeat",
    responses={409: {"description": "The run already finished: the worker should stop."}},
)
def heartbeat(
    run_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    _body: Annotated[dict[str, Any] | None, Body()] = None,
) -> HeartbeatOut:
    """The worker is alive (refreshes `heartbeat_at`); answers whether to stop
    (`cancel_requested`) and the run's status. The body is ignored (`{}`)."""
    principal.require_run(run_id)
    return service.heartbeat(session, run_id)


def _may_follow(request: Request, run_id: str) -> None:
    """The caller may read the run and it exists: one short session, in the threadpool (the
    stream then reads with its own; no transaction waits across a hop to another thread)."""
    with request.app.state.read_session_factory() as session:
        principal = get_principal(request, session, request.app.state.settings)
        principal.require_run(run_id)
        service.get_run(session, run_id)
        session.rollback()


@router.get(
    "/{run_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        429: {"description": "Too many open streams for this token; see `Retry-After`."},
    },
)
async def run_events(
    run_id: str,
    request: Request,
    once: bool = False,
    last_event_id: Annotated[int | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events: `status` (run JSON) on each change, `log` lines, `end` when the run
    finishes. `?once=1` sends the current state and closes. At most
    `KDLAB_MAX_STREAMS_PER_TOKEN` streams per token at once (429 beyond). The stream holds no
    thread: it runs on the event loop, woken by the app's live watcher."""
    await run_in_threadpool(_may_follow, request, run_id)
    stream = events.event_stream(
        request.app.state.read_session_factory,
        run_id,
        live.watcher_of(request.app),
        once=once,
        after_id=last_event_id,
    )
    return live.LiveResponse(request, stream)
