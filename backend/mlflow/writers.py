"""One writer per outbox kind: what a row of that kind does in MLflow. Each returns the summary
that replaces the row's payload when it is marked done (None: keep the payload), or raises
(`Rejected` for a row that cannot be processed as it stands)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, and_, or_, select

from kdlab.backend.db.models import Artifact, Metric
from kdlab.backend.mlflow import format as fmt
from kdlab.backend.mlflow import hooks, model
from kdlab.backend.mlflow.dedup import MetricDedup, Points
from kdlab.backend.mlflow.rows import OutboxRow, Rejected
from kdlab.backend.mlflow.store import RunStore, chunks

METRICS = cast(Table, Metric.__table__)
METRIC_CHUNK = 1000  # MLflow's limit per log_batch

Writer = Callable[[RunStore, MetricDedup, OutboxRow], "dict[str, Any] | None"]


def run_created(store: RunStore, _dedup: MetricDedup, row: OutboxRow) -> dict[str, Any] | None:
    ensured = store.ensure_run(row.run_id)
    if ensured is None:
        return None
    target, fresh = ensured
    if not fresh:  # a fresh MLflow run was described from the current row already
        state = {"status": row.payload.get("status", "queued"), "changed": []}
        store.describe(target.run_id, row.run_id, row.payload, state)
    return None


def run_updated(store: RunStore, _dedup: MetricDedup, row: OutboxRow) -> dict[str, Any] | None:
    ensured = store.ensure_run(row.run_id)
    if ensured is None:
        return None
    target, fresh = ensured
    if not fresh:
        store.apply_state(target.run_id, row.run_id, row.payload)
    return None


Intervals = dict[str, list[tuple[int, int]]]  # key -> sorted, disjoint [lo, hi] step ranges
GROUP_POINTS = 50_000  # points of consecutive metrics rows read and logged together


def row_ranges(row: OutboxRow) -> dict[str, tuple[int, int]]:
    """A metrics row's step range per key (`Rejected` if the payload is unreadable)."""
    raw_ranges = row.payload.get("ranges")
    try:
        assert isinstance(raw_ranges, dict)
        return {str(k): (int(lo), int(hi)) for k, (lo, hi) in raw_ranges.items()}
    except (AssertionError, TypeError, ValueError) as err:
        raise Rejected(f"unreadable metrics payload: {err!r}") from err


def merge_ranges(each: list[dict[str, tuple[int, int]]]) -> Intervals:
    """The union of several rows' ranges, per key as few disjoint intervals as cover it
    (adjacent and overlapping ranges merged: consecutive batches of a run become one range)."""
    per_key: dict[str, list[tuple[int, int]]] = {}
    for ranges in each:
        for key, bounds in ranges.items():
            per_key.setdefault(key, []).append(bounds)
    merged: Intervals = {}
    for key, all_bounds in per_key.items():
        out: list[tuple[int, int]] = []
        for lo, hi in sorted(all_bounds):
            if out and lo <= out[-1][1] + 1:
                if hi > out[-1][1]:
                    out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        merged[key] = out
    return merged


def _read_points(
    store: RunStore, run_id: str, intervals: Intervals
) -> list[tuple[str, int, float, float]]:
    """The stored points of `run_id` inside each key's step intervals (one short read)."""
    items = sorted((key, lo, hi) for key, bounds in intervals.items() for lo, hi in bounds)
    found: list[tuple[str, int, float, float]] = []
    with store.read_factory() as session:
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            query = (
                select(METRICS.c.key, METRICS.c.step, METRICS.c.value, METRICS.c.wall_time)
                .where(
                    METRICS.c.run_id == run_id,
                    or_(
                        *(
                            and_(METRICS.c.key == key, METRICS.c.step.between(lo, hi))
                            for key, lo, hi in chunk
                        )
                    ),
                )
                .order_by(METRICS.c.key, METRICS.c.step)
            )
            found.extend(
                (key, step, value, wall_time)
                for key, step, value, wall_time in session.execute(query)
            )
        session.rollback()
    return found


def log_points(
    store: RunStore, dedup: MetricDedup, run_id: str, intervals: Intervals
) -> tuple[int, int] | None:
    """The points of `run_id` stored now inside `intervals`, less those MLflow already has,
    logged (`log_batch`, METRIC_CHUNK a call); (sent, skipped), or None if the run is gone."""
    ensured = store.ensure_run(run_id)
    if ensured is None:
        return None
    target = ensured[0]
    points: Points = {}
    for key, step, value, wall_time in _read_points(store, run_id, intervals):
        points[(fmt.mlflow_key(key), int(step))] = (float(value), int(wall_time * 1000))
    unsent = dedup.unsent(store.client, target.run_id, points)
    for chunk in chunks(unsent, METRIC_CHUNK):
        store.pause()
        store.client.log_batch(target.run_id, metrics=chunk, synchronous=True)
        dedup.sent(target.run_id, chunk)
    return len(unsent), len(points) - len(unsent)


