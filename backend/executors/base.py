"""The interface every executor implements (local processes, Ray jobs).

The supervisor (`kdlab.backend.supervisor`) drives any executor through this class alone: `submit`,
`status`, `cancel`, `logs` (DESIGN §4), plus the hooks below, whose defaults suit an executor
that schedules by itself and keeps no table of its own (Ray):

- scheduling: `has_slot` / `fits` (default: always; the executor queues what it cannot start);
- bookkeeping: `known` (the executor ids it watches), `tracked` (those still alive), `poll`
  (reap ended ones), `adopt` (watch one started by an earlier server), `forget` (drop one whose
  end was handled);
- identity: `run_of` (the run and attempt of an executor id), `owns` (whether an id is of this
  executor's kind and, where ids say so, of this server);
- output: `log_path` (where its output lies on this machine, if it does), `describe` (an ended
  process in words, for the run's error and events);
- `shared_work_dir`: whether workers run on this machine, so the server's data dir (work dirs,
  `KDLAB_DATA_DIR`) is theirs too.
"""

from __future__ import annotations

import abc
import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# pending: accepted but waiting for resources (a Ray job in Ray's queue): not yet running, so no
# heartbeat is expected from it; unknown: the executor has no such process (not its id, gone)
ProcessState = Literal["pending", "running", "exited", "unknown"]


@dataclass(frozen=True)
class Launch:
    """Everything an executor needs to start one attempt of a run."""

    run_id: str
    attempt: int
    command: list[
        str
    ]  # e.g. [python, -m, kdlab.worker.run, --run-id, ..., --api, ..., --work-dir, ...]
    env: dict[str, str] = field(default_factory=dict)  # the run token travels here
    gpus: int = 0


@dataclass(frozen=True)
class ProcessStatus:
    state: ProcessState
    exit_code: int | None = None
    detail: str = ""

    @property
    def alive(self) -> bool:
        """Pending or running: it has not ended."""
        return self.state in ("pending", "running")


def describe_exit(code: int | None) -> str:
    """E.g. "exit code 3", "killed by SIGKILL", "exit code 143 (SIGTERM)", "exit code unknown"."""
    if code is None:
        return "exit code unknown"
    if 128 < code < 128 + 65:
        with contextlib.suppress(ValueError):
            return f"exit code {code} ({signal.Signals(code - 128).name})"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def killed(code: int | None) -> bool:
    """Whether an exit code means the process was stopped from outside: a signal (negative), or
    128 + a signal number (a shell's convention, and the worker's exit 143 when SIGTERM stopped
    it before any outcome)."""
    return code is not None and (code < 0 or 128 < code < 128 + 65)


class Executor(abc.ABC):
    """`submit` returns an executor id stored on the run; the other calls take that id."""

    name: str
    shared_work_dir: bool = True

    # --- the four calls of DESIGN §4 --------------------------------------------------------------

    @abc.abstractmethod
    def submit(self, launch: Launch) -> str: ...

    @abc.abstractmethod
    def cancel(self, executor_id: str, grace_seconds: float) -> None:
        """Ask the process to stop (it checkpoints and exits), force it after the grace period.
        Returns promptly, without waiting for the process to end; calling it again while it
        stops is harmless."""

    @abc.abstractmethod
    def status(self, executor_id: str) -> ProcessStatus: ...

    @abc.abstractmethod
    def logs(self, executor_id: str, tail: int = 200) -> list[str]: ...

    # --- identity ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def run_of(self, executor_id: str) -> tuple[str, int]:
        """(run id, attempt) of one of this executor's ids; ValueError for any other text."""

    def owns(self, executor_id: str | None) -> bool:
        """Whether `executor_id` is one of this executor's ids (default: `run_of` can read it)."""
        if not executor_id:
            return False
        try:
            self.run_of(executor_id)
        except ValueError:
            return False
        return True

    # --- scheduling --------------------------------------------------------------------------------

    def has_slot(self, gpus: int) -> bool:
        """Whether a launch needing `gpus` GPUs could be submitted now."""
        return True

    def fits(self, gpus: int) -> bool:
        """Whether a launch needing `gpus` GPUs can ever run here."""
        return True

    def summary(self) -> str:
        """One line for the server's log: where runs go, what is free."""
        return f"{self.name} executor"

    # --- bookkeeping -------------------------------------------------------------------------------

    @abc.abstractmethod
    def known(self) -> list[str]:
        """Every executor id this executor watches: those it submitted or adopted and has not
        `forget`-ten (ended ones included), and any it can see are running for this server."""

    def tracked(self) -> list[str]:
        """The ids among `known` that may still be alive (default: `known`)."""
        return self.known()

    def poll(self) -> list[str]:
        """Take note of processes that ended; their ids (default: nothing to do)."""
        return []

    def adopt(self, executor_id: str) -> bool:
        """Watch a process an earlier server started; whether it is ours (default: `owns`)."""
        return self.owns(executor_id)

    def forget(self, executor_id: str) -> None:
        """Drop an ended process whose end the supervisor has handled (default: nothing)."""
        return None

    def kill_all(self, wait_seconds: float = 10.0) -> None:
        """Stop every process it tracks at once (tests; a server told to stop its workers)."""
        for executor_id in self.tracked():
            self.cancel(executor_id, 0)

    # --- output ------------------------------------------------------------------------------------

    def log_path(self, executor_id: str) -> Path | None:
        """The file on this machine holding the process's output, if there is one."""
        return None

    def describe(self, status: ProcessStatus) -> str:
        """An ended process in words, e.g. "exit code 3", "killed by SIGKILL"."""
        return describe_exit(status.exit_code)
