"""The runs page (`/`): filters and sort in the URL, paging, live cells over SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response, StreamingResponse

from kdlab.backend.api.deps import RunFiltersDep, SessionDep
from kdlab.backend.db.models import Experiment, Run, utcnow
from kdlab.backend.errors import Invalid
from kdlab.backend.pages.compare import demo_view
from kdlab.backend.pages.security import verify_csrf
from kdlab.backend.pages.streams import POLL_SECONDS, event_stream, linger
from kdlab.backend.pages.templating import render, templates
from kdlab.backend.services import live, run_views
from kdlab.backend.services import runs as service
from kdlab.backend.services.dispatch import DEMO_EXPERIMENT
from kdlab.backend.services.live import Subscription
from kdlab.backend.services.run_events import sse_message
from kdlab.worker.names import RUN_STATUSES

router = APIRouter(dependencies=[Depends(verify_csrf)], include_in_schema=False)

PAGE_SIZE = 50
SORT_CHOICES = [
    ("-created", "Newest first"),
    ("created", "Oldest first"),
    ("name", "Name A–Z"),
    ("-name", "Name Z–A"),
    ("status", "Status"),
    ("experiment", "Experiment"),
    ("kind", "Kind"),
]
STATUSES: tuple[str, ...] = RUN_STATUSES


def _filters_query(filters: dict[str, object], **changes: object) -> str:
    """The query string of the runs page for `filters` with `changes` (blanks and page 1 left
    out, so every link is the shortest URL of its view)."""
    pairs: list[tuple[str, object]] = []
    for key, value in {**filters, **changes}.items():
        values = value if isinstance(value, list) else [value]
        pairs += [(key, v) for v in values if v not in (None, "") and (key, v) != ("page", 1)]
    return urlencode(pairs)


@router.get("/")
def runs_page(
    request: Request,
    session: SessionDep,
    filters: RunFiltersDep,
    page: Annotated[int, Query(ge=1, le=service.MAX_OFFSET // PAGE_SIZE)] = 1,
) -> Response:
    if filters.sort not in dict(SORT_CHOICES):
        raise Invalid.at(["query", "sort"], f"unknown sort {filters.sort!r}")
    chosen = filters.as_kwargs()
    listing = service.list_runs(session, **chosen, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    rows = run_views.summarize(session, listing.runs)
    shown: dict[str, object] = {
        **chosen,
        "status": chosen["status"] or [],
        "sort": filters.sort if filters.sort != service.DEFAULT_SORT else None,
    }
    pages = max(1, -(-listing.total // PAGE_SIZE))
    experiments = list(session.scalars(select(Experiment.name).order_by(Experiment.name)))
    context = {
        "nav": "runs",
        "rows": rows,
        "total": listing.total,
        "page": page,
        "pages": pages,
        "first": (page - 1) * PAGE_SIZE + 1,
        "filters": shown,
        "filtered": any(shown[k] for k in ("experiment", "status", "kind", "q")),
        "prev_query": _filters_query(shown, page=page - 1) if page > 1 else None,
        "next_query": _filters_query(shown, page=page + 1) if page < pages else None,
        "live_ids": ",".join(r.run.id for r in rows if r.active),
        "experiments": experiments,
        "demo_view": demo_view() if DEMO_EXPERIMENT in experiments else None,
        "statuses": STATUSES,
        "sorts": SORT_CHOICES,
        "sort": filters.sort,
    }
    return render(request, "pages/runs.html", context, partial="partials/_runs_table.html")


def _live_rows(
    factory: sessionmaker[Session], ids: list[str], watched: tuple[str, ...]
) -> tuple[list[run_views.RunSummary], dict[str, Any]]:
    """One short session: the signals of `watched` (first: see `kdlab.backend.services.live`) and
    the table rows of `ids`."""
    with factory() as session:
        signals = Subscription.read(session, watched)
        runs = session.scalars(select(Run).where(Run.id.in_(ids))).unique().all()
        rows = run_views.summarize(session, [service.run_out(r) for r in runs])
        session.rollback()
    return rows, signals


def _render_cells(
    rows: list[run_views.RunSummary], status_only: bool
) -> tuple[dict[str, str], bool]:
    """The live cells of each run, rendered (run id → HTML) with durations up to now, and
    whether any is still active. Reads no database."""
    now = utcnow()
    macros = templates.env.get_template("macros/run_cells.html").make_module({})
    render_cells = macros.status_badge if status_only else macros.live_cells  # type: ignore[attr-defined]
    cells = {}
    for row in rows:
        row = replace(row, duration_seconds=run_views.duration_seconds(row.run, now))
        cells[row.run.id] = str(render_cells(row.run if status_only else row, oob=True))
    return cells, any(row.active for row in rows)


def _ticking(rows: list[run_views.RunSummary]) -> bool:
    """Whether a shown duration counts up (a started run that has not finished)."""
    return any(row.run.started_at is not None and row.run.finished_at is None for row in rows)


async def _live_stream(request: Request, ids: list[str], status_only: bool) -> AsyncIterator[str]:
    """`event: update` with out-of-band cells whenever a run's cells change; ends when every
    run has finished or the browser has gone. The app's live watcher wakes it when one of the
    runs changed (then it re-reads them); while a run runs, its duration re-renders each
    `POLL_SECONDS` without a read."""
    factory = request.app.state.read_session_factory
    sent: dict[str, str] = {}
    with live.watcher_of(request.app).subscribe(ids) as subscription:
        stale = True
        rows: list[run_views.RunSummary] = []
        while True:
            if stale:
                rows, signals = await run_in_threadpool(
                    _live_rows, factory, ids, subscription.run_ids
                )
                subscription.saw(signals)
            cells, active = await run_in_threadpool(_render_cells, rows, status_only)
            changed = [html for run_id, html in cells.items() if sent.get(run_id) != html]
            sent.update(cells)
            if changed:
                yield sse_message("update", "".join(changed))
            if not active:
                yield sse_message("end", "done")
                await linger(request)
                return
            tick = None if status_only or not _ticking(rows) else POLL_SECONDS
            stale = await subscription.wait(tick)


@router.get("/live/runs")
def live_runs(request: Request, ids: str = "", only: str | None = None) -> StreamingResponse:
    """SSE for the runs table: the status, progress, duration and accuracy cells of `ids`
    (`only=status`: just the status badges, for the compare page)."""
    run_ids = [i for i in dict.fromkeys(ids.split(",")) if i][:PAGE_SIZE]
    return event_stream(request, _live_stream(request, run_ids, only == "status"))