def metrics(store: RunStore, dedup: MetricDedup, row: OutboxRow) -> dict[str, Any] | None:
    """A batch's step ranges: the points stored now, less those MLflow already has."""
    ranges = row_ranges(row)
    counts = log_points(store, dedup, row.run_id, merge_ranges([ranges]))
    if counts is None:
        return {**row.payload, "note": "run deleted"}
    return {**row.payload, "sent": counts[0], "skipped": counts[1]}


def metrics_group(
    store: RunStore, dedup: MetricDedup, rows: list[OutboxRow]
) -> dict[int, dict[str, Any]]:
    """Several metrics rows of one run at once: one read of the union of their ranges, its
    new points logged; each row's summary (the group's counts: a point is sent once for all
    the rows whose ranges hold it)."""
    run_id = rows[0].run_id
    assert all(row.run_id == run_id for row in rows)
    counts = log_points(store, dedup, run_id, merge_ranges([row_ranges(row) for row in rows]))
    if counts is None:
        return {row.id: {**row.payload, "note": "run deleted"} for row in rows}
    group = {"rows": len(rows), "first": rows[0].id, "sent": counts[0], "skipped": counts[1]}
    return {row.id: {**row.payload, "group": group} for row in rows}


def _current_artifact(store: RunStore, artifact_id: Any) -> tuple[str, str, str] | None:
    with store.read_factory() as session:
        artifact = session.get(Artifact, artifact_id)
        current = (artifact.kind, artifact.path, artifact.sha256) if artifact else None
        session.rollback()
    return current


def student(store: RunStore, _dedup: MetricDedup, row: OutboxRow) -> dict[str, Any] | None:
    """The exported student as the MLflow model directory `student/` (`kdlab.backend.mlflow.model`),
    unless a later upload superseded it."""
    from kdlab.backend.services import storage

    payload = row.payload
    try:
        artifact_id, path, sha256 = payload["artifact_id"], payload["path"], payload["sha256"]
    except KeyError as err:
        raise Rejected(f"student payload lacks {err}") from err
    current = (hooks.STUDENT_KIND, path, sha256)
    if _current_artifact(store, artifact_id) != current:
        return {**payload, "note": "superseded by a later upload"}
    try:
        source = storage.inside(store.settings.artifacts_dir, path)
    except ValueError as err:
        raise Rejected(str(err)) from err
    info = store.run_info(row.run_id)
    if info is None:
        return {**payload, "note": "run deleted"}
    with tempfile.TemporaryDirectory(prefix="kdlab-mlflow-") as tmp:
        directory = Path(tmp) / model.STUDENT_DIR
        directory.mkdir()
        weights = directory / model.STUDENT_FILE
        try:
            shutil.copyfile(source, weights)
            copied = model.sha256_of(weights)
        except FileNotFoundError:
            copied = None
        if copied != sha256:
            if _current_artifact(store, artifact_id) != current:
                return {**payload, "note": "superseded by a later upload"}
            raise Rejected(
                f"student file {source} is missing or its sha256 is {copied}, not {sha256}"
            )
        ensured = store.ensure_run(row.run_id)
        if ensured is None:
            return {**payload, "note": "run deleted"}
        target = ensured[0]
        model.write_mlmodel(
            store.settings,
            directory,
            target.run_id,
            run_id=info.run_id,
            experiment=info.experiment,
            config=info.config,
            payload=payload,
        )
        store.client.log_artifacts(target.run_id, str(directory), artifact_path=model.STUDENT_DIR)
    from mlflow.entities import RunTag

    store.client.log_batch(
        target.run_id,
        tags=[
            RunTag("kdlab.student", model.STUDENT_DIR),
            RunTag("kdlab.student_sha256", sha256),
        ],
        synchronous=True,
    )
    return {**payload, "artifact_path": model.STUDENT_DIR}


WRITERS: dict[str, Writer] = {
    hooks.RUN_CREATED: run_created,
    hooks.RUN_UPDATED: run_updated,
    hooks.METRICS: metrics,
    hooks.STUDENT: student,
}


def write(store: RunStore, dedup: MetricDedup, row: OutboxRow) -> dict[str, Any] | None:
    """Do the row's MLflow work with the writer of its kind."""
    writer = WRITERS.get(row.kind)
    if writer is None:
        raise Rejected(f"unknown outbox kind {row.kind!r}")
    return writer(store, dedup, row)


__all__ = [
    "GROUP_POINTS",
    "WRITERS",
    "Writer",
    "log_points",
    "merge_ranges",
    "metrics_group",
    "row_ranges",
    "write",
]
