"""Runs: create (validated or external), list, read, cancel, clone, delete, logs (live events:
`kdlab.backend.services.run_events`).

Every function takes the request's session and commits what it changes; none holds a database
transaction open while models are probed (see `kdlab.backend.services.validation`).
"""

from __future__ import annotations

from typing import Any, cast

from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Experiment, Run, RunEvent, utcnow
from kdlab.backend.errors import Conflict, Invalid, NotFound
from kdlab.backend.schemas.runs import (
    FINISHED,
    ExternalRunCreate,
    ExternalRunCreated,
    HeartbeatOut,
    LogAppend,
    RunList,
    RunOut,
    StatusReport,
    ValidationReport,
)
from kdlab.backend.services.artifacts import remove_run_files
from kdlab.backend.services.auth import create_token, revoke_run_tokens
from kdlab.backend.services.catalog import pydantic_errors
from kdlab.backend.services.validation import CheckedConfig, check_config
from kdlab.backend.settings import Settings
from kdlab.worker.dry_run import loss_formula_text
from kdlab.worker.names import RunStatus

LOG_KINDS = ("log", "error")
MAX_LINE_CHARS = 10_000


def run_out(run: Run) -> RunOut:
    """The API view of a run."""
    return RunOut(
        id=run.id,
        name=run.name,
        experiment=run.experiment.name,
        kind=run.kind,  # type: ignore[arg-type]
        status=run.status,
        attempt=run.attempt,
        config=run.config,
        error=run.error,
        cancel_requested=run.cancel_requested,
        created_at=run.created_at,
        updated_at=run.updated_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        teacher_run_id=run.teacher_run_id,
        cloned_from=run.cloned_from,
        mlflow_run_id=run.mlflow_run_id,
        mlflow_experiment_id=run.mlflow_experiment_id,
    )


def get_run(session: Session, run_id: str, for_update: bool = False) -> Run:
    """The run, or 404 naming the id."""
    # FOR UPDATE OF runs: the joined experiment sits on the nullable side of an outer join
    lock = {"of": Run} if for_update else None
    run = session.get(Run, run_id, with_for_update=lock)
    if run is None:
        raise NotFound(f"run {run_id!r} not found")
    return run


def _experiment(session: Session, name: str) -> Experiment:
    """Get or create the experiment `name` (a concurrent creator wins the race harmlessly)."""
    query = select(Experiment).where(Experiment.name == name)
    found = session.scalar(query)
    if found is not None:
        return found
    try:
        with session.begin_nested():
            experiment = Experiment(name=name)
            session.add(experiment)
        return experiment
    except IntegrityError:
        return session.scalars(query).one()


def _event(session: Session, run_id: str, kind: str, message: str) -> None:
    session.add(RunEvent(run_id=run_id, kind=kind, message=message))


# --------------------------------------------------------------------------- create


def validate(session: Session, settings: Settings, data: Any) -> ValidationReport:
    """Dry run of `create_run`: the resolved config, pair shapes and a memory estimate."""
    session.rollback()  # no transaction (SQLite: the write lock) while models are probed
    checked = check_config(session, settings, data)
    session.rollback()
    config = checked.config
    return ValidationReport(
        config=config.model_dump(mode="json"),
        pairs=checked.pairs,
        memory=checked.memory,
        loss_formula=loss_formula_text(config, [p.formula for p in checked.pairs]),
    )


def _insert(session: Session, checked: CheckedConfig, cloned_from: str | None = None) -> Run:
    config = checked.config
    run = Run(
        experiment_id=_experiment(session, config.experiment).id,
        name=config.name,
        kind=config.kind,
        status="queued",
        attempt=0,
        config=config.model_dump(mode="json"),
        teacher_run_id=checked.teacher_run_id,
        cloned_from=cloned_from,
    )
    session.add(run)
    session.flush()
    _event(session, run.id, "status", "queued")
    return run


def create_run(session: Session, settings: Settings, data: Any) -> RunOut:
    """A validated, queued run (or an external one when `data["kind"] == "external"`)."""
    if isinstance(data, dict) and data.get("kind") == "external":
        return create_external(session, data)
    session.rollback()
    checked = check_config(session, settings, data)
    run = _insert(session, checked)
    session.commit()
    return run_out(run)


