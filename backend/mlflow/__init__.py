"""The MLflow mirror: drains `mlflow_outbox` into an MLflow tracking server (DESIGN §5).

The server runs the mirror in its own process (`kdlab.backend.mlflow.process`, started and stopped
by the server by its PID, at a lower priority; `KDLAB_MLFLOW_MIRROR=thread` keeps it in the API
process): `MlflowMirror.serve()` there, or `MlflowMirror(settings, session_factory).start()`, a
daemon thread, call `drain_once()` every `interval` seconds. Nothing in the app waits on MLflow:
requests only write outbox rows (`kdlab.backend.mlflow.hooks`, on the app's sessionmaker), in
their own transactions. The process reads without SQLite's write lock, and waits while a bulk
ingest is under way (more than 10,000 points queued in the last second; at most 30 s at a time,
then it works as long), so a fast client's requests have the CPU and the database to themselves.

One job per module:

- `format`: a run as MLflow params, tags and names; the outbox payloads;
- `hooks`: the outbox hooks on the app's sessionmaker, `enqueue`, `enqueue_metrics`;
- `drain`: `MlflowMirror`, the drain loop with its lock, retries and back-off;
- `process`: the mirror as the server's child process (`start_mirror`, `MirrorProcess`);
- `writers`: one writer per outbox kind (`run_created`, `run_updated`, `metrics`, `student`);
- `store`: MLflow experiments and runs of KD Lab runs, their params, tags and status;
- `dedup`: a (metric key, step) reaches MLflow once;
- `model`: the exported student as an MLflow model directory;
- `rows`: an outbox row as read, `Rejected`.

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
  `kd.pair.<i>.formula` — the loss's own `describe()`, as the trainer logged it in the run's
  metadata: a run has no formula tags until then, and gets them with the first status change
  mirrored after it, at the latest with its terminal status), `kdlab.student_sha256`. The
  `kd.t2_convention` comes from each loss class's own `t2_scaling`.
- status: queued → SCHEDULED, starting/running → RUNNING, succeeded → FINISHED, failed → FAILED,
  cancelled → KILLED (terminal ones with `set_terminated`, end time = the run's `finished_at`).
- metrics: `log_batch` in chunks of ≤ 1,000, timestamp = the point's wall time in ms, step =
  the point's step. MLflow refuses `~` in names, so `train/kd/fc~fc` is logged as
  `train/kd/fc-to-fc` (`kdlab.backend.mlflow.format.mlflow_key`).
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
Rows are processed in id order; consecutive metrics rows (up to 50,000 points) are drained
together, per run one read of the union of their step ranges, logged 1,000 points a call and
marked done in one transaction once MLflow took them all (on an error, the first is retried alone). The first MLflow error stops the round: that row's `attempts`
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

from kdlab.backend.mlflow.drain import MlflowMirror
from kdlab.backend.mlflow.format import STATUS_MAP
from kdlab.backend.mlflow.rows import Rejected
from kdlab.backend.mlflow.store import mlflow_run_url

__all__ = ["STATUS_MAP", "MlflowMirror", "Rejected", "mlflow_run_url"]
