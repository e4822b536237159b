"""What the pages show about runs beyond their rows: progress and ETA, best accuracies, the
metadata the worker logged (steps, loss formula), durations, the baseline of a distill run.

One query per concern for a whole page of runs (never one per run), so the runs table stays
fast at any number of runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Experiment, Metric, Run, RunEvent, utcnow
from kdlab.backend.schemas.runs import ACTIVE, RunOut
from kdlab.backend.services.runs import run_out
from kdlab.worker.names import METADATA_LOG_PREFIX

STEP_KEY = "train/loss_total"  # logged every `log_every` steps by every trainer run
ACC_KEY = "eval/student_acc"
TEACHER_ACC_KEY = "eval/teacher_acc"
METADATA_PREFIX = METADATA_LOG_PREFIX  # the worker's metadata log lines (kdlab.worker.http_sink)


@dataclass(frozen=True)
class Progress:
    step: int
    total: int | None
    eta_seconds: float | None

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.step / self.total) if self.total else None


@dataclass(frozen=True)
class RunSummary:
    """One row of the runs table (and the head of the run page)."""

    run: RunOut
    best_acc: float | None
    teacher_acc: float | None
    progress: Progress | None
    duration_seconds: float | None

    @property
    def active(self) -> bool:
        return self.run.status in ACTIVE


def duration_seconds(run: RunOut, now: datetime | None = None) -> float | None:
    """Started → finished (or now, while it runs); None before it started."""
    if run.started_at is None:
        return None
    end = run.finished_at or (now or utcnow())
    return max(0.0, (end - run.started_at).total_seconds())


def best_values(session: Session, run_ids: Sequence[str], key: str) -> dict[str, float]:
    """The largest value of `key` per run (accuracies: higher is better)."""
    if not run_ids:
        return {}
    rows = session.execute(
        select(Metric.run_id, func.max(Metric.value))
        .where(Metric.run_id.in_(run_ids), Metric.key == key)
        .group_by(Metric.run_id)
    ).all()
    return {run_id: float(value) for run_id, value in rows}


def _total_steps(session: Session, run_ids: Sequence[str]) -> dict[str, int]:
    totals: dict[str, int] = {}
    rows = session.execute(
        select(RunEvent.run_id, RunEvent.message)
        .where(
            RunEvent.run_id.in_(run_ids),
            RunEvent.kind == "log",
            RunEvent.message.startswith(METADATA_PREFIX),
            RunEvent.message.contains('"total_steps"'),
        )
        .order_by(RunEvent.id)
    ).all()
    for run_id, line in rows:
        try:
            total = json.loads(line[len(METADATA_PREFIX) :]).get("total_steps")
        except ValueError:
            continue
        if isinstance(total, int) and total > 0:
            totals[run_id] = total
    return totals


def progress(session: Session, run_ids: Sequence[str]) -> dict[str, Progress]:
    """Step of the newest training point, total steps, and an ETA from the measured rate (the
    steps and wall times of the first and last points of this run's current stretch)."""
    if not run_ids:
        return {}
    totals = _total_steps(session, run_ids)
    rows = session.execute(
        select(
            Metric.run_id,
            func.min(Metric.step),
            func.max(Metric.step),
            func.min(Metric.wall_time),
            func.max(Metric.wall_time),
        )
        .where(Metric.run_id.in_(run_ids), Metric.key == STEP_KEY)
        .group_by(Metric.run_id)
    ).all()
    result: dict[str, Progress] = {}
    for run_id, first_step, last_step, first_time, last_time in rows:
        total = totals.get(run_id)
        eta = None
        if total is not None and last_step > first_step and last_time > first_time:
            rate = (last_time - first_time) / (last_step - first_step)
            eta = max(0.0, (total - last_step) * rate)
        result[run_id] = Progress(int(last_step), total, eta)
    for run_id in run_ids:
        if run_id not in result and run_id in totals:
            result[run_id] = Progress(0, totals[run_id], None)
    return result


def summarize(session: Session, runs: Sequence[RunOut]) -> list[RunSummary]:
    """Rows for the runs table: a few grouped queries for the whole page."""
    ids = [run.id for run in runs]
    best = best_values(session, ids, ACC_KEY)
    teacher = best_values(session, ids, TEACHER_ACC_KEY)
    moving = progress(session, [run.id for run in runs if run.status in ACTIVE])
    now = utcnow()
    return [
        RunSummary(
            run=run,
            best_acc=best.get(run.id),
            teacher_acc=teacher.get(run.id),
            progress=moving.get(run.id),
            duration_seconds=duration_seconds(run, now),
        )
        for run in runs
    ]


def baseline_of(session: Session, run: RunOut) -> RunOut | None:
    """The student-alone baseline of a distill run: the newest succeeded train run of the same
    experiment with the same student, dataset and seed."""
    if run.kind != "distill":
        return None
    config = run.config
    candidates = session.scalars(
        select(Run)
        .join(Run.experiment)
        .where(
            and_(
                Experiment.name == run.experiment,
                Run.kind == "train",
                Run.status == "succeeded",
                Run.id != run.id,
            )
        )
        .order_by(Run.created_at.desc())
        .limit(200)
    ).all()
    for candidate in candidates:
        other = candidate.config
        if (
            other.get("student") == config.get("student")
            and other.get("dataset") == config.get("dataset")
            and other.get("seed") == config.get("seed")
        ):
            return run_out(candidate)
    return None


def teacher_runs(session: Session, limit: int = 200) -> list[tuple[RunOut, float | None]]:
    """Succeeded trainer runs whose best checkpoint can teach, newest first, with their best
    `eval/student_acc` (the teacher picker)."""
    runs = session.scalars(
        select(Run)
        .where(Run.status == "succeeded", Run.kind.in_(("train", "distill")))
        .order_by(Run.created_at.desc())
        .limit(limit)
    ).all()
    best = best_values(session, [r.id for r in runs], ACC_KEY)
    return [(run_out(run), best.get(run.id)) for run in runs]
