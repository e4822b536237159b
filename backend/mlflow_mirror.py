"""The MLflow mirror: drains `mlflow_outbox` into an MLflow tracking server (DESIGN §5).

`MlflowMirror(settings, session_factory).start()` runs a daemon thread that calls `drain_once()`
every `interval` seconds; `.stop()` ends it. Nothing in the app waits on MLflow: requests only
write outbox rows (`backend.services.outbox`), in their own transactions.

What a KD Lab run becomes in MLflow
-----------------------------------
- one MLflow experiment per KD Lab experiment (get-or-create by name; a deleted one is
  restored). With a local store (`sqlite:///…`, the default `sqlite:///<data>/mlflow.db`) the
  artifacts go to `<directory of the store>/mlartifacts/<experiment>/`, not MLflow's default
  `./mlruns` in whatever directory the server was started from.
- one MLflow run per run, named like it, tagged `kdlab.run_id` (how a lost id is found again);
  its ids are stored on the run row (`mlflow_experiment_id`, `mlflow_run_id`).
- params: the flattened config (`train.optimizer.lr`, `distill.pairs.0.loss.params.temperature`;
  values ≤ 500 characters, longer ones cut with `...[truncated]`).
- tags: `kdlab.kind`, `kdlab.status`, `kdlab.experiment`, `kdlab.teacher_run_id`,
  `kdlab.teacher_fingerprint`, `kdlab.error` (the last 5,000 characters; "" once cleared), the KD
  conventions (`kd.losses`, `kd.pairs`, `kd.temperatures`, `kd.t2_convention` such as "LogitsKL
  multiplies by T² (T=4.0, factor 16.0)", `kd.balancer`, `kd.balancer.kd_weight`,
  `kd.pair.<i>.formula` — the loss's own `describe()`), `kdlab.student_sha256`.
- status: queued → SCHEDULED, starting/running → RUNNING, succeeded → FINISHED, failed → FAILED,
  cancelled → KILLED (terminal ones with `set_terminated`, end time = the run's `finished_at`).
- metrics: `log_batch` in chunks of ≤ 1,000, timestamp = the point's wall time in ms, step =
  the point's step. MLflow refuses `~` in names, so `train/kd/fc~fc` is logged as
  `train/kd/fc-to-fc` (`backend.services.outbox.mlflow_key`).
- the exported student, as an MLflow model directory `student/` in the run's artifacts:
  `student.safetensors` (the file `kd.save` wrote, sha256 checked) and an `MLmodel` file written
  with `mlflow.models.Model` carrying the signature (input: `[-1, *input_shape]` of the run's
  dataset DataInfo and its dtype; output `[-1, num_classes]` float32, `[-1, seq_len, vocab]` for
  language models) and a `kdlab` flavor (weights file, sha256, the student's catalog spec, how to
  load it). `mlflow.pytorch.log_model` would pickle the module class; this directory has no
  `python_function` flavor, so load it with `kd.restore(catalog.build_model(spec, info), path)`,
  not `mlflow.pyfunc.load_model`. It is a run artifact (MLflow 2 and 3 servers alike), not an
  MLflow 3 `LoggedModel`; `mlflow.register_model("runs:/<id>/student", name)` registers it.

Order, retries, exactly once
----------------------------
Rows are processed in id order. The first MLflow error stops the round: that row's `attempts`
and `last_error` are updated and it is retried next round (the thread backs off exponentially up
to a minute); rows behind it wait, so order is kept. An error MLflow gives as the request's fault
(`INVALID_PARAMETER_VALUE`, `BAD_REQUEST`, `INVALID_STATE`, `RESOURCE_DOES_NOT_EXIST`, or a row
the mirror cannot read) is retried `MAX_REJECTIONS` times, then the row is marked done with
`last_error = "gave up after N attempts: …"` so the queue moves on; connection errors and server
errors are retried forever. A row is marked done (`done_at`; a metrics row's payload gets the
counts sent and skipped) in one transaction after its MLflow calls succeeded; no database transaction is
open during an MLflow call. A metrics row names each key's step range; the points are read from
the `metrics` table when the row is processed (so MLflow gets the values stored then).

MLflow keeps every `log_batch` point, so the mirror dedups per (metric key, step) against MLflow
itself: it keeps, per MLflow run, the highest step of each key (read once from `get_run`, which
returns each key's latest point — the one with the highest step — then updated as it logs, and
dropped after any error). A point whose step is above that is new; for a key with any point at or
below it (a resumed run re-logging steps after its `latest` checkpoint, a worker re-sending a
spooled batch, a row retried after a chunk was sent or after a crash between MLflow's answer and
`done_at`) the key's history is fetched and the steps MLflow already has are skipped. So a
(key, step) reaches MLflow once; its value there is the first one mirrored (KD Lab's table keeps
the last one written). Two mirrors on one database (two `kdlab serve` on one PostgreSQL) take
turns: a round runs under a PostgreSQL advisory lock (SQLite: an flock next to the database).

`KDLAB_MLFLOW_TRACKING_URI=none` (or `off`) turns the mirror off: `start()` installs no hooks and
starts no thread, so nothing is queued. HTTP tracking servers: `start()` sets `MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`,
`MLFLOW_HTTP_REQUEST_TIMEOUT=30` and `MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true` unless they are
set (the mirror retries itself; MLflow's default of 7 retries with backoff would hold a round for
minutes; MLflow prints a run link to stdout on every terminate). Tested against a SQLite store in
process and, by hand, through `mlflow server --artifacts-destination` (REST, proxied artifacts). A deleted KD Lab run's MLflow run is
kept (its pending outbox rows are deleted with it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Engine, Table, and_, delete, func, or_, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from backend.db.models import Artifact, Metric, MlflowOutbox, Run, utcnow
from backend.services import outbox
from backend.settings import Settings
from worker.names import STUDENT_FILE

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature

log = logging.getLogger(__name__)

OUTBOX = cast(Table, MlflowOutbox.__table__)
RUNS = cast(Table, Run.__table__)
METRICS = cast(Table, Metric.__table__)

STATUS_MAP = {
    "queued": "SCHEDULED",
    "starting": "RUNNING",
    "running": "RUNNING",
    "succeeded": "FINISHED",
    "failed": "FAILED",
    "cancelled": "KILLED",
}
TERMINAL = frozenset({"FINISHED", "FAILED", "KILLED"})
METRIC_CHUNK = 1000  # MLflow's limit per log_batch
PARAM_TAG_CHUNK = 100  # MLflow's limit of params (and of tags) per log_batch
MAX_REJECTIONS = 3
PERMANENT_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}
)
MAX_BACKOFF = 60.0
PURGE_EVERY = 3600.0
KEEP_DONE = timedelta(days=7)
ERROR_CHARS = 4000
ADVISORY_LOCK_KEY = 0x6B646C61624D4C46  # "kdlabMLF"
STUDENT_DIR = "student"
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # "🏃 View run ..." on every terminate
}
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
DISABLED_URIS = frozenset({"none", "off", "disabled"})
_SKIP = {outbox.SKIP_OPTION: True}


class Rejected(Exception):
    """A row the mirror cannot process as it stands (retried MAX_REJECTIONS times)."""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    run_id: str
    kind: str
    payload: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class _RunInfo:
    run_id: str
    name: str
    experiment: str
    mlflow_experiment_id: str | None
    mlflow_run_id: str | None
    created: dict[str, Any]  # a run_created payload built from the row as it is now
    state: dict[str, Any]  # a run_updated payload: the row's status/fingerprint/error now
    config: dict[str, Any]


@dataclass(frozen=True)
class Target:
    experiment_id: str
    run_id: str


def mlflow_run_url(settings: Settings, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI (`KDLAB_MLFLOW_UI_URL`, else an http(s) tracking URI)."""
    base = settings.mlflow_ui_url
    if base is None and settings.resolved_mlflow_uri.startswith(("http://", "https://")):
        base = settings.resolved_mlflow_uri
    if base is None:
        return None
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _describe_error(err: BaseException) -> str:
    return outbox.truncate(f"{type(err).__name__}: {err}", ERROR_CHARS, keep="tail")


