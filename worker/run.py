"""The worker: train one run for a KD Lab server and report everything back over HTTP.

    python -m worker.run --run-id ID --api URL --token TOKEN [--work-dir DIR] [--device DEV]

(the token may also come from `KDLAB_RUN_TOKEN`, keeping it off the process list). What it does,
in order (docs/contracts.md, "Worker ↔ backend"):

1. `GET /api/runs/{id}` → the RunConfig (an external run's config is its `params`); a run that
   already finished is left alone, one whose cancel was requested before it started ends
   `cancelled` at once; otherwise it reports `running`.
2. Resume: when the run has a `latest.pt` artifact (an earlier attempt was lost) it is
   downloaded (with `best.safetensors`) into the work dir and training continues from it
   exactly; otherwise the work dir's old outputs are removed (the metric spool is kept).
3. Teacher weights: `weights.run_id` → that run's `best.safetensors` (checkpoint: best) or
   `latest.pt` (checkpoint: latest, its model state extracted); `upload_id` → the upload's
   file; `path` → a local file (external runs only). Loaded with `local_run.load_teacher_state`.
4. Trains with `MultiSink(JsonlSink(work dir), ConsoleSink, HttpMetricSink)`. Meanwhile:
   - a heartbeat thread posts every `KDLAB_HEARTBEAT_SECONDS` (5) and sets the stop flag when
     the answer says `cancel_requested` (or the run finished on the server);
   - SIGTERM / SIGINT set the stop flag too: the trainer writes `latest.pt` and returns;
   - a checkpoint watcher thread uploads `best.safetensors` and `latest.pt` whenever the trainer
     rewrites them (each epoch end, or every `KDLAB_CHECKPOINT_EVERY_STEPS` steps when set), so
     a successor of a killed worker resumes from the last epoch. Polling the files (rather than
     a trainer hook) keeps the trainer unaware of the server, and uploads never stall a step.
     The trainer replaces files atomically and an upload reads one open file, so a half-written
     checkpoint is never uploaded;
   - stdout/stderr lines (progress, warnings, tracebacks) are forwarded to `/logs` each second.
5. At the end: uploads `best.safetensors`, `latest.pt` (kind checkpoint), `student.safetensors`
   (kind student) and `metrics.jsonl` (kind file); flushes the metrics (the sink uploads
   `metadata.json`); stops the heartbeat and sends the last log lines; then reports the outcome,
   last of all: a finished status revokes the run's token, so nothing can be sent after it:
   - `succeeded` (exit 0);
   - `cancelled` when it stopped because a cancel was requested, or an external run was
     stopped (exit 0);
   - `failed` with `error` = the exception message + the last 20 traceback lines, which also go
     to the log as `error` lines (exit 1);
   - stopped by a signal without a cancel request (the machine or supervisor shutting down):
     `latest.pt` is uploaded and the status is left as is, so the supervisor's lease expires and
     the run is requeued and resumed (exit 143).

`kdlab train CONFIG --server URL` goes through `train_on_server` here: it registers an external
run and then runs exactly this code path for it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from worker import catalog
from worker.checkpoint import BEST, LATEST
from worker.client import ApiClient, ApiClientError, ApiError
from worker.config import RunConfig, load_run_config
from worker.http_sink import HttpMetricSink
from worker.local_run import ConsoleSink, StopFlag, load_teacher_state, stop_on_signals
from worker.metrics import JsonlSink, MultiSink
from worker.trainer import STUDENT_FILE, Trainer, TrainResult

log = logging.getLogger("kdlab.worker")

Echo = Callable[[str], None]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped without an outcome; the run may be resumed
ERROR_TAIL_LINES = 20
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
STUDENT = STUDENT_FILE
METRICS_FILE = "metrics.jsonl"
METADATA_FILE = "metadata.json"


def _echo(line: str) -> None:
    print(line, flush=True)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def data_dir() -> Path:
    """`KDLAB_DATA_DIR` (the server's data dir on this machine), default `~/.kdlab`."""
    return Path(os.environ.get("KDLAB_DATA_DIR") or "~/.kdlab").expanduser()


def default_work_dir(run_id: str) -> Path:
    """`<data dir>/work/<run id>`: checkpoints, metrics.jsonl, the metric spool, teacher files."""
    return data_dir() / "work" / run_id


def default_data_root() -> Path:
    """Where file-backed datasets live: `KDLAB_DATA_ROOT`, else `<data dir>/datasets` (the
    server's `data_root`, so a local worker reads the same files the server validated)."""
    root = os.environ.get("KDLAB_DATA_ROOT")
    return Path(root).expanduser() if root else data_dir() / "datasets"


# --------------------------------------------------------------------------- small pieces


def run_config_of(run: dict[str, Any]) -> RunConfig:
    """The RunConfig of a run JSON (an external run registered by `kdlab train --server` keeps
    its config as `params`)."""
    config = run["config"]
    if run.get("kind") == "external":
        config = config.get("params") or {}
    return RunConfig.model_validate(config)


def error_text(exc: BaseException, tail: int = ERROR_TAIL_LINES) -> str:
    """The exception's message, a blank line, then the last `tail` lines of its traceback."""
    message = str(exc) or type(exc).__name__
    lines = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    return message + "\n\n" + "\n".join(lines[-tail:])


class WorkerStop(StopFlag):
    """The trainer's `should_stop`: set by a signal, or by the heartbeat (`cancel` = True when
    the server asked for the stop)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancel = False
        self.reason = ""

    def stop(self, reason: str, cancel: bool) -> None:
        self.reason = self.reason or reason
        self.cancel = self.cancel or cancel
        self.requested = True


@contextlib.contextmanager
def _maybe(condition: bool, manager: contextlib.AbstractContextManager) -> Iterator[None]:
    if condition:
        with manager:
            yield
    else:
        yield


# --------------------------------------------------------------------------- threads


class Heartbeat:
    """Posts a heartbeat every `interval` s; a cancel request (or a run that finished on the
    server) sets the stop flag."""

    def __init__(self, client: ApiClient, flag: WorkerStop, interval: float, echo: Echo):
        self.client = client
        self.flag = flag
        self.interval = interval
        self.echo = echo
        self.cancel_requested = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdlab-heartbeat", daemon=True)
        self._failing = False

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.client.timeout + 5)

    def beat(self) -> None:
        try:
            answer = self.client.heartbeat(attempts=1)
        except ApiClientError as err:  # 409: finished on the server; 404: deleted; 403: token
            if not self.flag.requested:
                self.echo(f"heartbeat refused ({err}); stopping")
            self.flag.stop(f"heartbeat refused: {err}", cancel=err.run_ended)
            return
        except Exception as err:  # the server is away: keep training, try again next beat
            if not self._failing:
                self.echo(f"heartbeat failed ({err}); training goes on, retrying")
            self._failing = True
            return
        self._failing = False
        if answer.get("cancel_requested") and not self.cancel_requested:
            self.cancel_requested = True
            self.echo("cancel requested: writing latest.pt and stopping")
            self.flag.stop("cancel requested", cancel=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


class CheckpointUploader:
    """Uploads `best.safetensors` and `latest.pt` from the work dir whenever the trainer
    rewrites them (polling their inode/mtime/size every `poll` s); `flush()` uploads what
    changed since, from the calling thread, after `stop()`."""

    FILES = ((BEST, "checkpoint"), (LATEST, "checkpoint"))  # best first: latest's best is there

    def __init__(self, client: ApiClient, work_dir: Path, echo: Echo, poll: float = 1.0):
        self.client = client
        self.work_dir = work_dir
        self.echo = echo
        self.poll = poll
        self.uploaded: dict[str, tuple[int, int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdlab-checkpoints", daemon=True)

    def _signature(self, name: str) -> tuple[int, int, int] | None:
        try:
            st = (self.work_dir / name).stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def mark_present(self) -> None:
        """The files now in the work dir are on the server already (downloaded for a resume)."""
        for name, _ in self.FILES:
            signature = self._signature(name)
            if signature is not None:
                self.uploaded[name] = signature

    def start(self) -> CheckpointUploader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def upload_changed(self, attempts: int | None = None) -> None:
        for name, kind in self.FILES:
            signature = self._signature(name)
            if signature is None or self.uploaded.get(name) == signature:
                continue
            self.client.put_artifact(self.work_dir / name, name, kind, attempts=attempts)
            self.uploaded[name] = signature

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.poll):
            try:
                self.upload_changed(attempts=2)
                failing = False
            except FileNotFoundError:
                continue  # replaced between stat and open: the next poll takes the new one
            except Exception as err:
                if not failing:
                    self.echo(f"checkpoint upload failed ({err}); retrying")
                failing = True


class OutputForwarder:
    """Copies this process's stdout/stderr lines to the run's log (`POST /logs`), in batches
    every `interval` s. The original streams still get everything (the LocalExecutor captures
    them to a file). Lines that cannot be sent wait (at most `max_buffer`) for the next try."""

    def __init__(
        self,
        client: ApiClient,
        interval: float = 1.0,
        batch_lines: int = 1000,
        max_buffer: int = 10_000,
    ):
        self.client = client
        self.interval = interval
        self.batch_lines = batch_lines
        self.max_buffer = max_buffer
        self.dropped = 0
        self._lines: list[str] = []
        self._partial: dict[str, str] = {}
        # re-entrant: a signal handler that prints runs on the main thread, maybe inside feed()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdlab-logs", daemon=True)
        self._saved: tuple[TextIO, TextIO] | None = None

    def feed(self, stream: str, text: str) -> None:
        with self._lock:
            buffered = self._partial.get(stream, "") + text
            *complete, rest = buffered.split("\n")
            self._partial[stream] = rest
            self._lines.extend(line.rstrip("\r") for line in complete)
            overflow = len(self._lines) - self.max_buffer
            if overflow > 0:
                del self._lines[:overflow]
                self.dropped += overflow

    def install(self) -> OutputForwarder:
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self, "stdout")
        sys.stderr = _Tee(sys.stderr, self, "stderr")
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Restore the streams and send what is left (trying for up to `timeout` s)."""
        if self._saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = self._saved
            self._saved = None
        self._stop.set()
        self._thread.join(self.client.timeout + 5)
        with self._lock:
            for rest in self._partial.values():
                if rest:
                    self._lines.append(rest)
            self._partial.clear()
        deadline = time.monotonic() + timeout
        while self._send() is False and time.monotonic() < deadline:
            time.sleep(0.5)
        if self._lines or self.dropped:
            print(
                f"worker: {len(self._lines) + self.dropped} log lines did not reach the server",
                file=sys.stderr,
            )

    def _send(self) -> bool | None:
        """True: all sent; False: failed (lines kept); None: nothing to send."""
        sent_any = None
        while True:
            with self._lock:
                batch = self._lines[: self.batch_lines]
            if not batch:
                return sent_any
            try:
                self.client.post_logs(batch, "log", attempts=1)
            except ApiClientError:
                pass  # refused for good (e.g. run deleted): drop them
            except Exception:
                return False
            with self._lock:
                del self._lines[: len(batch)]
            sent_any = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._send()


class _Tee(io.TextIOBase):
    def __init__(self, stream: TextIO, forwarder: OutputForwarder, name: str):
        self._stream = stream
        self._forwarder = forwarder
        self._name = name

    def write(self, text: str) -> int:
        self._stream.write(text)
        self._forwarder.feed(self._name, text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")


class _FingerprintReporter:
    """A sink that reports the teacher fingerprint as soon as the trainer knows it."""

    def __init__(self, client: ApiClient, echo: Echo):
        self.client = client
        self.echo = echo
        self.fingerprint: str | None = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_metadata(self, meta: dict[str, Any]) -> None:
        fingerprint = meta.get("teacher_fingerprint")
        if isinstance(fingerprint, str) and fingerprint != self.fingerprint:
            self.fingerprint = fingerprint
            try:
                self.client.set_status("running", teacher_fingerprint=fingerprint, attempts=2)
            except Exception as err:
                self.echo(f"could not report the teacher fingerprint yet ({err})")

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- weights


def resolve_teacher_weights(config: RunConfig, client: ApiClient, dest_dir: Path) -> Path | None:
    """The file with the teacher's weights, downloaded into `dest_dir` where it lives on the
    server (None when the config names none)."""
    assert config.teacher is not None
    weights = config.teacher.weights
    if weights is None:
        return None
    if weights.path is not None:
        path = Path(weights.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher.weights.path: no file {path.resolve()}")
        return path
    dest_dir.mkdir(parents=True, exist_ok=True)
    if weights.upload_id is not None:
        dest = dest_dir / f"upload-{weights.upload_id}.safetensors"
        try:
            return client.download_upload(weights.upload_id, dest)
        except ApiClientError as err:
            raise FileNotFoundError(
                f"teacher.weights.upload_id {weights.upload_id}: cannot download it: {err}"
            ) from None
    assert weights.run_id is not None
    name = BEST if weights.checkpoint == "best" else LATEST
    try:
        return client.download_artifact(weights.run_id, name, dest_dir / f"{weights.run_id}-{name}")
    except ApiClientError as err:
        raise FileNotFoundError(
            f"teacher.weights.run_id {weights.run_id}: cannot download its {name}: {err}"
        ) from None


def prepare_work_dir(client: ApiClient, run_id: str, work_dir: Path, echo: Echo) -> Path | None:
    """Download the run's own `latest.pt` (and `best.safetensors`) when an earlier attempt left
    one: the path to resume from. Otherwise clear the work dir's outputs (a fresh start)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    latest = work_dir / LATEST
    try:
        client.download_artifact(run_id, LATEST, latest)
    except ApiClientError as err:
        if err.status_code != 404:
            raise
        for name in (LATEST, BEST, STUDENT, METRICS_FILE, METADATA_FILE):
            (work_dir / name).unlink(missing_ok=True)
        return None
    try:
        client.download_artifact(run_id, BEST, work_dir / BEST)
    except ApiClientError as err:
        if err.status_code != 404:
            raise
        (work_dir / BEST).unlink(missing_ok=True)
    (work_dir / STUDENT).unlink(missing_ok=True)
    echo(f"resuming from the run's latest.pt (an earlier attempt stopped): {latest}")
    return latest


# --------------------------------------------------------------------------- the run


@dataclass
class WorkerOutcome:
    """How a worker ended: `status` is what it reported (or `interrupted`: nothing reported)."""

    run_id: str
    status: str
    exit_code: int
    error: str | None = None
    reported: bool = True


def _report(client: ApiClient, status: str, echo: Echo, **fields: Any) -> bool:
    try:
        client.set_status(status, **fields)
        return True
    except ApiClientError as err:
        echo(f"the server refused status {status}: {err}")
        return err.run_ended  # the run already ended (e.g. the supervisor ended it)
    except ApiError as err:
        echo(f"could not report status {status}: {err}")
        return False


def run_worker(
    client: ApiClient,
    run_id: str | None = None,
    work_dir: str | os.PathLike | None = None,
    *,
    teacher_client: ApiClient | None = None,
    device: str | None = None,
    data_root: Path | None = None,
    heartbeat_seconds: float | None = None,
    checkpoint_every_steps: int | None = None,
    close_timeout: float = 60.0,
    forward_output: bool = True,
    handle_signals: bool = True,
    echo: Echo = _echo,
) -> WorkerOutcome:
    """Train run `run_id` (default: the client's) for the server; see the module docstring.

    `teacher_client`: the client that downloads teacher weights (default `client`; `kdlab train
    --server` passes its admin client, since an external run's token cannot read other runs).
    `device`: a torch device; default `cpu` when the config asks for no GPU, else automatic.
    """
    run_id = run_id or client.run_id
    if not run_id:
        raise ValueError("run_worker: no run id")
    if client.run_id is None:
        client.run_id = run_id
    work = Path(work_dir) if work_dir is not None else default_work_dir(run_id)
    run = client.get_run(run_id)
    if run["status"] in FINISHED:
        echo(f"run {run_id} is already {run['status']}; nothing to do")
        return WorkerOutcome(run_id, run["status"], EXIT_OK, reported=False)
    if run.get("cancel_requested"):
        ok = _report(client, "cancelled", echo)
        echo(f"run {run_id} was cancelled before it started")
        return WorkerOutcome(run_id, "cancelled", EXIT_OK if ok else EXIT_FAILED, reported=ok)

    forwarder = OutputForwarder(client).install() if forward_output else None
    flag = WorkerStop()
    interval = (
        heartbeat_seconds
        if heartbeat_seconds is not None
        else _env_float("KDLAB_HEARTBEAT_SECONDS", 5.0)
    )
    heartbeat: Heartbeat | None = None

    def quiet() -> None:
        """Stop the heartbeat and send the last log lines: what must reach the server before
        the final status, which revokes the run's token (idempotent)."""
        nonlocal heartbeat, forwarder
        if heartbeat is not None:
            heartbeat.stop()
            heartbeat = None
        if forwarder is not None:
            forwarder.close()
            forwarder = None

    try:
        with _maybe(handle_signals, stop_on_signals(flag, echo)):
            _report(client, "running", echo)  # a no-op for an external run (already running)
            heartbeat = Heartbeat(client, flag, interval, echo).start()
            echo(f"worker: run {run_id} ({run['name']}, attempt {run.get('attempt', 0)}) in {work}")
            return _train_and_report(
                client,
                run,
                work,
                flag,
                teacher_client=teacher_client or client,
                device=device,
                data_root=data_root if data_root is not None else default_data_root(),
                checkpoint_every_steps=checkpoint_every_steps,
                close_timeout=close_timeout,
                echo=echo,
                before_outcome=quiet,
            )
    finally:
        quiet()


def _train_and_report(
    client: ApiClient,
    run: dict[str, Any],
    work: Path,
    flag: WorkerStop,
    *,
    teacher_client: ApiClient,
    device: str | None,
    data_root: Path,
    checkpoint_every_steps: int | None,
    close_timeout: float,
    echo: Echo,
    before_outcome: Callable[[], None] = lambda: None,
) -> WorkerOutcome:
    """Train, upload, then report the outcome. Everything (artifacts, metrics, log lines: see
    `before_outcome`) is sent before the final status: that revokes the run's token."""
    run_id = run["id"]
    sink: MultiSink | None = None
    http_sink: HttpMetricSink | None = None
    uploader: CheckpointUploader | None = None
    trainer: Trainer | None = None
    result: TrainResult | None = None
    failure: BaseException | None = None
    try:
        config = run_config_of(run)
        resume_from = prepare_work_dir(client, run_id, work, echo)
        data = catalog.build_dataset(config.dataset, config.seed, data_root)
        teacher_state = None
        if config.kind == "distill":
            weights = resolve_teacher_weights(config, teacher_client, work / "teacher")
            if weights is not None:
                echo(f"teacher weights: {weights.name}")
                teacher_state = load_teacher_state(config, weights, data.info)
        http_sink = HttpMetricSink(client, work / "spool", close_timeout=close_timeout)
        sink = MultiSink(
            JsonlSink(work / METRICS_FILE),
            ConsoleSink(echo),
            http_sink,
            _FingerprintReporter(client, echo),
        )
        uploader = CheckpointUploader(client, work, echo)
        uploader.mark_present()
        uploader.start()
        if device is None and config.resources.gpus == 0:
            device = "cpu"  # the scheduler gave this run no GPU
        every = checkpoint_every_steps or int(_env_float("KDLAB_CHECKPOINT_EVERY_STEPS", 0))
        trainer = Trainer(
            config,
            work,
            sink,
            teacher_state,
            device,
            data=data,
            data_root=data_root,
            should_stop=flag,
            resume_from=resume_from,
            checkpoint_every_steps=every or None,
        )
        if not flag.requested:  # a cancel during setup needs no training at all
            result = trainer.fit()
    except (Exception, KeyboardInterrupt) as exc:
        failure = exc

    # ---- the end: artifacts, metrics, then the outcome
    if uploader is not None:
        uploader.stop()
    upload_error: Exception | None = None
    try:
        if uploader is not None:
            uploader.upload_changed()
        if result is not None and not result.stopped and result.student_path is not None:
            client.put_artifact(result.student_path, STUDENT, "student")
        if (work / METRICS_FILE).is_file():
            if sink is not None:
                sink.sinks[0].close()  # the JsonlSink: flush before uploading its file
            client.put_artifact(work / METRICS_FILE, METRICS_FILE, "file")
    except Exception as err:
        upload_error = err
        echo(f"uploading artifacts failed: {error_text(err, 5)}")
    if sink is not None:
        sink.close()
    fingerprint = trainer.teacher_fingerprint if trainer is not None else None
    extra = {"teacher_fingerprint": fingerprint} if fingerprint else {}

    if failure is None and upload_error is not None and result is not None and not result.stopped:
        failure = upload_error  # trained, but the student did not reach the server
    if isinstance(failure, KeyboardInterrupt):
        echo("interrupted; latest.pt is uploaded, the run can be resumed")
        return WorkerOutcome(run_id, "interrupted", EXIT_INTERRUPTED, reported=False)
    if failure is not None:
        text = error_text(failure)
        echo(f"run failed: {text.partition(chr(10))[0]}")  # the traceback follows as error lines
        with contextlib.suppress(Exception):
            client.post_logs(text.splitlines(), "error")
        before_outcome()
        ok = _report(client, "failed", echo, error=text, **extra)
        return WorkerOutcome(run_id, "failed", EXIT_FAILED, error=text, reported=ok)
    if result is None or result.stopped:
        if flag.cancel or run.get("kind") == "external" or _cancel_requested(client):
            step = result.global_step if result is not None else 0
            echo(f"cancelled at step {step}" + ("; latest.pt uploaded" if result else ""))
            before_outcome()
            ok = _report(client, "cancelled", echo, **extra)
            return WorkerOutcome(run_id, "cancelled", EXIT_OK if ok else EXIT_FAILED, reported=ok)
        echo(
            f"stopped by a signal ({flag.reason or 'no cancel requested'}); latest.pt is "
            "uploaded and the run stays as it is, to be resumed"
        )
        return WorkerOutcome(run_id, "interrupted", EXIT_INTERRUPTED, reported=False)
    echo(f"done: run {run_id} succeeded at step {result.global_step}")
    before_outcome()
    ok = _report(client, "succeeded", echo, **extra)
    return WorkerOutcome(run_id, "succeeded", EXIT_OK if ok else EXIT_FAILED, reported=ok)


def _cancel_requested(client: ApiClient) -> bool:
    try:
        return bool(client.get_run().get("cancel_requested"))
    except ApiError:
        return False


# --------------------------------------------------------------------------- kdlab train --server


def train_on_server(
    config_path: str | os.PathLike,
    server: str,
    token: str | None = None,
    *,
    work_dir: str | os.PathLike | None = None,
    device: str | None = None,
    echo: Echo = _echo,
) -> WorkerOutcome:
    """`kdlab train CONFIG --server URL`: register an external run (the config as its params)
    and train it here exactly like a dispatched worker. `teacher.weights.run_id` / `upload_id`
    name runs and uploads on that server; `path` a local file."""
    config = load_run_config(Path(config_path))
    with ApiClient(server, token) as admin:
        registered = admin.register_external(config.model_dump(mode="json"))
        url = f"{admin.base_url}/runs/{registered.run_id}"
        echo(
            f"registered external run {registered.run_id} ({config.name}, experiment "
            f"{config.experiment}): {url}"
        )
        with admin.for_run(registered.run_id, registered.token) as client:
            outcome = run_worker(
                client,
                registered.run_id,
                work_dir,
                teacher_client=admin,
                device=device,
                echo=echo,
            )
    echo(f"run {registered.run_id} {outcome.status}: {url}")
    return outcome


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.run",
        description="Train one run of a KD Lab server and report to it over HTTP.",
    )
    parser.add_argument("--run-id", required=True, help="the run to train")
    parser.add_argument("--api", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--token",
        default=os.environ.get("KDLAB_RUN_TOKEN"),
        help="bearer token scoped to the run (default: $KDLAB_RUN_TOKEN)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="default: ~/.kdlab/work/<run id>"
    )
    parser.add_argument("--device", default=None, help="torch device (default: from the config)")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="file-backed datasets (default: see docs)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore"):  # one INFO line per request would flood the run's log
        logging.getLogger(noisy).setLevel(logging.WARNING)
    client = ApiClient(args.api, args.token, run_id=args.run_id)
    try:
        outcome = run_worker(
            client,
            args.run_id,
            args.work_dir,
            device=args.device,
            data_root=args.data_root,
        )
    except ApiError as err:
        print(f"worker: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.close()
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
