"""The MLflow mirror in its own process, so that replaying into MLflow never competes with the
API's requests for the interpreter (the GIL) or the cores.

`start_mirror(settings, factory)` is what the server's lifespan calls: it installs the outbox
hooks on the API's sessionmaker (the API process queues, in the transactions that made the
changes) and, with `KDLAB_MLFLOW_MIRROR=process` (the default), starts
`python -m kdlab.backend.mlflow.process`, which drains the outbox (`MlflowMirror.serve`) at a
lower priority (`os.nice(KDLAB_MLFLOW_MIRROR_NICE)`, default 10): it takes the CPU the requests
leave and catches up when they pause. `KDLAB_MLFLOW_MIRROR=thread` keeps the old daemon thread
in the API process. Off (`KDLAB_MLFLOW_TRACKING_URI=none`): no hooks, no process.

The settings reach the child on its stdin (one JSON line: they may hold the token, which must
not show in `ps`); stdin stays open, so the child stops when the server goes, however it went
(EOF). The server stops it by its PID: SIGTERM, which ends the loop after the MLflow call in
flight (a row is marked done only after MLflow took its points, so a stop at any moment loses
nothing and sends nothing twice: `kdlab.backend.mlflow.dedup`), then SIGKILL after a grace time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import IO, Protocol

from sqlalchemy.orm import Session, sessionmaker

from kdlab.backend.mlflow import hooks
from kdlab.backend.mlflow.drain import DISABLED_URIS, HTTP_DEFAULTS, MlflowMirror
from kdlab.backend.settings import Settings

log = logging.getLogger(__name__)

MODULE = "kdlab.backend.mlflow.process"
STOP_GRACE = 10.0  # SIGTERM to SIGKILL


class Mirror(Protocol):
    @property
    def running(self) -> bool: ...

    def stop(self, timeout: float = 10.0) -> None: ...


class MirrorProcess:
    """The mirror as a child process of the server (`start()`, `stop()`, `pid`, `running`)."""

    def __init__(self, settings: Settings, interval: float = 1.0) -> None:
        self.settings = settings
        self.interval = interval
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> MirrorProcess:
        if self.running:
            return self
        env = dict(os.environ)
        for name, value in HTTP_DEFAULTS.items():
            env.setdefault(name, value)
        process = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--interval", str(self.interval)],
            stdin=subprocess.PIPE,
            env=env,
            close_fds=True,
            start_new_session=True,  # Ctrl-C at the terminal is the server's to handle
        )
        assert process.stdin is not None
        process.stdin.write(self.settings.model_dump_json().encode() + b"\n")
        process.stdin.flush()
        self._process = process
        log.info("MLflow mirror: process %d started", process.pid)
        return self

    def stop(self, timeout: float = STOP_GRACE) -> None:
        """SIGTERM to the child by its PID, SIGKILL if it has not ended after `timeout` s."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("MLflow mirror: process %d ignored SIGTERM; killed", process.pid)
                process.kill()
                process.wait()
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()


def mirror_enabled(settings: Settings) -> bool:
    return settings.resolved_mlflow_uri.strip().lower() not in DISABLED_URIS


def start_mirror(
    settings: Settings,
    factory: sessionmaker[Session],
    read_factory: sessionmaker[Session] | None = None,
) -> Mirror:
    """The server's mirror, started: hooks on `factory`, and the process (or the thread, which
    reads through `read_factory`)."""
    if settings.mlflow_mirror == "thread" or not mirror_enabled(settings):
        # off: no hooks, no thread
        return MlflowMirror(settings, factory, read_factory=read_factory).start()
    hooks.install_outbox_hooks(factory)
    return MirrorProcess(settings).start()


# --------------------------------------------------------------------------- the child


def _watch_parent(stdin: IO[bytes], mirror: MlflowMirror) -> None:
    """Stop when the server's end of the pipe closes (the server exited, or was killed). Reads
    the file descriptor itself: a daemon thread blocked in the buffered reader would hold its
    lock when the interpreter shuts down (a fatal error at every stop)."""
    with contextlib.suppress(OSError, ValueError):
        fd = stdin.fileno()
        while os.read(fd, 4096):
            pass
    mirror.request_stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from kdlab.backend.db.engine import make_engine, make_read_engine, make_session_factory

    parser = argparse.ArgumentParser(prog=MODULE, description="Drain the MLflow outbox.")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="kdlab mlflow mirror: %(levelname)s %(name)s: %(message)s"
    )
    stdin = sys.stdin.buffer
    settings = Settings.model_validate_json(stdin.readline())
    if settings.mlflow_mirror_nice:
        try:
            os.nice(settings.mlflow_mirror_nice)
        except OSError as err:  # pragma: no cover - not permitted here
            log.warning("os.nice(%d) refused: %s", settings.mlflow_mirror_nice, err)
    lock_timeout = settings.db_lock_timeout_seconds
    engine = make_engine(settings.resolved_database_url, lock_timeout)
    read_engine = make_read_engine(engine, lock_timeout)  # SQLite: no write lock to read
    mirror = MlflowMirror(
        settings, make_session_factory(engine), read_factory=make_session_factory(read_engine)
    )
    mirror.polite = True  # waits while a bulk ingest is under way (`yield_to_ingest`)
    try:  # import MLflow and open its store now, not when the first batch arrives
        mirror.client.search_experiments(max_results=1)
    except Exception as err:  # unreachable now: the drain retries
        log.warning("MLflow not reachable yet: %s", err)
    log.info("MLflow mirror ready (pid %d, niceness %d)", os.getpid(), os.nice(0))

    def _stop(_signum: int, _frame: object) -> None:
        mirror.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    threading.Thread(
        target=_watch_parent, args=(stdin, mirror), name="kdlab-mirror-parent", daemon=True
    ).start()
    try:
        mirror.serve(args.interval)
    finally:
        read_engine.dispose()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