def create_external(session: Session, data: dict[str, Any]) -> ExternalRunCreated:
    """A run trained elsewhere: status running, never dispatched, a run-scoped token once."""
    try:
        spec = ExternalRunCreate.model_validate(data)
    except ValidationError as err:
        raise Invalid(pydantic_errors(err, ["body"])) from None
    now = utcnow()
    run = Run(
        experiment_id=_experiment(session, spec.experiment).id,
        name=spec.name,
        kind="external",
        status="running",
        attempt=0,
        config=spec.model_dump(mode="json"),
        started_at=now,
    )
    session.add(run)
    session.flush()
    _event(session, run.id, "status", "running")
    token = create_token(session, name=f"run {run.id}", scope="run", run_id=run.id)
    session.commit()
    return ExternalRunCreated(**run_out(run).model_dump(), token=token)


# --------------------------------------------------------------------------- list and read


# The orders a run list may be sorted by (`sort=`, a leading "-" reverses): name → columns.
SORTS: dict[str, tuple[Any, ...]] = {
    "created": (Run.created_at, Run.id),
    "name": (Run.name, Run.id),
    "status": (Run.status, Run.created_at),
    "kind": (Run.kind, Run.created_at),
    "experiment": (Experiment.name, Run.created_at),
}
DEFAULT_SORT = "-created"
MAX_OFFSET = 2**62  # paging offsets: SQLite and PostgreSQL take a signed 64-bit OFFSET


def sort_columns(sort: str) -> list[Any]:
    """ORDER BY columns for `sort` (e.g. `-created`, `name`); 422 naming the choices."""
    name = sort.removeprefix("-")
    if name not in SORTS:
        choices = ", ".join(sorted(SORTS))
        raise Invalid.at(["query", "sort"], f"unknown sort {sort!r}; use one of {choices}")
    columns = SORTS[name]
    return [c.desc() if sort.startswith("-") else c.asc() for c in columns]


def list_runs(
    session: Session,
    *,
    experiment: str | None = None,
    status: list[str] | None = None,
    kind: str | None = None,
    q: str | None = None,
    sort: str = DEFAULT_SORT,
    limit: int = 50,
    offset: int = 0,
) -> RunList:
    """Runs matching every given filter, in `sort` order (newest first by default), and how
    many match in all."""
    order = sort_columns(sort)
    query = select(Run).join(Run.experiment)
    if experiment is not None:
        query = query.where(Experiment.name == experiment)
    if status:
        query = query.where(Run.status.in_(status))
    if kind is not None:
        query = query.where(Run.kind == kind)
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Run.name.ilike(f"%{escaped}%", escape="\\"))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(*order).limit(limit).offset(offset)).unique()
    return RunList(runs=[run_out(r) for r in rows], total=total)


# --------------------------------------------------------------------------- state changes


def cancel_run(session: Session, run_id: str) -> RunOut:
    """Ask a run to stop. A queued (or external) run is cancelled now; a starting or running one
    keeps its status, with `cancel_requested` set, until its worker stops."""
    run = get_run(session, run_id, for_update=True)
    if run.status in FINISHED:
        raise Conflict(f"run {run_id} already {run.status}")
    run.cancel_requested = True
    if run.status == "queued" or run.kind == "external":
        run.status = "cancelled"
        run.finished_at = utcnow()
        _event(session, run.id, "status", "cancelled")
    else:
        _event(session, run.id, "log", "cancel requested; waiting for the worker to stop")
    session.commit()
    return run_out(run)


def clone_run(session: Session, settings: Settings, run_id: str, name: str | None) -> RunOut:
    """A new queued run from `run_id`'s stored config (re-validated), optionally renamed."""
    source = get_run(session, run_id)
    if source.kind == "external":
        raise Conflict(f"run {run_id} is an external run; it has no config to run again")
    data = dict(source.config)
    if name is not None:
        data["name"] = name
    session.rollback()
    checked = check_config(session, settings, data, prefix=("config",))
    run = _insert(session, checked, cloned_from=run_id)
    session.commit()
    return run_out(run)


def delete_run(session: Session, settings: Settings, run_id: str) -> None:
    """Delete a finished run: its rows (metrics, events, artifacts, tokens cascade) and files."""
    run = get_run(session, run_id, for_update=True)
    if run.status not in FINISHED:
        raise Conflict(
            f"run {run_id} is {run.status}; only a finished run can be deleted (cancel it first)"
        )
    session.execute(delete(Run).where(Run.id == run_id))
    session.commit()
    remove_run_files(settings, run_id)


# --------------------------------------------------------------------------- worker state

