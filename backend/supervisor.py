"""The local supervisor of `kdlab serve` (KDLAB_EXECUTOR=local): a background thread that turns
queued runs into worker processes and keeps the database true to what those processes do.

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
     (SIGKILL to its group) and handled as lost;
   - a run started by another server (another machine or data dir) is judged by its lease only.
   When a process ends abnormally, the tail of its output (`<data>/logs/<run>/<attempt>.log`)
   is appended to the run's log events, so `GET /api/runs/{id}/logs` shows a crash.
2. **Cancel**: a run with `cancel_requested` and a live process gets SIGTERM to its group (the
   worker saves `latest`, uploads it and reports `cancelled`), SIGKILL after
   `cancel_grace_seconds`; a worker gone without reporting is marked `cancelled` by step 1.
3. **Claim** queued runs while a slot is free (see `backend.services.dispatch.claim_next`) and
   start `python -m worker.run --run-id … --api <public_url> --token <run token> --work-dir …`.
4. **Demo** (`kdlab serve --demo`): queue the KD student once the demo teacher succeeded.

Stopping the supervisor (the server shuts down) leaves the workers running: they keep training,
spool what they cannot send, and a server restarted on the same data dir adopts them. Cancel a run
to stop its worker. A process still alive `lease_seconds` after its run finished, or alive while
its run was handed to another attempt, is stopped.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from backend.executors.base import Launch, ProcessStatus
from backend.executors.local import ExecutorId, LocalExecutor, describe_exit, killed
from backend.schemas.runs import FINISHED
from backend.services import dispatch
from backend.services.dispatch import Claim, Dispatched
from backend.settings import Settings

log = logging.getLogger("kdlab.supervisor")

ERROR_TAIL_LINES = 20  # lines of output in the error of a crashed run
EVENT_TAIL_LINES = 50  # lines of output appended to the run's log when its process ends badly

CommandFactory = Callable[[Claim, str, Path], list[str]]


def worker_command(claim: Claim, api_url: str, work_dir: Path) -> list[str]:
    """`python -m worker.run …` with this interpreter (the server's environment). The run token
    travels in the environment (`KDLAB_RUN_TOKEN`), not on the process list."""
    return [
        sys.executable,
        "-m",
        "worker.run",
        "--run-id",
        claim.run_id,
        "--api",
        api_url,
        "--work-dir",
        str(work_dir),
    ]


class Supervisor:
    """Claims, starts, watches and stops local workers; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        executor: LocalExecutor | None = None,
        *,
        api_url: str | None = None,
        command: CommandFactory = worker_command,
        worker_env: dict[str, str] | None = None,
        demo: bool = False,
    ):
        self.settings = settings
        self.sessions = session_factory
        self.executor = executor or LocalExecutor(settings.logs_dir, cpu_slots=settings.cpu_slots)
        self.api_url = (api_url or settings.resolved_public_url).rstrip("/")
        self.command = command
        self.worker_env = dict(worker_env or {})
        self.demo_pending = demo
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lingering: dict[str, float] = {}  # executor id → when its run was seen finished

    # --------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kdlab-supervisor", daemon=True)
        self._thread.start()
        cpu, gpus = self.executor.free_slots()
        log.info(
            "supervisor started: %d CPU slot(s), %d GPU(s); workers call %s",
            cpu,
            gpus,
            self.api_url,
        )

    def stop(self, timeout: float = 30.0, *, kill_workers: bool = False) -> None:
        """Stop the loop. Workers keep running unless `kill_workers` (SIGKILL to each group)."""
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
                    "%d worker(s) keep running (pids %s); a server restarted on this data "
                    "directory adopts them",
                    len(alive),
                    ", ".join(str(ExecutorId.parse(e).pid) for e in alive),
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
            runs = dispatch.dispatched_runs(session)
        active = {r.executor_id: r for r in runs if r.executor_id}
        for run in runs:
            try:
                self._watch(run)
            except Exception:
                log.exception("supervisor: watching run %s failed", run.run_id)
        for eid in self.executor.known():
            if eid not in active:
                self._leftover(eid)

    def _watch(self, run: Dispatched) -> None:
        lease = self.settings.lease_seconds
        eid = run.executor_id
        silent = run.silent_for() > lease
        if not self.executor.owns(eid):
            # started elsewhere, or claimed but not yet recorded: the lease decides
            if silent:
                self._lost(run, f"no heartbeat for {run.silent_for():.0f} s (lease {lease:g} s)")
            return
        assert eid is not None
        if eid not in self.executor.known():
            self.executor.adopt(eid)  # started by an earlier server on this data dir
        status = self.executor.status(eid)
        if status.state == "exited":
            self._ended(run, eid, status)
        elif status.state == "running":
            if run.cancel_requested:
                self.executor.cancel(eid, self.settings.cancel_grace_seconds)
            if silent:
                reason = (
                    f"worker hung: no heartbeat for {run.silent_for():.0f} s (lease {lease:g} s)"
                )
                if self._lost(run, reason):
                    self.executor.cancel(eid, 0)  # SIGKILL the group; reaped next sweep

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
        how = describe_exit(code)
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
                header = (
                    f"--- worker output, attempt {run.attempt} ({how}), last {len(tail)} "
                    f"lines of {self.executor.log_path(eid)} ---"
                )
                dispatch.add_events(session, run.run_id, "log", [header, *tail])
                session.commit()
        if changed:
            log.warning("run %s attempt %d: worker %s", run.run_id, run.attempt, how)
        self._finish_process(eid, run.run_id)

    def _leftover(self, eid: str) -> None:
        """A process whose run is no longer dispatched to it (finished, requeued, deleted)."""
        status = self.executor.status(eid)
        run_id, attempt = _run_of(eid)
        if status.state == "exited":
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
        self.executor.forget(eid)
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
        work_dir = self.settings.work_dir / claim.run_id
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
            command = self.command(claim, self.api_url, work_dir)
            env = {
                "KDLAB_DATA_DIR": str(self.settings.data_path),  # the worker's data root
                **self.worker_env,
                "KDLAB_RUN_TOKEN": claim.token,
            }
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


def _run_of(executor_id: str) -> tuple[str, int]:
    """(run id, attempt) from a local executor id's log path `<run>/<attempt>.log`."""
    log_name = ExecutorId.parse(executor_id).log
    run_id, _, attempt = log_name.partition("/")
    return run_id, int(attempt.removesuffix(".log"))