def _is_permanent(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in PERMANENT_CODES
    return isinstance(err, (Rejected, KeyError, ValueError, TypeError))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MlflowMirror:
    """Drains the outbox into MLflow. `drain_once()` does one round; `start()`/`stop()` run
    rounds on a daemon thread. One instance per process is enough; it is thread-safe."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        tracking_uri: str | None = None,
    ) -> None:
        self.settings = settings
        self.tracking_uri = tracking_uri or settings.resolved_mlflow_uri
        self._factory = session_factory
        self._client: MlflowClient | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._experiments: dict[str, str] = {}  # experiment name -> MLflow id, seen this process
        self._verified: set[str] = set()  # MLflow run ids known to exist
        self._latest: dict[str, dict[str, int]] = {}  # MLflow run id -> key -> highest step
        self.failures = 0  # consecutive rounds that stopped on an error
        self.last_error: str | None = None

    # ------------------------------------------------------------------ client and store

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            url = self._db_url()
            if url is not None and url.get_backend_name() == "sqlite" and url.database:
                Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _db_url(self) -> Any:
        """The tracking URI as a SQLAlchemy URL when MLflow talks to a database directly."""
        scheme = self.tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
        if scheme not in _DB_SCHEMES:
            return None
        try:
            return make_url(self.tracking_uri)
        except Exception:
            return None

    def _artifact_location(self, experiment: str) -> str | None:
        """Where a new experiment's artifacts go: next to a local store, else MLflow's choice."""
        url = self._db_url()
        if url is None:
            return None  # a tracking server (or a file store) picks its own artifact root
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            root = Path(url.database).expanduser().resolve().parent / "mlartifacts"
        else:
            root = self.settings.data_path / "mlartifacts"
        from backend.services.artifacts import safe_filename

        return (root / safe_filename(experiment)).as_uri()

    def _engine(self) -> Engine:
        bind = self._factory.kw.get("bind")
        if isinstance(bind, Engine):
            return bind
        with self._factory() as session:
            engine = session.get_bind()
            assert isinstance(engine, Engine)
            return engine

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[bool]:
        """True while this process may drain (PostgreSQL advisory lock, SQLite flock)."""
        engine = self._engine()
        if engine.dialect.name == "postgresql":
            with engine.connect() as raw:
                conn = raw.execution_options(isolation_level="AUTOCOMMIT")
                got = bool(
                    conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
                )
                try:
                    yield got
                finally:
                    if got:
                        conn.scalar(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
            return
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield True
            return
        if not database or database == ":memory:":
            yield True
            return
        lock_path = (
            Path(database).expanduser().with_name(Path(database).name + ".mlflow-mirror.lock")
        )
        with open(lock_path, "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ the loop

    @property
    def enabled(self) -> bool:
        """False when the tracking URI is `none`/`off` (`KDLAB_MLFLOW_TRACKING_URI=none`)."""
        return self.tracking_uri.strip().lower() not in DISABLED_URIS

    def start(self, interval: float = 1.0) -> MlflowMirror:
        """Drain on a daemon thread every `interval` seconds (sooner while rows are waiting,
        later after errors). Installs the outbox hooks. Returns self. Does nothing (no hooks,
        no thread, MLflow not imported) when the mirror is not `enabled`."""
        if not self.enabled:
            return self
        outbox.install_outbox_hooks()
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name="kdlab-mlflow-mirror", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to stop and wait up to `timeout` s (an MLflow call in flight ends on
        its own timeout; the thread is a daemon either way)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self, interval: float, limit: int = 100) -> None:
        last_purge = time.monotonic()
        while not self._stopping.is_set():
            try:
                done = self.drain_once(limit)
            except Exception as err:  # our own database, most likely; try again later
                log.warning("MLflow mirror: round failed: %s", _describe_error(err))
                self.failures += 1
                done = 0
            if self.failures:
                delay = min(MAX_BACKOFF, interval * 2 ** min(self.failures, 10))
            else:
                delay = 0.0 if done >= limit else interval
            if time.monotonic() - last_purge > PURGE_EVERY:
                last_purge = time.monotonic()
                with contextlib.suppress(SQLAlchemyError):
                    self.purge()
            if delay:
                self._stopping.wait(delay)

    def purge(self, older_than: timedelta = KEEP_DONE) -> int:
        """Delete rows done more than `older_than` ago; how many went."""
        with self._factory() as session:
            result = session.execute(
                delete(OUTBOX).where(OUTBOX.c.done_at < utcnow() - older_than),
                execution_options=_SKIP,
            )
            session.commit()
            return int(getattr(result, "rowcount", 0) or 0)

    def pending(self) -> int:
        """How many rows wait."""
        with self._factory() as session:
            count = session.scalar(
                select(func.count()).select_from(OUTBOX).where(OUTBOX.c.done_at.is_(None))
            )
            session.rollback()
            return int(count or 0)

    def drain_once(self, limit: int = 100) -> int:
        """Process up to `limit` pending rows in id order; how many were marked done. Stops at
        the first error (that row keeps `attempts`/`last_error` and is retried next round)."""
        if not self.enabled:
            return 0
        with self._lock, self._exclusive() as mine:
            if not mine:
                return 0
            processed = 0
            while processed < limit:
                rows = self._pending_rows(min(limit - processed, 100))
                if not rows:
                    break
                for row in rows:
                    if not self._attempt(row):
                        self.failures += 1
                        return processed
                    processed += 1
            self.failures = 0
            return processed

    def _pending_rows(self, limit: int) -> list[OutboxRow]:
        with self._factory() as session:
            rows = session.execute(
                select(
                    OUTBOX.c.id,
                    OUTBOX.c.run_id,
                    OUTBOX.c.kind,
                    OUTBOX.c.payload,
                    OUTBOX.c.attempts,
                )
                .where(OUTBOX.c.done_at.is_(None))
                .order_by(OUTBOX.c.id)
                .limit(limit)
            ).all()
            session.rollback()
        return [
            OutboxRow(r.id, r.run_id, r.kind, dict(r.payload or {}), int(r.attempts or 0))
            for r in rows
        ]

    def _attempt(self, row: OutboxRow) -> bool:
        """Process one row; False if it failed and the round must stop."""
        try:
            summary = self._process(row)
        except Exception as err:
            # whatever MLflow did before the error, the caches may now be wrong
            self._latest.clear()
            self._verified.clear()
            self._experiments.clear()
            message = _describe_error(err)
            self.last_error = f"outbox row {row.id} ({row.kind}, run {row.run_id}): {message}"
            give_up = _is_permanent(err) and row.attempts + 1 >= MAX_REJECTIONS
            log.warning("MLflow mirror: %s%s", self.last_error, " (giving up)" if give_up else "")
            self._record_failure(row, message, give_up)
            return give_up
        self._finish(row, summary)
        return True

    def _record_failure(self, row: OutboxRow, message: str, give_up: bool) -> None:
        values: dict[str, Any] = {"attempts": OUTBOX.c.attempts + 1, "last_error": message}
        if give_up:
            values["last_error"] = outbox.truncate(
                f"gave up after {row.attempts + 1} attempts: {message}", ERROR_CHARS, keep="tail"
            )
            values["done_at"] = utcnow()
        with self._factory() as session:
            session.execute(
                update(OUTBOX).where(OUTBOX.c.id == row.id).values(**values),
                execution_options=_SKIP,
            )
            session.commit()

    def _finish(self, row: OutboxRow, summary: dict[str, Any] | None) -> None:
        values: dict[str, Any] = {"done_at": utcnow()}
        if summary is not None:
            values["payload"] = summary
        with self._factory() as session:
            session.execute(
                update(OUTBOX)
                .where(OUTBOX.c.id == row.id, OUTBOX.c.done_at.is_(None))
                .values(**values),
                execution_options=_SKIP,
            )
            session.commit()

    # ------------------------------------------------------------------ one row

    def _process(self, row: OutboxRow) -> dict[str, Any] | None:
        """Do the row's MLflow work; the summary replaces the payload when it is marked done."""
        if row.kind == outbox.RUN_CREATED:
            return self._run_created(row)
        if row.kind == outbox.RUN_UPDATED:
            return self._run_updated(row)
        if row.kind == outbox.METRICS:
            return self._metrics(row)
        if row.kind == outbox.STUDENT:
            return self._student(row)
        raise Rejected(f"unknown outbox kind {row.kind!r}")

    def _run_created(self, row: OutboxRow) -> dict[str, Any] | None:
        ensured = self._ensure_run(row.run_id)
        if ensured is None:
            return None
        target, fresh = ensured
        if not fresh:  # a fresh MLflow run was described from the current row already
            state = {"status": row.payload.get("status", "queued"), "changed": []}
            self._describe(target.run_id, row.payload, state)
        return None

    def _run_updated(self, row: OutboxRow) -> dict[str, Any] | None:
        ensured = self._ensure_run(row.run_id)
        if ensured is None:
            return None
        target, fresh = ensured
        if not fresh:
            self._apply_state(target.run_id, row.payload)
        return None

    # ------------------------------------------------------------------ runs and experiments

    def _run_info(self, run_id: str) -> _RunInfo | None:
        with self._factory() as session:
            run = session.get(Run, run_id)
            if run is None:
                session.rollback()
                return None
            experiment = run.experiment.name
            info = _RunInfo(
                run_id=run.id,
                name=run.name,
                experiment=experiment,
                mlflow_experiment_id=run.mlflow_experiment_id,
                mlflow_run_id=run.mlflow_run_id,
                created=outbox.run_created_payload(run, experiment),
                state=outbox.run_updated_payload(
                    run.id,
                    run.status,
                    run.teacher_fingerprint,
                    run.error,
                    run.finished_at,
                    ("error",) if run.error is None else (),
                ),
                config=dict(run.config or {}),
            )
            session.rollback()
        return info

    def _experiment_id(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        from mlflow.entities import LifecycleStage
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    name,
                    artifact_location=self._artifact_location(name),
                    tags={"kdlab.experiment": name},
                )
            except MlflowException as err:  # created meanwhile by someone else
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == LifecycleStage.DELETED:
                client.restore_experiment(experiment_id)
        self._experiments[name] = experiment_id
        return experiment_id

    def _ensure_run(self, run_id: str) -> tuple[Target, bool] | None:
        """The MLflow run of `run_id` (created, or found again by its `kdlab.run_id` tag, when
        the row has none or its id is unknown to this store); True if it was just resolved,
        in which case it has been described from the run row as it is now. None if the KD Lab
        run is gone."""
        from mlflow.entities import LifecycleStage, ViewType
        from mlflow.exceptions import MlflowException

        info = self._run_info(run_id)
        if info is None:
            return None
        client = self.client
        if info.mlflow_run_id and info.mlflow_experiment_id:
            if info.mlflow_run_id in self._verified:
                return Target(info.mlflow_experiment_id, info.mlflow_run_id), False
            try:
                existing = client.get_run(info.mlflow_run_id)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            else:
                if existing.info.lifecycle_stage == LifecycleStage.DELETED:
                    client.restore_run(info.mlflow_run_id)
                self._verified.add(info.mlflow_run_id)
                return Target(info.mlflow_experiment_id, info.mlflow_run_id), False
        experiment_id = self._experiment_id(info.experiment)
        quoted = run_id.replace("\\", "\\\\").replace("'", "\\'")
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`kdlab.run_id` = '{quoted}'",
            run_view_type=ViewType.ALL,
            max_results=1,
        )
        if found:
            mlflow_run_id = found[0].info.run_id
            if found[0].info.lifecycle_stage == LifecycleStage.DELETED:
                client.restore_run(mlflow_run_id)
        else:
            created = client.create_run(
                experiment_id,
                start_time=info.created.get("start_time_ms"),
                tags={"kdlab.run_id": run_id},
                run_name=info.name,
            )
            mlflow_run_id = created.info.run_id
        self._describe(mlflow_run_id, info.created, info.state)
        with self._factory() as session:
            session.execute(
                update(RUNS)
                .where(RUNS.c.id == run_id)
                .values(
                    mlflow_experiment_id=experiment_id,
                    mlflow_run_id=mlflow_run_id,
                    updated_at=RUNS.c.updated_at,  # not a change anyone made to the run
                ),
                execution_options=_SKIP,
            )
            session.commit()
        self._verified.add(mlflow_run_id)
        return Target(experiment_id, mlflow_run_id), True

    def _describe(self, mlflow_run_id: str, created: dict[str, Any], state: dict[str, Any]) -> None:
        """Params, tags and status of a run (idempotent: params are logged with the same
        values, tags overwrite)."""
        from mlflow.entities import Param, RunTag

        params = [Param(k, str(v)) for k, v in (created.get("params") or {}).items()]
        tags = dict(created.get("tags") or {})
        tags.update(self._formula_tags(created))
        tag_list = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(params, PARAM_TAG_CHUNK):
            self.client.log_batch(mlflow_run_id, params=chunk, synchronous=True)
        for chunk in _chunks(tag_list, PARAM_TAG_CHUNK):
            self.client.log_batch(mlflow_run_id, tags=chunk, synchronous=True)
        self._apply_state(mlflow_run_id, state)

    @staticmethod
    def _formula_tags(created: dict[str, Any]) -> dict[str, str]:
        """`kd.pair.<i>.formula`: each pair loss's own description of what it computes."""
        tags: dict[str, str] = {}
        raw = created.get("tags") or {}
        index = 0
        while f"kd.pair.{index}.loss" in raw:
            try:
                from worker.kd.losses import build_loss

                params = json.loads(raw.get(f"kd.pair.{index}.params", "{}"))
                loss = build_loss(raw[f"kd.pair.{index}.loss"], params)
                tags[f"kd.pair.{index}.formula"] = outbox.truncate(
                    loss.describe(), outbox.TAG_VALUE_MAX
                )
            except Exception:  # a description is a nicety; the run mirrors without it
                pass
            index += 1
        return tags

    def _apply_state(self, mlflow_run_id: str, state: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        status = str(state.get("status") or "queued")
        tags = [RunTag("kdlab.status", status)]
        if state.get("teacher_fingerprint"):
            tags.append(RunTag("kdlab.teacher_fingerprint", str(state["teacher_fingerprint"])))
        error = state.get("error")
        if error:
            tags.append(
                RunTag("kdlab.error", outbox.truncate(str(error), outbox.TAG_VALUE_MAX, "tail"))
            )
        elif "error" in (state.get("changed") or []):
            tags.append(RunTag("kdlab.error", ""))
        self.client.log_batch(mlflow_run_id, tags=tags, synchronous=True)
        mlflow_status = STATUS_MAP.get(status, "RUNNING")
        if mlflow_status in TERMINAL:
            end = state.get("finished_at_ms") or int(time.time() * 1000)
            self.client.set_terminated(mlflow_run_id, mlflow_status, end_time=int(end))
        else:
            self.client.update_run(mlflow_run_id, status=mlflow_status)

    # ------------------------------------------------------------------ metrics

    def _latest_steps(self, mlflow_run_id: str) -> dict[str, int]:
        if mlflow_run_id not in self._latest:
            data = self.client.get_run(mlflow_run_id).data.to_proto()
            self._latest[mlflow_run_id] = {m.key: int(m.step) for m in data.metrics}
        return self._latest[mlflow_run_id]

    def _read_points(
        self, run_id: str, ranges: dict[str, list[int]]
    ) -> list[tuple[str, int, float, float]]:
        """The stored points of `run_id` inside each key's step range (one short read)."""
        items = sorted(ranges.items())
        found: list[tuple[str, int, float, float]] = []
        with self._factory() as session:
            for start in range(0, len(items), 100):
                chunk = items[start : start + 100]
                query = (
                    select(METRICS.c.key, METRICS.c.step, METRICS.c.value, METRICS.c.wall_time)
                    .where(
                        METRICS.c.run_id == run_id,
                        or_(
                            *(
                                and_(METRICS.c.key == key, METRICS.c.step.between(lo, hi))
                                for key, (lo, hi) in chunk
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

    def _metrics(self, row: OutboxRow) -> dict[str, Any] | None:
        from mlflow.entities import Metric as MlflowMetric

        raw_ranges = row.payload.get("ranges")
        try:
            assert isinstance(raw_ranges, dict)
            ranges = {str(k): [int(lo), int(hi)] for k, (lo, hi) in raw_ranges.items()}
        except (AssertionError, TypeError, ValueError) as err:
            raise Rejected(f"unreadable metrics payload: {err!r}") from err
        ensured = self._ensure_run(row.run_id)
        if ensured is None:
            return {**row.payload, "note": "run deleted"}
        target = ensured[0]
        points: dict[tuple[str, int], tuple[float, int]] = {}
        for key, step, value, wall_time in self._read_points(row.run_id, ranges):
            points[(outbox.mlflow_key(key), int(step))] = (float(value), int(wall_time * 1000))
        latest = self._latest_steps(target.run_id)
        overlapping = {key for key, step in points if step <= latest.get(key, -1)}
        have: dict[str, set[int]] = {
            key: {int(m.step) for m in self.client.get_metric_history(target.run_id, key)}
            for key in sorted(overlapping)
        }
        unsent = [
            MlflowMetric(key, value, ms, step)
            for (key, step), (value, ms) in points.items()
            if step not in have.get(key, ())
        ]
        for chunk in _chunks(unsent, METRIC_CHUNK):
            self.client.log_batch(target.run_id, metrics=chunk, synchronous=True)
            for metric in chunk:
                if metric.step > latest.get(metric.key, -1):
                    latest[metric.key] = metric.step
        return {**row.payload, "sent": len(unsent), "skipped": len(points) - len(unsent)}

    # ------------------------------------------------------------------ the exported student

    def _current_artifact(self, artifact_id: Any) -> tuple[str, str, str] | None:
        with self._factory() as session:
            artifact = session.get(Artifact, artifact_id)
            current = (artifact.kind, artifact.path, artifact.sha256) if artifact else None
            session.rollback()
        return current

    def _student(self, row: OutboxRow) -> dict[str, Any] | None:
        from backend.services import storage

        payload = row.payload
        try:
            artifact_id, path, sha256 = payload["artifact_id"], payload["path"], payload["sha256"]
        except KeyError as err:
            raise Rejected(f"student payload lacks {err}") from err
        if self._current_artifact(artifact_id) != (outbox.STUDENT_KIND, path, sha256):
            return {**payload, "note": "superseded by a later upload"}
        try:
            source = storage.inside(self.settings.artifacts_dir, path)
        except ValueError as err:
            raise Rejected(str(err)) from err
        info = self._run_info(row.run_id)
        if info is None:
            return {**payload, "note": "run deleted"}
        with tempfile.TemporaryDirectory(prefix="kdlab-mlflow-") as tmp:
            directory = Path(tmp) / STUDENT_DIR
            directory.mkdir()
            weights = directory / STUDENT_FILE
            try:
                shutil.copyfile(source, weights)
                copied = _sha256(weights)
            except FileNotFoundError:
                copied = None
            if copied != sha256:
                if self._current_artifact(artifact_id) != (outbox.STUDENT_KIND, path, sha256):
                    return {**payload, "note": "superseded by a later upload"}
                raise Rejected(
                    f"student file {source} is missing or its sha256 is {copied}, not {sha256}"
                )
            ensured = self._ensure_run(row.run_id)
            if ensured is None:
                return {**payload, "note": "run deleted"}
            target = ensured[0]
            self._write_mlmodel(directory, target.run_id, info, payload)
            self.client.log_artifacts(target.run_id, str(directory), artifact_path=STUDENT_DIR)
        from mlflow.entities import RunTag

        self.client.log_batch(
            target.run_id,
            tags=[RunTag("kdlab.student", STUDENT_DIR), RunTag("kdlab.student_sha256", sha256)],
            synchronous=True,
        )
        return {**payload, "artifact_path": STUDENT_DIR}

    def signature(self, config: dict[str, Any]) -> ModelSignature | None:
        """Input: the run dataset's DataInfo shape and dtype, batch first; output: float32 logits
        `[-1, num_classes]` (`[-1, seq_len, vocab]` for a language model). None when the config
        names no dataset (external runs) or its DataInfo cannot be had."""
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        dataset = config.get("dataset")
        if not isinstance(dataset, dict):
            return None
        try:
            from backend.services.catalog import data_info
            from backend.services.validation import data_root
            from worker.config import DatasetSpec

            spec = DatasetSpec.model_validate(dataset)
            info = data_info(spec, int(config.get("seed", 0)), data_root(self.settings))
        except Exception as err:
            log.info("MLflow mirror: no signature for dataset %r: %s", dataset.get("name"), err)
            return None
        input_dtype = np.dtype(str(info.input_dtype).removeprefix("torch."))
        if info.task == "classification":
            output_shape: tuple[int, ...] = (-1, info.num_classes)
        else:
            output_shape = (-1, *info.input_shape, info.num_classes)
        return ModelSignature(
            inputs=Schema([TensorSpec(input_dtype, (-1, *info.input_shape))]),
            outputs=Schema([TensorSpec(np.dtype("float32"), output_shape)]),
        )

    def _write_mlmodel(
        self, directory: Path, mlflow_run_id: str, info: _RunInfo, payload: dict[str, Any]
    ) -> None:
        from mlflow.models import Model

        config = info.config
        flavor = {
            "weights": STUDENT_FILE,
            "format": "safetensors (kd.save: weights + JSON metadata in the header)",
            "sha256": payload["sha256"],
            "size": payload.get("size"),
            "model": config.get("student"),
            "dataset": config.get("dataset"),
            "kdlab_run_id": info.run_id,
            "load": (
                "from worker import catalog, kd; from worker.config import ModelSpec; "
                "student = kd.restore(catalog.build_model(ModelSpec(**model), info), weights)"
            ),
        }
        model = Model(
            artifact_path=STUDENT_DIR,
            run_id=mlflow_run_id,
            flavors={"kdlab": flavor},
            signature=self.signature(config),
            metadata={"kdlab_run_id": info.run_id, "kdlab_experiment": info.experiment},
            model_size_bytes=payload.get("size"),
        )
        model.save(str(directory / "MLmodel"))


__all__ = ["STATUS_MAP", "MlflowMirror", "Rejected", "mlflow_run_url"]
