"""The supervisor of `kdlab serve` (KDLAB_EXECUTOR=local or ray): a background thread that turns
queued runs into workers and keeps the database true to what those workers do. It drives its
executor through `kdlab.backend.executors.base.Executor` alone: `LocalExecutor` (process groups on this
machine) or `RayExecutor` (one Ray job per attempt), picked by `make_executor` from the settings.

Every `sweep_interval_seconds` one `tick`:
1. **Sweep** each `starting`/`running` run this executor started:
   - its process exited and the worker did not report an outcome (a worker always reports before
     it exits, so the database is read after the exit is seen):
     - the run had a cancel requested → `cancelled`;
     - killed by a signal (`kill -9`, the OOM killer) or gone with an unknown exit code (a worker
       adopted after a server restart) → a *lost worker*: back to `queued` with an event naming
       the reason (the next attempt resumes from `latest.pt`), or `failed` once `max_attempts`
       attempts were used;
     - any exit code (non-zero: a crash before the worker could report; 0: a worker bug) →
       `failed`, the error being the exit and the last 20 lines of its output;
   - its process is alive but silent for `lease_seconds` (no heartbeat; a hung worker) → killed
     (SIGKILL to its group; `stop_job` for a Ray job) and handled as lost;
   - its process is *pending* (a Ray job waiting in Ray's queue for a node with its GPUs): no
     heartbeat is expected, so the lease is held (the run's lease start is moved forward in the
     database too, so a restarted server agrees); it starts when the job runs;
   - a run started by another server (another machine or data dir), or whose process the
     executor does not know (a Ray job gone with its cluster), is judged by its lease only.
   When a process ends abnormally, the tail of its output (`<data>/logs/<run>/<attempt>.log`, or
   the Ray job's logs) is appended to the run's log events, so `GET /api/runs/{id}/logs` shows a
   crash.
2. **Cancel**: a run with `cancel_requested` and a live process gets SIGTERM to its group (the
   worker saves `latest`, uploads it and reports `cancelled`), SIGKILL after
   `cancel_grace_seconds` (a Ray job: `stop_job`, the same two steps done by Ray); a worker gone
   without reporting is marked `cancelled` by step 1. A pending Ray job has run nothing: its run
   is `cancelled` at once.
3. **Claim** queued runs while a slot is free (see `kdlab.backend.services.dispatch.claim_next`; a Ray
   cluster queues every run itself) and start `python -m kdlab.worker.run --run-id … --api
   <public_url> [--work-dir …]`, the run token in the environment (`KDLAB_RUN_TOKEN`). A worker
   on this machine gets its scratch dir under the server's data dir (`--work-dir`,
   `KDLAB_DATA_DIR`); a Ray job uses its node's own.
4. **Demo** (`kdlab serve --demo`): queue the KD student once the demo teacher succeeded.

Stopping the supervisor (the server shuts down) leaves the workers running: they keep training,
spool what they cannot send, and a server restarted on the same data dir (or on the same
database and Ray cluster) adopts them. Cancel a run to stop its worker. A process still alive
`lease_seconds` after its run finished, or alive while its run was handed to another attempt, is
stopped.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from kdlab.backend.db.models import utcnow
from kdlab.backend.executors.base import Executor, Launch, ProcessStatus, killed
from kdlab.backend.executors.local import LocalExecutor
from kdlab.backend.schemas.runs import FINISHED
from kdlab.backend.services import dispatch
from kdlab.backend.services.dispatch import Claim, Dispatched
from kdlab.backend.settings import Settings

log = logging.getLogger("kdlab.supervisor")

ERROR_TAIL_LINES = 20  # lines of output in the error of a crashed run
EVENT_TAIL_LINES = 50  # lines of output appended to the run's log when its process ends badly

# (claim, API URL, work dir on this machine or None where the worker picks its own) → command
CommandFactory = Callable[[Claim, str, Path | None], list[str]]


def worker_command(claim: Claim, api_url: str, work_dir: Path | None) -> list[str]:
    """`python -m kdlab.worker.run …` with this interpreter (the server's environment; Ray nodes run
    the same image, so the same path). The run token travels in the environment
    (`KDLAB_RUN_TOKEN`), not on the process list."""
    command = [sys.executable, "-m", "kdlab.worker.run", "--run-id", claim.run_id, "--api", api_url]
    if work_dir is not None:
        command += ["--work-dir", str(work_dir)]
    return command


def server_identity(settings: Settings) -> str:
    """A stable name for the database this server keeps its runs in (its URL without the
    password, hashed): the owner of the Ray jobs it submits."""
    url = make_url(settings.resolved_database_url).set(password=None)
    digest = hashlib.sha256(url.render_as_string(hide_password=False).encode()).hexdigest()
    return f"db-{digest[:16]}"


def make_executor(settings: Settings) -> Executor:
    """The executor `settings.executor` names: `local` → LocalExecutor over the data dir's logs
    and `cpu_slots`; `ray` → RayExecutor on `ray_address` (KDLAB_RAY_ADDRESS), stopping jobs
    with `cancel_grace_seconds`. ValueError for `none` or a Ray executor without an address."""
    if settings.executor == "local":
        return LocalExecutor(settings.logs_dir, cpu_slots=settings.cpu_slots)
    if settings.executor == "ray":
        if not settings.ray_address:
            raise ValueError(
                "KDLAB_EXECUTOR=ray needs the Ray cluster's Jobs API address: set "
                "KDLAB_RAY_ADDRESS (e.g. http://ray-head:8265, the Ray dashboard's port)"
            )
        from kdlab.backend.executors.ray import RayExecutor

        return RayExecutor(
            settings.ray_address,
            stop_grace_seconds=settings.cancel_grace_seconds,
            owner=server_identity(settings),
        )
    raise ValueError(f"KDLAB_EXECUTOR={settings.executor} dispatches nothing: no supervisor")


class Supervisor:
    """Claims, starts, watches and stops workers; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        executor: Executor | None = None,
        *,
        api_url: str | None = None,
        command: CommandFactory = worker_command,
        worker_env: dict[str, str] | None = None,
        demo: bool = False,
    ):
        self.settings = settings
        self.sessions = session_factory
        self.executor = executor or make_executor(settings)
        self.api_url = (api_url or settings.resolved_public_url).rstrip("/")
        self.command = command
        self.worker_env = dict(worker_env or {})
        self.demo_pending = demo
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lingering: dict[str, float] = {}  # executor id → when its run was seen finished
        self._pending: dict[str, datetime] = {}  # executor id → when it was last seen pending

    # --------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kdlab-supervisor", daemon=True)
        self._thread.start()
        log.info("supervisor started (%s); workers call %s", self.executor.summary(), self.api_url)

    def stop(self, timeout: float = 30.0, *, kill_workers: bool = False) -> None:
        """Stop the loop. Workers keep running unless `kill_workers` (SIGKILL to each group, or
        `stop_job` for each Ray job)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if kill_workers:
            self.executor.kill_all()
        else:
            alive = self.executor.tracked()
            if alive:
                log.warning(
                    "%d worker(s) keep running (%s); a server restarted on this data directory "
                    "or database adopts them",
                    len(alive),
                    ", ".join(alive),
                )

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.settings.sweep_interval_seconds)

    def tick(self) -> None:
        """One round: sweep, cancel, claim, demo. Errors are logged, never raised."""
        for step in (self.sweep, self.claim, self.follow_up_demo):
            if self._stop.is_set() and step is not self.sweep:
                return
            try:
                step()
            except Exception:
                log.exception("supervisor: %s failed; retrying next tick", step.__name__)

    # --------------------------------------------------------------------------- sweep
    def sweep(self) -> None:
        self.executor.poll()
        with self.sessions() as session:
            runs = dispatch.dispatched_runs(session, self.executor.name)
        active = {r.executor_id: r for r in runs if r.executor_id}
        for run in runs:
            try:
                self._watch(run)
            except Exception:
                log.exception("supervisor: watching run %s failed", run.run_id)
        for eid in self.executor.known():
            if eid not in active:
                self._leftover(eid)
        for eid in [e for e in self._pending if e not in active]:
            del self._pending[eid]

    def _silent_for(self, run: Dispatched) -> float:
        """Seconds since the run was last heard from, or since its process last waited in the
        executor's queue (its lease starts when it runs)."""
        seen = run.last_seen
        pending = self._pending.get(run.executor_id or "")
        if pending is not None and pending > seen:
            seen = pending
        return (utcnow() - seen).total_seconds()

    def _watch(self, run: Dispatched) -> None:
        lease = self.settings.lease_seconds
        eid = run.executor_id
        if not self.executor.owns(eid):
            # started elsewhere, or claimed but not yet recorded: the lease decides
            if run.silent_for() > lease:
                self._lost(run, f"no heartbeat for {run.silent_for():.0f} s (lease {lease:g} s)")
            return
        assert eid is not None
        if eid not in self.executor.known():
            self.executor.adopt(eid)  # started by an earlier server on this data dir / database
        status = self.executor.status(eid)
        if status.state == "exited":
            self._pending.pop(eid, None)
            self._ended(run, eid, status)
            return
        if status.alive and run.cancel_requested:
            self.executor.cancel(eid, self.settings.cancel_grace_seconds)
        if status.state == "pending":
            if run.cancel_requested:
                self._cancelled_before_start(run, eid)
            else:
                self._hold_lease(run, eid)
            return
        silent_for = self._silent_for(run)
        if silent_for <= lease:
            return
        if status.state == "running":
            reason = f"worker hung: no heartbeat for {silent_for:.0f} s (lease {lease:g} s)"
            if self._lost(run, reason):
                self.executor.cancel(eid, 0)  # SIGKILL the group; reaped next sweep
        elif status.state == "unknown":  # the executor lost track of it (a Ray cluster restart)
            self._lost(
                run, f"{status.detail or 'worker unknown'}; no heartbeat for {silent_for:.0f} s"
            )

    def _cancelled_before_start(self, run: Dispatched, eid: str) -> None:
        """A cancel for a run whose process still waits for resources: nothing ran, nothing to
        checkpoint, so the run is `cancelled` now. Ray cannot stop a job before it starts (the
        stop takes effect if it ever does; a worker that starts then finds its run finished and
        exits); until then the job is watched as a leftover of a finished run."""
        with self.sessions() as session:
            note = f"cancelled before its worker started ({self.executor.name} job {eid} waiting)"
            if dispatch.mark_cancelled(session, run.run_id, run.attempt, note):
                log.info("run %s attempt %d: %s", run.run_id, run.attempt, note)

    def _hold_lease(self, run: Dispatched, eid: str) -> None:
        """The run's process waits for resources: its lease does not run. Noted here, and in
        the database once half a lease has gone by (so a restarted server agrees)."""
        self._pending[eid] = utcnow()
        if run.silent_for() > self.settings.lease_seconds / 2:
            with self.sessions() as session:
                dispatch.restart_lease(session, run.run_id, run.attempt)

    def _lost(self, run: Dispatched, reason: str) -> bool:
        """A run whose worker is silent past the lease: requeued (or failed, or cancelled when a
        cancel was requested). False when a heartbeat came in meanwhile or the run moved on."""
        with self.sessions() as session:
            if run.cancel_requested:
                note = f"cancelled; its worker was lost ({reason})"
                return dispatch.mark_cancelled(
                    session, run.run_id, run.attempt, note, silent_since=run.last_seen
                )
            new = dispatch.requeue_or_fail(
                session, run.run_id, run.attempt, reason, silent_since=run.last_seen
            )
        if new:
            log.warning("run %s attempt %d: %s → %s", run.run_id, run.attempt, reason, new)
        return new is not None

    def _ended(self, run: Dispatched, eid: str, status: ProcessStatus) -> None:
        """The process of a run still marked starting/running exited. The worker reports its
        outcome before it exits, so whatever the database says now is final; only a run still
        dispatched to this attempt gets a verdict (checked again under a row lock)."""
        code = status.exit_code
        how = self.executor.describe(status)
        tail = self.executor.logs(eid, EVENT_TAIL_LINES)
        with self.sessions() as session:
            if run.cancel_requested:
                changed = dispatch.mark_cancelled(
                    session, run.run_id, run.attempt, f"cancelled; the worker stopped ({how})"
                )
            elif code is None or killed(code):
                reason = f"worker {how}"
                changed = (
                    dispatch.requeue_or_fail(session, run.run_id, run.attempt, reason) is not None
                )
            else:
                lines = "\n".join(tail[-ERROR_TAIL_LINES:]) or "(no output)"
                error = (
                    f"the worker process ended ({how}) without reporting an outcome; "
                    f"its last output:\n{lines}"
                )
                changed = dispatch.fail_run(session, run.run_id, run.attempt, error)
            if changed and tail:  # its output may not all have reached the log: add the tail
                source = self.executor.log_path(eid) or f"{self.executor.name} job {eid}"
                header = (
                    f"--- worker output, attempt {run.attempt} ({how}), last {len(tail)} "
                    f"lines of {source} ---"
                )
                dispatch.add_events(session, run.run_id, "log", [header, *tail])
                session.commit()
        if changed:
            log.warning("run %s attempt %d: worker %s", run.run_id, run.attempt, how)
        self._finish_process(eid, run.run_id)

    def _leftover(self, eid: str) -> None:
        """A process whose run is no longer dispatched to it (finished, requeued, deleted)."""
        status = self.executor.status(eid)
        run_id, attempt = self.executor.run_of(eid)
        if not status.alive:  # exited, or gone from the executor altogether
            self._finish_process(eid, run_id)
            return
        with self.sessions() as session:
            state = dispatch.run_state(session, run_id)
        if state is None or state[1] != attempt or state[0] == "queued":
            if eid not in self._lingering:
                log.warning("run %s: stopping a stale worker of attempt %d", run_id, attempt)
                self._lingering[eid] = time.monotonic()
            self.executor.cancel(eid, 0)
            return
        if state[0] not in FINISHED:
            return  # dispatched under another executor id: not this process's business
        # finished: the worker is winding down; give it `lease_seconds`, then stop it
        seen = self._lingering.setdefault(eid, time.monotonic())
        if time.monotonic() - seen > self.settings.lease_seconds:
            self.executor.cancel(eid, self.settings.cancel_grace_seconds)

    def _finish_process(self, eid: str, run_id: str) -> None:
        """Forget an exited process; remove the run's scratch directory once it is finished."""
        self._lingering.pop(eid, None)
        self._pending.pop(eid, None)
        self.executor.forget(eid)
        if not self.executor.shared_work_dir:
            return  # the worker's scratch dir is on its own machine
        with self.sessions() as session:
            state = dispatch.run_state(session, run_id)
        if state is not None and state[0] in FINISHED:
            shutil.rmtree(self.settings.work_dir / run_id, ignore_errors=True)

    # --------------------------------------------------------------------------- claim
    def claim(self) -> None:
        while not self._stop.is_set():
            with self.sessions() as session:
                claim = dispatch.claim_next(
                    session,
                    can_start=self.executor.has_slot,
                    fits=self.executor.fits,
                    max_attempts=self.settings.max_attempts,
                    executor=self.executor.name,
                )
            if claim is None:
                return
            self._launch(claim)

    def _launch(self, claim: Claim) -> None:
        try:
            env: dict[str, str] = {}
            work_dir: Path | None = None
            if self.executor.shared_work_dir:  # the worker runs here: the server's data dir
                work_dir = self.settings.work_dir / claim.run_id
                work_dir.mkdir(parents=True, exist_ok=True)
                env["KDLAB_DATA_DIR"] = str(self.settings.data_path)  # the worker's data root
            command = self.command(claim, self.api_url, work_dir)
            env.update(self.worker_env)
            env["KDLAB_RUN_TOKEN"] = claim.token
            launch = Launch(claim.run_id, claim.attempt, command, env, claim.gpus)
            eid = self.executor.submit(launch)
        except Exception as err:
            log.exception("run %s: could not start its worker", claim.run_id)
            with self.sessions() as session:
                dispatch.fail_run(
                    session, claim.run_id, claim.attempt, f"could not start the worker: {err!r}"
                )
            return
        with self.sessions() as session:
            recorded = dispatch.record_executor_id(session, claim.run_id, claim.attempt, eid)
        if not recorded:  # cancelled and finished in the meantime
            self.executor.cancel(eid, self.settings.cancel_grace_seconds)
        log.info("run %s attempt %d: worker started (%s)", claim.run_id, claim.attempt, eid)

    # --------------------------------------------------------------------------- demo
    def follow_up_demo(self) -> None:
        if not self.demo_pending:
            return
        with self.sessions() as session:
            try:
                pending, queued = dispatch.demo_follow_up(session, self.settings)
            except Exception:
                self.demo_pending = False
                raise
        self.demo_pending = pending
        if queued is not None:
            log.info("demo: queued %s (run %s) from the finished teacher", queued.name, queued.id)
