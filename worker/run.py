"""The worker: train one run for a KD Lab server and report everything back over HTTP.

    python -m kdlab.worker.run --run-id ID --api URL --token TOKEN [--work-dir DIR] [--device DEV]

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
   file; `path` → a local file (external runs only); see `kdlab.worker.teacher_weights`.
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
run and then runs exactly this code path for it. Data → teacher → sinks → trainer is
`kdlab.worker.pipeline`, shared with `kdlab train`; the threads are `kdlab.worker.heartbeat`,
`kdlab.worker.checkpoint_uploader` and `kdlab.worker.log_forwarder`; signals `kdlab.worker.stop_signals`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.worker.checkpoint_uploader import CheckpointUploader
from kdlab.worker.client import ApiClient, ApiClientError, ApiError
from kdlab.worker.config import RunConfig, load_run_config
from kdlab.worker.echo import Echo, print_line
from kdlab.worker.fingerprint_sink import FingerprintReporter
from kdlab.worker.heartbeat import Heartbeat
from kdlab.worker.http_sink import HttpMetricSink
from kdlab.worker.log_forwarder import OutputForwarder
from kdlab.worker.names import (
    BEST_FILE,
    DATASETS_DIR,
    DEFAULT_DATA_DIR,
    FINISHED_STATUSES,
    LATEST_FILE,
    METADATA_FILE,
    METRICS_FILE,
    STUDENT_FILE,
    WORK_DIR,
)
from kdlab.worker.pipeline import TrainingPipeline
from kdlab.worker.stop_signals import WorkerStop, stop_on_signals
from kdlab.worker.teacher_weights import resolve_teacher_weights
from kdlab.worker.trainer import TrainResult

__all__ = [  # the worker's pieces, importable from here as before
    "CheckpointUploader",
    "Heartbeat",
    "OutputForwarder",
    "WorkerOutcome",
    "WorkerStop",
    "resolve_teacher_weights",
    "run_worker",
    "train_on_server",
]

log = logging.getLogger("kdlab.worker")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped without an outcome; the run may be resumed
ERROR_TAIL_LINES = 20


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def data_dir() -> Path:
    """`KDLAB_DATA_DIR` (the server's data dir on this machine), default `~/.kdlab`."""
    return Path(os.environ.get("KDLAB_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def default_work_dir(run_id: str) -> Path:
    """`<data dir>/work/<run id>`: checkpoints, metrics.jsonl, the metric spool, teacher files."""
    return data_dir() / WORK_DIR / run_id


def default_data_root() -> Path:
    """Where file-backed datasets live: `KDLAB_DATA_ROOT`, else `<data dir>/datasets` (the
    server's `data_root`, so a local worker reads the same files the server validated)."""
    root = os.environ.get("KDLAB_DATA_ROOT")
    return Path(root).expanduser() if root else data_dir() / DATASETS_DIR


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


@contextlib.contextmanager
def _maybe(condition: bool, manager: contextlib.AbstractContextManager) -> Iterator[None]:
    if condition:
        with manager:
            yield
    else:
        yield


# --------------------------------------------------------------------------- the work dir


def prepare_work_dir(client: ApiClient, run_id: str, work_dir: Path, echo: Echo) -> Path | None:
    """Download the run's own `latest.pt` (and `best.safetensors`) when an earlier attempt left
    one: the path to resume from. Otherwise clear the work dir's outputs (a fresh start)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    latest = work_dir / LATEST_FILE
    try:
        client.download_artifact(run_id, LATEST_FILE, latest)
    except ApiClientError as err:
        if err.status_code != 404:
            raise
        for name in (LATEST_FILE, BEST_FILE, STUDENT_FILE, METRICS_FILE, METADATA_FILE):
            (work_dir / name).unlink(missing_ok=True)
        return None
    try:
        client.download_artifact(run_id, BEST_FILE, work_dir / BEST_FILE)
    except ApiClientError as err:
        if err.status_code != 404:
            raise
        (work_dir / BEST_FILE).unlink(missing_ok=True)
    (work_dir / STUDENT_FILE).unlink(missing_ok=True)
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
    echo: Echo = print_line,
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
    if run["status"] in FINISHED_STATUSES:
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
    pipeline: TrainingPipeline | None = None
    uploader: CheckpointUploader | None = None
    result: TrainResult | None = None
    failure: BaseException | None = None
    try:
        config = run_config_of(run)
        resume_from = prepare_work_dir(client, run_id, work, echo)
        if device is None and config.resources.gpus == 0:
            device = "cpu"  # the scheduler gave this run no GPU
        every = checkpoint_every_steps or int(_env_float("KDLAB_CHECKPOINT_EVERY_STEPS", 0))
        pipeline = TrainingPipeline(config, work, echo)
        trainer = pipeline.build(
            lambda: resolve_teacher_weights(config, teacher_client, work / "teacher"),
            weights_label=lambda path: path.name,
            extra_sinks=lambda: (
                HttpMetricSink(client, work / "spool", close_timeout=close_timeout),
                FingerprintReporter(client, echo),
            ),
            device=device,
            data_root=data_root,
            should_stop=flag,
            resume_from=resume_from,
            checkpoint_every_steps=every or None,
        )
        uploader = CheckpointUploader(client, work, echo)
        uploader.mark_present()
        uploader.start()
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
            client.put_artifact(result.student_path, STUDENT_FILE, "student")
        if (work / METRICS_FILE).is_file():
            if pipeline is not None:
                pipeline.close_metrics_file()  # flush before uploading it
            client.put_artifact(work / METRICS_FILE, METRICS_FILE, "file")
    except Exception as err:
        upload_error = err
        echo(f"uploading artifacts failed: {error_text(err, 5)}")
    if pipeline is not None:
        pipeline.close()
    built = pipeline.trainer if pipeline is not None else None
    fingerprint = built.teacher_fingerprint if built is not None else None
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
    echo: Echo = print_line,
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
        prog="python -m kdlab.worker.run",
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
