"""The interface every executor implements (local processes, Ray jobs)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

ProcessState = Literal["running", "exited", "unknown"]


@dataclass(frozen=True)
class Launch:
    """Everything an executor needs to start one attempt of a run."""

    run_id: str
    attempt: int
    command: list[str]  # e.g. [python, -m, worker.run, --run-id, ..., --api, ..., --token, ...]
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 0


@dataclass(frozen=True)
class ProcessStatus:
    state: ProcessState
    exit_code: int | None = None
    detail: str = ""


class Executor(abc.ABC):
    """`submit` returns an executor id stored on the run; the other calls take that id."""

    name: str

    @abc.abstractmethod
    def submit(self, launch: Launch) -> str: ...

    @abc.abstractmethod
    def cancel(self, executor_id: str, grace_seconds: float) -> None:
        """Ask the process to stop (it checkpoints and exits), force it after the grace period."""

    @abc.abstractmethod
    def status(self, executor_id: str) -> ProcessStatus: ...

    @abc.abstractmethod
    def logs(self, executor_id: str, tail: int = 200) -> list[str]: ...