# Every legal status change, old → allowed new statuses. Worker-owned: → running, running → an
# outcome. Supervisor-owned: queued → starting (claim), starting/running → queued (requeue after
# a lost worker), starting/running → failed/cancelled (out of attempts, killed after the grace
# period). queued → cancelled is `cancel_run`. Finished statuses are final.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"starting", "running", "cancelled"}),
    "starting": frozenset({"queued", "running", "failed", "cancelled"}),
    "running": frozenset({"queued", "succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


def set_status(session: Session, run: Run, new_status: str, error: str | None = None) -> Run:
    """Move `run` to `new_status`: THE one place a run's status changes after it is queued
    (worker reports and the supervisor alike). Stable signature; callers rely on it.

    - Checks `TRANSITIONS` (an external run starts `running`, so it only ever ends):
      an illegal change raises `Conflict` (409) naming both states; nothing is changed.
    - `running`: sets `started_at` on the first start (a resumed attempt keeps it);
      `queued` (requeue): clears `heartbeat_at`; a finished status sets `finished_at`.
    - A finished status revokes the run's run-scoped tokens (same transaction): its worker
      must send everything before it reports the outcome (`kdlab.worker.run`).
    - `error`: stored when given; `succeeded` clears any earlier attempt's error.
    - Adds a `RunEvent(kind="status", message=new_status)` (the SSE stream shows it).
    - Does NOT commit: the caller commits (so it can bundle its own changes, e.g. the attempt
      counter, into the same transaction). Lock the row first where races matter
      (`get_run(session, run_id, for_update=True)`).
    """
    old = run.status
    if new_status not in TRANSITIONS:
        raise Invalid.at(["body", "status"], f"unknown status {new_status!r}")
    if new_status not in TRANSITIONS.get(old, frozenset()):
        raise Conflict(f"run {run.id} cannot go from {old} to {new_status}")
    now = utcnow()
    run.status = cast(RunStatus, new_status)  # one of TRANSITIONS' keys, checked above
    if new_status == "running" and run.started_at is None:
        run.started_at = now
    if new_status == "queued":
        run.heartbeat_at = None
    if new_status in FINISHED:
        run.finished_at = now
        revoke_run_tokens(session, run.id)  # finished runs are read-only for their tokens
    if new_status == "succeeded":
        run.error = None
    if error is not None:
        run.error = error
    _event(session, run.id, "status", new_status)
    session.flush()
    return run


def report_status(session: Session, run_id: str, body: StatusReport) -> RunOut:
    """A worker's `POST /status`. Repeating the run's current status changes nothing and is
    not an error (a retried request whose first try got through); anything else goes through
    `set_status`. The teacher fingerprint is recorded whenever given."""
    run = get_run(session, run_id, for_update=True)
    if run.status != body.status:
        set_status(session, run, body.status, body.error)
    elif body.error is not None and run.error is None:
        run.error = body.error
    if body.teacher_fingerprint is not None:
        run.teacher_fingerprint = body.teacher_fingerprint
    if body.status == "running":
        run.heartbeat_at = utcnow()
    session.commit()
    return run_out(run)


def heartbeat(session: Session, run_id: str) -> HeartbeatOut:
    """Refresh the run's `heartbeat_at` (its worker is alive); 409 once the run is finished
    (the worker should stop). Answers whether a cancel was requested."""
    run = get_run(session, run_id, for_update=True)
    if run.status in FINISHED:
        raise Conflict(f"run {run_id} already {run.status}; stop working on it")
    run.heartbeat_at = utcnow()
    answer = HeartbeatOut(cancel_requested=run.cancel_requested, status=run.status)
    session.commit()
    return answer


# --------------------------------------------------------------------------- logs


def read_log_events(
    session: Session, run_id: str, tail: int, after_id: int | None = None
) -> list[tuple[int, str]]:
    """(event id, line) of the run's log/error lines, oldest first: the last `tail`, or with
    `after_id` the first `tail` after that id."""
    get_run(session, run_id)
    query = select(RunEvent.id, RunEvent.message).where(
        RunEvent.run_id == run_id, RunEvent.kind.in_(LOG_KINDS)
    )
    if after_id is not None:
        rows = session.execute(
            query.where(RunEvent.id > after_id).order_by(RunEvent.id).limit(tail)
        )
        return [(event_id, line) for event_id, line in rows]
    rows = session.execute(query.order_by(RunEvent.id.desc()).limit(tail))
    return [(event_id, line) for event_id, line in rows][::-1]


def read_logs(session: Session, run_id: str, tail: int) -> list[str]:
    """The last `tail` log/error lines of the run, oldest first."""
    return [line for _, line in read_log_events(session, run_id, tail)]


def append_logs(session: Session, run_id: str, body: LogAppend) -> int:
    """Store the lines (each cut to MAX_LINE_CHARS) in order; how many were stored."""
    get_run(session, run_id)
    for line in body.lines:
        _event(session, run_id, body.kind, line[:MAX_LINE_CHARS])
    session.commit()
    return len(body.lines)
