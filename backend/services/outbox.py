"""How work gets into the MLflow outbox without the other services knowing about MLflow.

The mirror (`backend.mlflow_mirror`) drains the `mlflow_outbox` table; this module fills it, always
inside the transaction that made the change, so an outbox row exists if and only if the change
committed:

- **ORM flush hooks** (`install_outbox_hooks`, process-wide on `sqlalchemy.orm.Session`):
  an `after_flush` listener sees every flushed object while its attribute history is still there
  and primary keys are already assigned, and writes outbox rows with a Core INSERT on the
  session's own connection (same transaction, no ORM state touched mid-flush):

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
- **`enqueue_metrics`**, called explicitly by the metrics service with each ingested batch (the
  ingest path writes points with raw SQL, which no ORM hook sees): one outbox row per batch,
  holding each key's step range (the mirror reads the values from the `metrics` table).

Payload builders are pure functions of the row's values (`run_created_payload` etc.), shared with
the mirror, which rebuilds a `run_created` payload when it has to re-create an MLflow run.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, event, insert, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction

from backend.db.models import Artifact, Experiment, MlflowOutbox, Run, utcnow

log = logging.getLogger(__name__)

OUTBOX = cast(Table, MlflowOutbox.__table__)
RUNS = cast(Table, Run.__table__)

RUN_CREATED = "run_created"
RUN_UPDATED = "run_updated"
METRICS = "metrics"
STUDENT = "student"
KINDS = (RUN_CREATED, RUN_UPDATED, METRICS, STUDENT)

WATCHED = ("status", "teacher_fingerprint", "error")  # Run columns that make a run_updated
STUDENT_KIND = "student"  # Artifact.kind of the exported student

PARAM_VALUE_MAX = 500  # MLflow < 2.x limit; current servers take 6000, 500 fits every server
KEY_MAX = 250  # MLflow's limit on param, tag and metric keys
TAG_VALUE_MAX = 5000  # MLflow takes 8000 (5000 on older servers)
TRUNCATED = "...[truncated]"
SKIP_OPTION = "kdlab_outbox_skip"  # execution option: the mirror's own writes enqueue nothing
_state = {"installed": False}  # set by install_outbox_hooks

# Losses whose scale depends on a temperature, and the T² convention each follows
# (worker.kd.losses): LogitsKL and MFTLoss multiply by T² unless scale_by_t2=False,
# DKDLoss always does, GeneralizedJSD never does.
_T2_SWITCHABLE = {"logits_kl", "mft"}
_T2_ALWAYS = {"dkd"}
_T2_NEVER = {"generalized_jsd"}


# --------------------------------------------------------------------------- small helpers


def _epoch_ms(value: datetime | None) -> int | None:
    if value is None:
        return None
    return int(value.timestamp() * 1000)


def truncate(text: str, limit: int, keep: str = "head") -> str:
    """`text` cut to `limit` characters with a visible marker; `keep="tail"` keeps the end
    (a traceback's last lines are the useful ones)."""
    if len(text) <= limit:
        return text
    if keep == "tail":
        return TRUNCATED + text[len(text) - (limit - len(TRUNCATED)) :]
    return text[: limit - len(TRUNCATED)] + TRUNCATED


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def mlflow_key(key: str) -> str:
    """A name MLflow accepts for a KD Lab param, tag or metric key.

    MLflow allows letters, digits, `_ - . / space` (and `:` off Windows) and refuses names that a
    path normalisation would change. KD Lab's pair metrics use `~` (`train/kd/fc~fc`); it becomes
    `-to-` (`train/kd/fc-to-fc`). Any other refused character becomes `_`, empty or `.`/`..` path
    parts are dropped, and keys over 250 characters are cut (with a short hash, so they stay
    distinct).
    """
    mapped = _BAD_KEY_CHARS.sub("_", key.replace("~", "-to-"))
    parts = [p if p != ".." else "_.." for p in mapped.split("/") if p not in ("", ".")]
    result = "/".join(parts) or "_"
    if len(result) > KEY_MAX:
        import hashlib

        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        result = result[: KEY_MAX - 9] + "_" + digest
    return result


def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: nested keys dot-joined (`train.optimizer.lr`), list items of
    dicts indexed (`distill.pairs.0.loss.name`), lists of scalars and empty containers as JSON
    (`student.params.hidden = [64]`), strings as is, other scalars as JSON (`true`, `null`,
    `0.001`); values over 500 characters cut with a `...[truncated]` marker."""
    out: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        elif (
            isinstance(value, list) and value and any(isinstance(v, (Mapping, list)) for v in value)
        ):
            for index, item in enumerate(value):
                walk(item, f"{path}.{index}" if path else str(index))
        elif path:
            text = _scalar_text(value)
            out[mlflow_key(path)] = truncate(text, PARAM_VALUE_MAX)

    walk(config, prefix)
    return out


def _loss_defaults(name: str) -> dict[str, Any]:
    """The loss class's keyword defaults (the effective values when a param is left out)."""
    try:
        from worker.kd.losses import loss_parameters

        params = loss_parameters(name)
    except Exception:  # an unknown loss name (external runs) has no defaults
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _loss_class(name: str) -> str:
    try:
        from worker.kd.losses import LOSSES

        return LOSSES[name].__name__
    except Exception:
        return name


def _number(value: Any) -> str:
    return _scalar_text(value)


def _t2_convention(name: str, params: Mapping[str, Any]) -> str | None:
    cls = _loss_class(name)
    temperature = params.get("temperature")
    t_text = f"T={_number(temperature)}" if temperature is not None else ""
    if name in _T2_SWITCHABLE:
        if params.get("scale_by_t2", True) is False:
            return f"{cls} does not multiply by T² (scale_by_t2=false, {t_text})"
        factor = f", factor {_number(float(temperature) ** 2)}" if temperature is not None else ""
        return f"{cls} multiplies by T² ({t_text}{factor})"
    if name in _T2_ALWAYS:
        return f"{cls} multiplies by T² ({t_text})"
    if name in _T2_NEVER:
        return f"{cls} has no T² factor ({t_text})"
    return None


def kd_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """Tags for the KD conventions a config uses (empty for train and external runs).

    `kd.student`, `kd.teacher`, `kd.teacher.weights`; `kd.losses` (loss names in pair order),
    `kd.pairs` (`student~teacher` layers, `output` for the model output), `kd.temperatures`
    (effective temperature per temperature-based pair), `kd.t2_convention` (e.g. "LogitsKL
    multiplies by T² (T=4.0, factor 16.0)"), `kd.pair.<i>.loss` / `kd.pair.<i>.params`;
    `kd.balancer` and `kd.balancer.<param>` (e.g. `kd.balancer.kd_weight = 0.7`);
    `kd.teacher_input_adapter`.
    """
    tags: dict[str, str] = {}
    student = config.get("student")
    if isinstance(student, Mapping) and student.get("name"):
        tags["kd.student"] = str(student["name"])
    teacher = config.get("teacher")
    if isinstance(teacher, Mapping):
        if teacher.get("name"):
            tags["kd.teacher"] = str(teacher["name"])
        weights = teacher.get("weights")
        if isinstance(weights, Mapping):
            if weights.get("run_id"):
                tags["kd.teacher.weights"] = (
                    f"run {weights['run_id']} ({weights.get('checkpoint', 'best')})"
                )
            elif weights.get("upload_id"):
                tags["kd.teacher.weights"] = f"upload {weights['upload_id']}"
    distill = config.get("distill")
    if not isinstance(distill, Mapping):
        return tags
    pairs = [p for p in distill.get("pairs") or [] if isinstance(p, Mapping)]
    names: list[str] = []
    layers: list[str] = []
    temperatures: list[str] = []
    conventions: list[str] = []
    for index, pair in enumerate(pairs):
        loss = pair.get("loss") if isinstance(pair.get("loss"), Mapping) else {}
        assert isinstance(loss, Mapping)
        name = str(loss.get("name", "logits_kl"))
        given = loss.get("params") if isinstance(loss.get("params"), Mapping) else {}
        assert isinstance(given, Mapping)
        params = {**_loss_defaults(name), **given}
        names.append(name)
        layers.append(
            f"{pair.get('student_layer') or 'output'}~{pair.get('teacher_layer') or 'output'}"
        )
        if "temperature" in params:
            temperatures.append(_number(params["temperature"]))
        convention = _t2_convention(name, params)
        if convention:
            conventions.append(convention if len(pairs) == 1 else f"pair {index}: {convention}")
        tags[f"kd.pair.{index}.loss"] = name
        tags[f"kd.pair.{index}.layers"] = layers[-1]
        tags[f"kd.pair.{index}.params"] = _scalar_text(params)
    tags["kd.losses"] = ",".join(names)
    tags["kd.pairs"] = ",".join(layers)
    if temperatures:
        tags["kd.temperatures"] = ",".join(temperatures)
    if conventions:
        tags["kd.t2_convention"] = "; ".join(conventions)
    balancer = distill.get("balancer")
    if isinstance(balancer, Mapping):
        tags["kd.balancer"] = str(balancer.get("name", "static"))
        for key, value in (balancer.get("params") or {}).items():
            tags[mlflow_key(f"kd.balancer.{key}")] = _scalar_text(value)
    adapter = distill.get("teacher_input_adapter")
    tags["kd.teacher_input_adapter"] = (
        str(adapter.get("name")) if isinstance(adapter, Mapping) else "none"
    )
    return {key: truncate(value, TAG_VALUE_MAX) for key, value in tags.items()}


# --------------------------------------------------------------------------- payloads


def run_created_payload(run: Run, experiment_name: str) -> dict[str, Any]:
    """What the mirror needs to create the MLflow run: names, params, tags, start time."""
    config = run.config or {}
    tags = {
        "kdlab.run_id": run.id,
        "kdlab.kind": run.kind,
        "kdlab.experiment": experiment_name,
        "kdlab.status": run.status,
    }
    if run.teacher_run_id:
        tags["kdlab.teacher_run_id"] = run.teacher_run_id
    if run.cloned_from:
        tags["kdlab.cloned_from"] = run.cloned_from
    try:
        tags.update(kd_tags(config))
        params = flatten_params(config)
    except Exception as err:  # never let a payload break the transaction that made the run
        log.exception("outbox: could not describe run %s for MLflow", run.id)
        params = {}
        tags["kdlab.mirror_note"] = truncate(f"params/tags not derived: {err!r}", TAG_VALUE_MAX)
    return {
        "experiment": experiment_name,
        "name": run.name,
        "kind": run.kind,
        "status": run.status,
        "start_time_ms": _epoch_ms(run.created_at) or int(time.time() * 1000),
        "params": params,
        "tags": tags,
    }


def run_updated_payload(
    run_id: str,
    status: str,
    teacher_fingerprint: str | None,
    error: str | None,
    finished_at: datetime | None,
    changed: Iterable[str],
) -> dict[str, Any]:
    """A snapshot of the watched columns (and which of them changed)."""
    return {
        "status": status,
        "teacher_fingerprint": teacher_fingerprint,
        "error": error,
        "finished_at_ms": _epoch_ms(finished_at),
        "changed": sorted(changed),
    }


def student_payload(artifact: Artifact) -> dict[str, Any]:
    return {
        "artifact_id": artifact.id,
        "name": artifact.name,
        "path": artifact.path,
        "sha256": artifact.sha256,
        "size": artifact.size,
    }


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


def enqueue_metrics(session: Session, run_id: str, points: Sequence[Any]) -> None:
    """Queue one ingested batch for MLflow, in the caller's transaction (call it next to the
    upsert, before the commit). `points`: `MetricPointIn`s, `(key, step, ...)` tuples (the
    ingest's rows) or dicts with `key` and `step`. An empty batch queues nothing, and so does
    every batch until `install_outbox_hooks()` ran in this process (one switch for the mirror:
    with it off, nothing piles up in the outbox).

    The row holds each key's step range, `{"ranges": {key: [lo, hi]}, "points": n}`, not the
    values: the mirror reads the points from the `metrics` table when it sends them (the values
    stored then, last write wins) and skips what MLflow already has, so reading a range that
    also holds other batches' points sends nothing twice. This keeps the ingest's cost at one
    pass over the keys and steps and a small row, whatever the batch size."""
    if not _state["installed"]:
        return
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


def install_outbox_hooks() -> None:
    """Listen on every `Session` in this process and let `enqueue_metrics` queue (idempotent).
    Call once at start-up, before the first run is written (`MlflowMirror.start()` does)."""
    if not event.contains(Session, "after_flush", _after_flush):
        event.listen(Session, "after_flush", _after_flush)
    if not event.contains(Session, "do_orm_execute", _on_orm_execute):
        event.listen(Session, "do_orm_execute", _on_orm_execute)
    _state["installed"] = True


def uninstall_outbox_hooks() -> None:
    """Stop enqueueing (tests; a process that turns the mirror off)."""
    _state["installed"] = False
    if event.contains(Session, "after_flush", _after_flush):
        event.remove(Session, "after_flush", _after_flush)
    if event.contains(Session, "do_orm_execute", _on_orm_execute):
        event.remove(Session, "do_orm_execute", _on_orm_execute)


def hooks_installed() -> bool:
    return _state["installed"]


__all__ = [
    "KINDS",
    "METRICS",
    "RUN_CREATED",
    "RUN_UPDATED",
    "STUDENT",
    "enqueue",
    "enqueue_metrics",
    "flatten_params",
    "hooks_installed",
    "install_outbox_hooks",
    "kd_tags",
    "metric_ranges",
    "mlflow_key",
    "run_created_payload",
    "run_updated_payload",
    "student_payload",
    "truncate",
    "uninstall_outbox_hooks",
]
