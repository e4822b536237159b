"""Dispatch bookkeeping in the database, for the supervisor (`kdlab.backend.supervisor`).

Each function is one short transaction on a session the caller opens and closes around it
(never across a sleep or a subprocess wait), and every status change goes through
`kdlab.backend.services.runs.set_status`.

- `claim_next`: the oldest queued run that fits a free slot becomes `starting`, its attempt
  counter goes up and it gets a fresh run-scoped token. Atomic: on SQLite every transaction is
  `BEGIN IMMEDIATE` (one writer at a time); on PostgreSQL the queued rows are read
  `FOR UPDATE SKIP LOCKED`, so two supervisors never claim the same run.
- `restart_lease`: a run whose process waits for resources (a pending Ray job) is not silent.
- `requeue_or_fail`, `fail_run`, `mark_cancelled`: the supervisor's verdicts on a run whose worker
  ended or went silent. Each locks the row and acts only if the run is still `starting`/`running`
  in the attempt the caller saw, so a worker's own report (or another supervisor) that got there
  first wins and nothing changes twice. They revoke the run's tokens: a worker that was given up
  on cannot report into the next attempt.
- The demo (`kdlab serve --demo`): `queue_demo` and `demo_follow_up`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from kdlab.backend.db.models import ApiToken, Experiment, Run, RunEvent, utcnow
from kdlab.backend.errors import NotFound
from kdlab.backend.schemas.runs import FINISHED, RunOut
from kdlab.backend.services.auth import create_token
from kdlab.backend.services.runs import create_run, get_run, set_status
from kdlab.backend.settings import Settings

DISPATCHED = ("starting", "running")
MAX_EVENT_CHARS = 10_000


def requested_gpus(config: dict[str, Any]) -> int:
    """`resources.gpus` of a stored config (0 when absent)."""
    resources = config.get("resources") or {}
    try:
        return max(0, int(resources.get("gpus", 0) or 0))
    except (TypeError, ValueError):
        return 0


def _revoke_tokens(session: Session, run_id: str) -> None:
    session.execute(
        update(ApiToken)
        .where(ApiToken.run_id == run_id, ApiToken.scope == "run", ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


def add_events(session: Session, run_id: str, kind: str, lines: list[str]) -> None:
    """Append log/status events (the caller commits)."""
    for line in lines:
        session.add(RunEvent(run_id=run_id, kind=kind, message=line[:MAX_EVENT_CHARS]))


# --------------------------------------------------------------------------- claim


@dataclass(frozen=True)
class Claim:
    """A run this supervisor now owns for one attempt; `token` is shown only here."""

    run_id: str
    attempt: int
    gpus: int
    token: str


def claim_next(
    session: Session,
    *,
    can_start: Callable[[int], bool],
    fits: Callable[[int], bool],
    max_attempts: int,
    executor: str = "local",
    scan: int = 50,
) -> Claim | None:
    """Claim the oldest queued run whose GPU need `can_start` now (None when there is none).

    A run that never `fits` this machine (more GPUs than it has) fails at once (through
    `starting`, in the same transaction) instead of waiting forever. Commits."""
    query = (
        select(Run.id, Run.config)
        .where(Run.status == "queued", Run.kind != "external")
        .order_by(Run.created_at, Run.id)
        .limit(scan)
    )
    if session.get_bind().dialect.name != "sqlite":
        query = query.with_for_update(skip_locked=True)
    chosen: tuple[str, int] | None = None
    unfit: list[tuple[str, int]] = []
    for run_id, config in session.execute(query).all():
        gpus = requested_gpus(config)
        if not fits(gpus):
            unfit.append((run_id, gpus))
        elif can_start(gpus):
            chosen = (run_id, gpus)
            break
    for run_id, gpus in unfit:
        run = get_run(session, run_id)
        set_status(session, run, "starting")  # queued → failed is not a legal change
        set_status(
            session,
            run,
            "failed",
            f"the run needs {gpus} GPU(s) (resources.gpus) but this server has fewer; lower "
            "resources.gpus or run it where there are enough GPUs",
        )
    if chosen is None:
        session.commit()
        return None
    run_id, gpus = chosen
    run = get_run(session, run_id)
    if run.attempt == 0:
        run.max_attempts = max_attempts
    run.attempt += 1
    run.executor = executor
    run.executor_id = None
    run.heartbeat_at = None
    run.updated_at = utcnow()  # the lease of a starting run counts from here
    _revoke_tokens(session, run_id)
    token = create_token(
        session, name=f"run {run_id} attempt {run.attempt}", scope="run", run_id=run_id
    )
    set_status(session, run, "starting")
    add_events(
        session,
        run_id,
        "log",
        [f"attempt {run.attempt} of {run.max_attempts}: starting a worker ({executor})"],
    )
    session.commit()
    return Claim(run_id, run.attempt, gpus, token)


def record_executor_id(session: Session, run_id: str, attempt: int, executor_id: str) -> bool:
    """Store where attempt `attempt` runs; False (nothing stored) when the run has moved on."""
    run = _current(session, run_id, attempt)
    if run is None:
        session.rollback()
        return False
    run.executor_id = executor_id
    session.commit()
    return True


# --------------------------------------------------------------------------- observe


@dataclass(frozen=True)
class Dispatched:
    """A `starting`/`running` run as the supervisor sees it in one tick."""

    run_id: str
    status: str
    attempt: int
    max_attempts: int
    executor_id: str | None
    cancel_requested: bool
    last_seen: datetime  # heartbeat, else the claim / last update

    def silent_for(self, now: datetime | None = None) -> float:
        return ((now or utcnow()) - self.last_seen).total_seconds()


def dispatched_runs(session: Session, executor: str = "local") -> list[Dispatched]:
    """Every run `executor` started that has not finished (read-only; rolls back)."""
    rows = session.execute(
        select(
            Run.id,
            Run.status,
            Run.attempt,
            Run.max_attempts,
            Run.executor_id,
            Run.cancel_requested,
            Run.heartbeat_at,
            Run.updated_at,
        ).where(Run.status.in_(DISPATCHED), Run.executor == executor)
    ).all()
    session.rollback()
    found = []
    for run_id, status, attempt, max_attempts, eid, cancel, heartbeat, updated in rows:
        seen = heartbeat or updated or utcnow()
        found.append(Dispatched(run_id, status, attempt, max_attempts, eid, bool(cancel), seen))
    return found


def restart_lease(session: Session, run_id: str, attempt: int) -> bool:
    """The run's process is waiting for resources (a Ray job in Ray's queue): its lease counts
    from now. Only a run still dispatched in `attempt` and not yet heard from; False otherwise."""
    run = _current(session, run_id, attempt)
    if run is None or run.heartbeat_at is not None:
        session.rollback()
        return False
    run.updated_at = utcnow()
    session.commit()
    return True


def run_state(session: Session, run_id: str) -> tuple[str, int] | None:
    """(status, attempt) of a run, None when it was deleted (read-only; rolls back)."""
    row = session.execute(select(Run.status, Run.attempt).where(Run.id == run_id)).first()
    session.rollback()
    return None if row is None else (row[0], row[1])


# --------------------------------------------------------------------------- verdicts


def _current(
    session: Session, run_id: str, attempt: int, silent_since: datetime | None = None
) -> Run | None:
    """The run, locked, if it is still dispatched in `attempt` (and, given `silent_since`, has
    not been heard from since then: a heartbeat that just arrived saves it); else None."""
    try:
        run = get_run(session, run_id, for_update=True)
    except NotFound:
        return None
    if run.status not in DISPATCHED or run.attempt != attempt:
        return None
    if silent_since is not None:
        seen = run.heartbeat_at or run.updated_at
        if seen is not None and seen > silent_since:
            return None
    return run


def requeue_or_fail(
    session: Session,
    run_id: str,
    attempt: int,
    reason: str,
    silent_since: datetime | None = None,
) -> str | None:
    """A lost worker: back to `queued` (the next attempt resumes from `latest.pt`) while attempts
    remain, else `failed` with the reason. The new status, or None if the run had moved on (or,
    given `silent_since`, was heard from after it)."""
    run = _current(session, run_id, attempt, silent_since)
    if run is None:
        session.rollback()
        return None
    _revoke_tokens(session, run_id)
    run.executor_id = None
    if run.attempt < run.max_attempts:
        set_status(session, run, "queued")
        add_events(
            session,
            run_id,
            "error",
            [
                f"attempt {run.attempt} of {run.max_attempts} lost: {reason}; queued again, "
                "the next attempt resumes from latest.pt"
            ],
        )
    else:
        error = f"{reason} (attempt {run.attempt} of {run.max_attempts}; no attempts left)"
        set_status(session, run, "failed", error)
        add_events(session, run_id, "error", [f"failed: {error}"])
    session.commit()
    return run.status


def fail_run(session: Session, run_id: str, attempt: int, error: str) -> bool:
    """The worker crashed without reporting: `failed` with `error`. False if it had moved on."""
    run = _current(session, run_id, attempt)
    if run is None:
        session.rollback()
        return False
    _revoke_tokens(session, run_id)
    set_status(session, run, "failed", error)
    session.commit()
    return True


def mark_cancelled(
    session: Session, run_id: str, attempt: int, note: str, silent_since: datetime | None = None
) -> bool:
    """A cancelled run's worker stopped (or went silent) without reporting: `cancelled`. False if
    it had moved on."""
    run = _current(session, run_id, attempt, silent_since)
    if run is None:
        session.rollback()
        return False
    _revoke_tokens(session, run_id)
    set_status(session, run, "cancelled")
    add_events(session, run_id, "log", [note])
    session.commit()
    return True


# --------------------------------------------------------------------------- demo

DEMO_EXPERIMENT = "demo-digits"
# The demo's story is Hinton et al.'s "soft targets as regularizers" (Distilling the Knowledge in
# a Neural Network, 2015, §3): a teacher trained on every label of the training split distils
# into a small student that has only a few labelled examples. The two students see exactly the
# same 50 examples (a stratified subset of the same training split, `n_train`); the KD student
# also gets the teacher's soft targets on those 50 inputs, nothing more. All three are scored on
# the same 360 held-out validation images. The run names say who saw how many labels.
DEMO_LABELLED = 50  # the students' labelled examples: 5 per digit
DEMO_TEACHER = "digits-teacher-1437-labels"  # the whole training split (1,797 − 360 val)
DEMO_BASELINE = f"digits-student-alone-{DEMO_LABELLED}-labels"
DEMO_KD = f"digits-student-kd-{DEMO_LABELLED}-labels"
DEMO_TEMPERATURE, DEMO_KD_WEIGHT = 8.0, 0.9  # loss = 0.1·CE + 0.9·T²·KL(teacher‖student)
_DEMO_TEACHER_TRAIN: dict[str, Any] = {
    "epochs": 40,
    "batch_size": 64,
    "optimizer": {"name": "adamw", "lr": 0.003},
    "scheduler": {"name": "cosine", "warmup_steps": 0},
    "log_every": 10,
}
# 50 examples in batches of 25: 2 steps an epoch, 600 steps in all (a few seconds on a CPU).
# The student alone has fit its 50 labels long before the end; the KD student keeps closing in on
# the teacher for all 600 steps. Both use the same loop, so they compare like for like.
_DEMO_STUDENT_TRAIN: dict[str, Any] = {
    "epochs": 300,
    "batch_size": 25,
    "optimizer": {"name": "adamw", "lr": 0.01},
    "scheduler": {"name": "cosine", "warmup_steps": 0},
    "log_every": 10,
    "eval_every_epochs": 5,
}


def _digits(n_train: int | None) -> dict[str, Any]:
    params = {} if n_train is None else {"n_train": n_train}
    return {"name": "digits", "params": params, "val_fraction": 0.2}


def demo_configs(teacher_run_id: str = "<teacher>") -> dict[str, dict[str, Any]]:
    """The demo's three run configs (the KD one names `teacher_run_id` as its teacher).

    Measured over seeds in docs/benchmarks.md (`benchmarks/demo_kd_story.py`)."""
    student = {"name": "mlp", "params": {"hidden": [16]}}
    teacher = {"name": "mlp", "params": {"hidden": [128]}}
    common = {"experiment": DEMO_EXPERIMENT, "seed": 0}
    students = {**common, "dataset": _digits(DEMO_LABELLED), "student": student}
    return copy.deepcopy(
        {
            DEMO_TEACHER: {
                **common,
                "name": DEMO_TEACHER,
                "kind": "train",
                "dataset": _digits(None),
                "student": teacher,
                "train": _DEMO_TEACHER_TRAIN,
            },
            DEMO_BASELINE: {
                **students,
                "name": DEMO_BASELINE,
                "kind": "train",
                "train": _DEMO_STUDENT_TRAIN,
            },
            DEMO_KD: {
                **students,
                "name": DEMO_KD,
                "kind": "distill",
                "teacher": {
                    **teacher,
                    "weights": {"run_id": teacher_run_id, "checkpoint": "best"},
                },
                "distill": {
                    "pairs": [
                        {
                            "student_layer": "",
                            "teacher_layer": "",
                            "loss": {
                                "name": "logits_kl",
                                "params": {"temperature": DEMO_TEMPERATURE},
                            },
                        }
                    ],
                    "balancer": {"name": "static", "params": {"kd_weight": DEMO_KD_WEIGHT}},
                },
                "train": _DEMO_STUDENT_TRAIN,
            },
        }
    )


def queue_demo(session: Session, settings: Settings) -> list[RunOut]:
    """On a data dir with no runs: queue the demo teacher and student-alone baseline (through
    `create_run`, as POST /api/runs does). The KD student follows when the teacher succeeds
    (`demo_follow_up`, called by the supervisor). [] when there already are runs."""
    if session.scalar(select(func.count()).select_from(Run)):
        session.rollback()
        return []
    configs = demo_configs()
    return [create_run(session, settings, configs[name]) for name in (DEMO_TEACHER, DEMO_BASELINE)]


def _demo_run(session: Session, name: str) -> Run | None:
    return session.scalars(
        select(Run)
        .join(Run.experiment)
        .where(Experiment.name == DEMO_EXPERIMENT, Run.name == name)
        .order_by(Run.created_at.desc())
        .limit(1)
    ).first()


def demo_follow_up(session: Session, settings: Settings) -> tuple[bool, RunOut | None]:
    """Queue the demo's KD student once its teacher succeeded. Returns (still pending, run
    queued now). Not pending any more when the KD run exists, or the teacher is missing or
    finished without succeeding. Safe across restarts: the state is the runs themselves."""
    teacher = _demo_run(session, DEMO_TEACHER)
    if teacher is None or _demo_run(session, DEMO_KD) is not None:
        session.rollback()
        return False, None
    if teacher.status != "succeeded":
        pending = teacher.status not in FINISHED
        session.rollback()
        return pending, None
    teacher_id = teacher.id
    session.rollback()
    return False, create_run(session, settings, demo_configs(teacher_id)[DEMO_KD])
