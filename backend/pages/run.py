"""The run page (`/runs/{id}`): status, charts of every loss component, eval against teacher
and baseline, the formula in effect, live log tail, artifacts, cancel / clone / delete."""

from __future__ import annotations

import html
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response, StreamingResponse

from kdlab.backend.api.deps import SessionDep, SettingsDep
from kdlab.backend.errors import NotFound
from kdlab.backend.pages.security import verify_csrf
from kdlab.backend.pages.streams import POLL_SECONDS, event_stream, linger
from kdlab.backend.pages.templating import is_fragment_request, render, shared_context, templates
from kdlab.backend.schemas.runs import FINISHED, RunOut
from kdlab.backend.services import artifacts as artifact_service
from kdlab.backend.services import metrics as metric_service
from kdlab.backend.services import run_views
from kdlab.backend.services import runs as service
from kdlab.backend.services.auth import ADMIN
from kdlab.backend.services.live import SUCCEEDED, Subscription, watcher_of
from kdlab.backend.services.run_events import sse_message
from kdlab.backend.services.run_metadata import metadata
from kdlab.worker.kd.distillation_model import pair_key

router = APIRouter(dependencies=[Depends(verify_csrf)], include_in_schema=False)

LOG_TAIL = 200
HEAD_CONTEXT = ("run", "row", "meta", "teacher", "baseline", "artifacts")  # run_head's arguments


@dataclass
class Panel:
    """One chart: a title, the runs it overlays and the metric keys it draws."""

    title: str
    keys: list[str]
    runs: list[RunOut] = field(default_factory=list)

    @property
    def run_ids(self) -> list[str]:
        return [run.id for run in self.runs]

    @property
    def run_names(self) -> dict[str, str]:
        return {run.id: run.name for run in self.runs}

    @property
    def slug(self) -> str:
        return "chart-" + "".join(c if c.isalnum() else "-" for c in self.title.lower())


# (title, keys or key prefix) in page order; a key lands in the first panel that claims it
PANEL_LAYOUT: list[tuple[str, tuple[str, ...]]] = [
    ("Training loss", ("train/loss_total", "train/loss_student")),
    ("KD terms, raw", ("train/kd/",)),
    ("KD terms, weighted by the balancer", ("train/kd_weighted/",)),
    (
        "Accuracy",
        ("eval/student_acc", "eval/teacher_acc", "eval/agreement", "eval/exported_student_acc"),
    ),
    ("Eval loss and KL(teacher‖student)", ("eval/student_loss", "eval/kl")),
    ("Learning rate", ("train/lr",)),
    ("Gradient norm", ("train/grad_norm",)),
    ("Step time (ms)", ("sys/step_time_ms",)),
    ("Teacher share of step time", ("sys/teacher_time_share",)),
    ("GPU memory (GiB)", ("sys/gpu_mem_gib",)),
]


def expected_keys(run: RunOut) -> list[str]:
    """The keys a run of this kind will log, for charts drawn before its first point."""
    keys = ["train/loss_total", "train/loss_student", "eval/student_acc", "train/lr"]
    if run.kind == "distill":
        pairs = run.config.get("distill", {}).get("pairs", [])
        names = [pair_key((p["student_layer"], p["teacher_layer"])) for p in pairs]
        keys += [f"train/kd/{n}" for n in names] + [f"train/kd_weighted/{n}" for n in names]
        keys += ["eval/teacher_acc", "eval/agreement", "eval/kl"]
    return keys


def chart_panels(run: RunOut, keys: list[str], baseline: RunOut | None) -> list[Panel]:
    """The run's keys (or the expected ones) laid out in panels; the baseline joins Accuracy."""
    remaining = list(dict.fromkeys(keys or expected_keys(run)))
    panels = []
    for title, claims in PANEL_LAYOUT:
        mine = [
            k
            for k in remaining
            if any(k == c or (c.endswith("/") and k.startswith(c)) for c in claims)
        ]
        if not mine:
            continue
        remaining = [k for k in remaining if k not in mine]
        runs = [run, baseline] if baseline is not None and title == "Accuracy" else [run]
        panels.append(Panel(title, sorted(mine, key=_claim_order(claims)), runs))
    if remaining:
        panels.append(Panel("Other metrics", remaining, [run]))
    return panels


def _claim_order(claims: tuple[str, ...]) -> Callable[[str], tuple[int, str]]:
    return lambda key: (claims.index(key) if key in claims else len(claims), key)


def _head_context(session: Session, run_id: str) -> dict[str, Any]:
    """What the run head shows (`HEAD_CONTEXT`, the macro's arguments) and whether it finished:
    all the live stream re-reads each second."""
    run = service.run_out(service.get_run(session, run_id))
    return {
        "run": run,
        "row": run_views.summarize(session, [run])[0],
        "meta": metadata(session, run_id),
        "teacher": (
            service.run_out(service.get_run(session, run.teacher_run_id))
            if run.teacher_run_id
            else None
        ),
        "baseline": run_views.baseline_of(session, run),
        "artifacts": artifact_service.list_artifacts(session, ADMIN, run_id),
        "finished": run.status in FINISHED,
    }


