"""How work gets into the MLflow outbox without the other services knowing about MLflow.

The mirror (`kdlab.backend.mlflow.drain`) drains the `mlflow_outbox` table; this module fills it, always
inside the transaction that made the change, so an outbox row exists if and only if the change
committed:

- **ORM flush hooks** (`install_outbox_hooks(factory)`, on the app's own sessionmaker: only the
  sessions it makes are watched, never every `Session` in the process): an `after_flush`
  listener sees every flushed object while its attribute history is still there and primary
  keys are already assigned, and writes outbox rows with a Core INSERT on the session's own
  connection (same transaction, no ORM state touched mid-flush):

  - a `Run` inserted → `run_created` (experiment and run name, the flattened config as params,
    tags: kind, KD conventions from the config, teacher run id, status);
  - a `Run` whose `status`, `teacher_fingerprint` or `error` changed → `run_updated` (a snapshot
    of those three plus `finished_at`: applying snapshots again or out of order never corrupts);
  - an `Artifact` of kind `student` added or replaced → `student` (artifact id, path, sha256).

  A `do_orm_execute` listener covers ORM-enabled bulk `UPDATE` statements on `runs`
  (`session.execute(update(Run)...)`): it reads the watched columns of the matched rows before and
  after the statement and enqueues `run_updated` for each row that changed. Raw SQL text
  (`session.execute(text("UPDATE runs ..."))`) bypasses both hooks; don't change run state that
  way. A deleted run's pending rows go with it (`ON DELETE CASCADE`); its MLflow run is kept.
  Sessions of another sessionmaker (a CLI command's, a test's own) queue nothing.
- **`enqueue_metrics`**, called explicitly by the metrics service with each ingested batch (the
  ingest path writes points with raw SQL, which no ORM hook sees): one outbox row per batch,
  holding each key's step range (the mirror reads the values from the `metrics` table).

The payloads are built by `kdlab.backend.mlflow.format`.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Table, event, insert, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction, sessionmaker

from kdlab.backend.db.models import Artifact, Experiment, MlflowOutbox, Run, utcnow
from kdlab.backend.mlflow.format import run_created_payload, run_updated_payload, student_payload

OUTBOX = cast(Table, MlflowOutbox.__table__)
RUNS = cast(Table, Run.__table__)

RUN_CREATED = "run_created"
RUN_UPDATED = "run_updated"
METRICS = "metrics"
STUDENT = "student"
KINDS = (RUN_CREATED, RUN_UPDATED, METRICS, STUDENT)

WATCHED = ("status", "teacher_fingerprint", "error")  # Run columns that make a run_updated
STUDENT_KIND = "student"  # Artifact.kind of the exported student
SKIP_OPTION = "kdlab_outbox_skip"  # execution option: the mirror's own writes enqueue nothing


# --------------------------------------------------------------------------- explicit enqueue


def _insert_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        now = utcnow()
        for row in rows:
            row.setdefault("attempts", 0)
            row.setdefault("created_at", now)
        session.connection().execute(insert(OUTBOX), rows)


def enqueue(session: Session, run_id: str, kind: str, payload: dict[str, Any]) -> None:
    """One outbox row in the session's current transaction (committed with the caller's work)."""
    _insert_rows(session, [{"run_id": run_id, "kind": kind, "payload": payload}])


def _keys_and_steps(points: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """(key, step) of tuples/lists, dicts or objects (`MetricPointIn`); one kind per batch."""
    it = iter(points)
    first = next(it, None)
    if first is None:
        return
    rest = itertools.chain((first,), it)
    if isinstance(first, (tuple, list)):
        for p in rest:
            yield p[0], p[1]
    elif isinstance(first, Mapping):
        for p in rest:
            yield p["key"], p["step"]
    else:
        for p in rest:
            yield p.key, p.step


def metric_ranges(points: Iterable[Any]) -> dict[str, list[int]]:
    """Per key, the [lowest, highest] step of a batch."""
    ranges: dict[str, list[int]] = {}
    for key, step in _keys_and_steps(points):
        bounds = ranges.get(key)
        if bounds is None:
            ranges[key] = [step, step]
        elif step < bounds[0]:
            bounds[0] = step
        elif step > bounds[1]:
            bounds[1] = step
    return ranges


def enqueue_metrics(
    session: Session,
    run_id: str,
    points: Sequence[Any],
    *,
    ranges: Mapping[str, list[int]] | None = None,
) -> None:
    """Queue one ingested batch for MLflow, in the caller's transaction (call it next to the
    upsert, before the commit). `points`: `MetricPointIn`s, `(key, step, ...)` tuples (the
    ingest's rows) or dicts with `key` and `step`. An empty batch queues nothing, and so does
    every batch of a session whose sessionmaker has no hooks (`install_outbox_hooks(factory)`;
    one switch for the mirror: with it off, nothing piles up in the outbox).

    The row holds each key's step range, `{"ranges": {key: [lo, hi]}, "points": n}`, not the
    values: the mirror reads the points from the `metrics` table when it sends them (the values
    stored then, last write wins) and skips what MLflow already has, so reading a range that
    also holds other batches' points sends nothing twice. This keeps the ingest's cost at one
    pass over the keys and steps and a small row, whatever the batch size."""
    if not hooks_installed(session):
        return
    if ranges is None:  # the caller may know them already (`metric_ranges(points)`)
        ranges = metric_ranges(points)
    if ranges:
        enqueue(session, run_id, METRICS, {"ranges": ranges, "points": len(points)})


# --------------------------------------------------------------------------- ORM hooks


def _changed(obj: Any, names: Iterable[str]) -> list[str]:
    """The attributes among `names` that this flush changes. Setting an equal value is no
    change; an expired (unloaded) old value counts as one (a snapshot again is harmless)."""
    attrs = sa_inspect(obj).attrs
    return [name for name in names if attrs[name].history.has_changes()]


def _experiment_name(session: Session, experiment_id: int) -> str:
    name = session.connection().scalar(
        select(Experiment.__table__.c.name).where(Experiment.__table__.c.id == experiment_id)
    )
    return str(name) if name is not None else "default"


def _after_flush(session: Session, _context: UOWTransaction) -> None:
    rows: list[dict[str, Any]] = []
    for obj in list(session.new):
        if isinstance(obj, Run):
            payload = run_created_payload(obj, _experiment_name(session, obj.experiment_id))
            rows.append({"run_id": obj.id, "kind": RUN_CREATED, "payload": payload})
        elif isinstance(obj, Artifact) and obj.kind == STUDENT_KIND:
            rows.append({"run_id": obj.run_id, "kind": STUDENT, "payload": student_payload(obj)})
    for obj in list(session.dirty):
        if isinstance(obj, Run):
            changed = _changed(obj, WATCHED)
            if changed:
                payload = run_updated_payload(
                    obj.id,
                    obj.status,
                    obj.teacher_fingerprint,
                    obj.error,
                    obj.finished_at,
                    changed,
                )
                rows.append({"run_id": obj.id, "kind": RUN_UPDATED, "payload": payload})
        elif (
            isinstance(obj, Artifact)
            and obj.kind == STUDENT_KIND
            and _changed(obj, ("kind", "sha256", "path"))
        ):
            rows.append({"run_id": obj.run_id, "kind": STUDENT, "payload": student_payload(obj)})
    _insert_rows(session, rows)


_SNAPSHOT_COLUMNS = (
    RUNS.c.id,
    RUNS.c.status,
    RUNS.c.teacher_fingerprint,
    RUNS.c.error,
    RUNS.c.finished_at,
)


def _is_runs_update(state: ORMExecuteState) -> bool:
    if not state.is_update or state.execution_options.get(SKIP_OPTION):
        return False
    table = getattr(state.statement, "table", None)  # our `runs`, not MLflow's (same name)
    return (
        getattr(table, "metadata", None) is RUNS.metadata
        and getattr(table, "name", None) == RUNS.name
    )


def _on_orm_execute(state: ORMExecuteState) -> Any:
    """Bulk `UPDATE runs`: snapshot the watched columns before and after, enqueue the changes."""
    if not _is_runs_update(state):
        return None
    statement = state.statement
    params = state.parameters
    session = state.session
    if isinstance(params, list):  # bulk UPDATE by primary key: [{"id": ..., ...}, ...]
        ids = [p["id"] for p in params if isinstance(p, Mapping) and "id" in p]
        where = RUNS.c.id.in_(ids)
    else:
        clause = getattr(statement, "whereclause", None)
        where = clause if clause is not None else RUNS.c.id.is_not(None)
    connection = session.connection()
    before = {row.id: row for row in connection.execute(select(*_SNAPSHOT_COLUMNS).where(where))}
    result = state.invoke_statement()
    if not before:
        return result
    after = connection.execute(select(*_SNAPSHOT_COLUMNS).where(RUNS.c.id.in_(list(before)))).all()
    rows = []
    for row in after:
        old = before[row.id]
        changed = [name for name in WATCHED if getattr(old, name) != getattr(row, name)]
        if changed:
            payload = run_updated_payload(
                row.id, row.status, row.teacher_fingerprint, row.error, row.finished_at, changed
            )
            rows.append({"run_id": row.id, "kind": RUN_UPDATED, "payload": payload})
    _insert_rows(session, rows)
    return result


# The `Session` subclasses of the hooked sessionmakers: SQLAlchemy gives each sessionmaker its
# own subclass and a listener on the sessionmaker is on that subclass, so only the sessions that
# factory makes are watched. (`event.contains` answers only for the object that was listened on,
# so a session's own class is looked up here.)
_hooked: weakref.WeakSet[type] = weakref.WeakSet()


def install_outbox_hooks(factory: sessionmaker[Session]) -> None:
    """Watch the sessions `factory` makes and let `enqueue_metrics` queue for them
    (idempotent). Call once at start-up, before the first run is written
    (`MlflowMirror.start()` does, on the factory it drains with)."""
    if not event.contains(factory, "after_flush", _after_flush):
        event.listen(factory, "after_flush", _after_flush)
    if not event.contains(factory, "do_orm_execute", _on_orm_execute):
        event.listen(factory, "do_orm_execute", _on_orm_execute)
    _hooked.add(factory.class_)


def uninstall_outbox_hooks(factory: sessionmaker[Session]) -> None:
    """Stop enqueueing for `factory`'s sessions (tests; a process that turns the mirror off)."""
    _hooked.discard(factory.class_)
    if event.contains(factory, "after_flush", _after_flush):
        event.remove(factory, "after_flush", _after_flush)
    if event.contains(factory, "do_orm_execute", _on_orm_execute):
        event.remove(factory, "do_orm_execute", _on_orm_execute)


def hooks_installed(where: sessionmaker[Session] | Session) -> bool:
    """Whether a sessionmaker (or the sessionmaker of a session) has the outbox hooks."""
    return (type(where) if isinstance(where, Session) else where.class_) in _hooked


__all__ = [
    "KINDS",
    "METRICS",
    "RUN_CREATED",
    "RUN_UPDATED",
    "SKIP_OPTION",
    "STUDENT",
    "STUDENT_KIND",
    "enqueue",
    "enqueue_metrics",
    "hooks_installed",
    "install_outbox_hooks",
    "metric_ranges",
    "uninstall_outbox_hooks",
]