def _context(session: Session, run_id: str) -> dict[str, Any]:
    """The whole run page: the head, the chart panels, the log tail and the config."""
    head = _head_context(session, run_id)
    run: RunOut = head["run"]
    logs = service.read_log_events(session, run_id, LOG_TAIL)
    return {
        **head,
        "nav": "runs",
        "panels": chart_panels(run, metric_service.run_keys(session, run_id), head["baseline"]),
        "logs": [line for _, line in logs if not line.startswith(run_views.METADATA_PREFIX)],
        "last_log_id": logs[-1][0] if logs else 0,
        "config_json": json.dumps(run.config, indent=2, sort_keys=False),
    }


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: str, session: SessionDep) -> Response:
    return render(request, "pages/run.html", _context(session, run_id))


@router.post("/runs/{run_id}/cancel")
def cancel(request: Request, run_id: str, session: SessionDep) -> Response:
    service.cancel_run(session, run_id)
    return _head_or_page(request, session, run_id)


@router.post("/runs/{run_id}/delete")
def delete(request: Request, run_id: str, session: SessionDep, settings: SettingsDep) -> Response:
    service.delete_run(session, settings, run_id)
    if is_fragment_request(request):
        return Response(status_code=204, headers={"HX-Redirect": "/"})
    return Response(status_code=303, headers={"Location": "/"})


def _head_or_page(request: Request, session: Session, run_id: str) -> Response:
    if is_fragment_request(request):
        return render(request, "partials/_run_head.html", _head_context(session, run_id))
    return Response(status_code=303, headers={"Location": f"/runs/{run_id}"})


# --------------------------------------------------------------------------- live updates


def _read_live(
    factory: sessionmaker[Session], run_id: str, after_id: int, watched: tuple[str, ...]
) -> tuple[dict[str, Any], list[tuple[int, str]], dict[str, Any]]:
    """One short session: the signals of `watched` (first: see `kdlab.backend.services.live`), the
    head's context (its rows kept loaded for renders after the session) and the log lines after
    `after_id`."""
    with factory() as session:
        signals = Subscription.read(session, watched)
        context = _head_context(session, run_id)
        lines = service.read_log_events(session, run_id, 1000, after_id=after_id)
        session.expunge_all()  # detached, not expired by the rollback: the artifacts stay loaded
        session.rollback()
    return context, lines, signals


def _render_head(context: dict[str, Any], shared: dict[str, Any]) -> str:
    """The head HTML for an out-of-band swap, its duration counted up to now (no database)."""
    macros = templates.env.get_template("macros/run_head.html").make_module(shared)
    args = {name: context[name] for name in HEAD_CONTEXT}
    row = args["row"]
    args["row"] = replace(row, duration_seconds=run_views.duration_seconds(row.run))
    return str(macros.run_head(**args, oob=True))  # type: ignore[attr-defined]


def _live_state(
    factory: sessionmaker[Session], run_id: str, after_id: int, shared: dict[str, Any]
) -> tuple[str, list[tuple[int, str]], bool]:
    """(head HTML for an out-of-band swap, new log lines, finished)."""
    context, lines, _ = _read_live(factory, run_id, after_id, ())
    return _render_head(context, shared), lines, bool(context["finished"])


def _watched(run: RunOut) -> list[str]:
    """What the head shows besides the run itself: a distill run's baseline is the newest
    matching succeeded run, so any run succeeding may change it."""
    return [run.id, SUCCEEDED] if run.kind == "distill" else [run.id]


async def _live_stream(request: Request, run_id: str, after_id: int) -> AsyncIterator[str]:
    """`update` (the head) when it changes, `log` with new lines, `end` once the run finished.
    The app's live watcher wakes it when the run changed (then it re-reads); while the run
    runs, its duration re-renders each `POLL_SECONDS` without a read."""
    factory = request.app.state.read_session_factory
    shared = shared_context(request)  # what the macro reads besides its arguments
    last_head = None
    with watcher_of(request.app).subscribe([run_id]) as subscription:
        stale = True
        context: dict[str, Any] = {}
        while True:
            lines: list[tuple[int, str]] = []
            if stale:
                try:
                    context, lines, signals = await run_in_threadpool(
                        _read_live, factory, run_id, after_id, subscription.run_ids
                    )
                except NotFound:  # deleted while shown
                    yield sse_message("end", "done")
                    await linger(request)
                    return
                subscription.saw(signals)
                subscription.watch(_watched(context["run"]))
            head = await run_in_threadpool(_render_head, context, shared)
            if head != last_head:
                last_head = head
                yield sse_message("update", head)
            shown = [line for _, line in lines if not line.startswith(run_views.METADATA_PREFIX)]
            if shown:
                yield sse_message("log", "".join(html.escape(line) + "\n" for line in shown))
            if lines:
                after_id = lines[-1][0]
            if len(lines) >= 1000:  # more lines are waiting
                continue
            if context["finished"]:
                yield sse_message("end", "done")
                await linger(request)
                return
            run: RunOut = context["run"]
            ticking = run.started_at is not None and run.finished_at is None
            stale = await subscription.wait(POLL_SECONDS if ticking else None)


@router.get("/runs/{run_id}/live")
def live(request: Request, run_id: str, session: SessionDep, after: int = 0) -> StreamingResponse:
    """SSE for the run page: `update` (the head, out of band), `log` lines after `after`."""
    service.get_run(session, run_id)
    session.close()
    return event_stream(request, _live_stream(request, run_id, after))
