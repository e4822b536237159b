"""`RayExecutor`: each run attempt is one Ray job (the Ray Jobs API over the dashboard's HTTP).

Ray schedules the job's entrypoint (`python -m kdlab.worker.run ...`) onto a node with the GPUs it asks
for (`entrypoint_num_gpus`) and sets `CUDA_VISIBLE_DEVICES` there; the worker reports to the
backend over HTTP exactly as under the local executor. Ray is optional: `pip install kdlab[ray]`.

- A job waiting in Ray's queue for its resources (`PENDING`) is reported `pending`, not
  `running`: it sends no heartbeat yet, and the supervisor's lease starts once it runs.
- Workers run on other machines: the server's data dir is not theirs (`shared_work_dir` is
  False), so a job gets no `--work-dir` and no `KDLAB_DATA_DIR` from the server; the worker uses
  its node's own (`KDLAB_DATA_DIR` in the Ray node's environment, else `~/.kdlab`). The run token
  travels in the job's environment (`KDLAB_RUN_TOKEN`), which Ray's dashboard shows.
- Cancel is `stop_job`: Ray sends SIGTERM to the entrypoint (the worker saves `latest` and
  exits), then SIGKILL after `RAY_JOB_STOP_WAIT_TIME_S`, which each job carries in its
  environment (set from `stop_grace_seconds`), so Ray itself enforces the grace period on
  whichever node runs the job. `cancel` returns at once unless asked to wait.
- `known` = the jobs this process submitted or adopted, plus the `kdlab-` jobs `list_jobs()`
  shows not yet finished and submitted for this server (`owner`, stored in the job's metadata),
  so a restarted backend finds the jobs its predecessor left running.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from typing import TYPE_CHECKING, Any

from kdlab.backend.executors.base import Executor, Launch, ProcessStatus, describe_exit

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

INSTALL_HINT = "the Ray executor needs Ray's job client: pip install kdlab[ray]"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PREFIX = "kdlab-"
OWNER_KEY = "kdlab_owner"  # job metadata: which server (database) the job reports to
# a job that ended this way lost its worker to the cluster (a node went away), or was stopped from
# outside: the run may resume elsewhere. Any other failure without an exit code is final.
LOST_ERRORS = ("JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE")
# Ray owns GPU assignment on its nodes; a value from the submitting machine would be wrong there
RAY_OWNED_ENV = ("CUDA_VISIBLE_DEVICES",)
POLL_SECONDS = 0.2


def _job_client_class() -> type[JobSubmissionClient]:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as err:  # ray missing, or installed without the `default` extra
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return JobSubmissionClient


def submission_id(run_id: str, attempt: int) -> str:
    """The Ray job id of one attempt of a run (stable, so a retried submit finds its job)."""
    return f"{PREFIX}{run_id}-{attempt}"


def parse_submission_id(executor_id: str) -> tuple[str, int]:
    """(run id, attempt) from `kdlab-<run id>-<attempt>`; ValueError for another job's id."""
    prefix, _, rest = executor_id.partition("-")
    run_id, _, attempt = rest.rpartition("-")
    if prefix != "kdlab" or not run_id or not attempt.isdigit():
        raise ValueError(f"{executor_id!r} is not a KD Lab Ray job id (kdlab-<run>-<attempt>)")
    return run_id, int(attempt)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


class RayExecutor(Executor):
    name = "ray"

    def __init__(
        self,
        address: str,
        dashboard_url: str | None = None,
        *,
        stop_grace_seconds: float = 30.0,
        entrypoint_num_cpus: float = 1,
        owner: str | None = None,
        list_interval_seconds: float = 10.0,
    ) -> None:
        """`address`: the Ray dashboard / Jobs API, e.g. http://ray-head:8265.
        `dashboard_url`: where a browser reaches the dashboard (default: `address`).
        `owner`: names this server in each job's metadata; `known` lists only its jobs (None:
        every `kdlab-` job). `list_interval_seconds`: how often `known` asks Ray for its jobs."""
        _job_client_class()  # fail now, with the install hint, when Ray is missing
        self.address = address.rstrip("/")
        self.dashboard_url = (dashboard_url or address).rstrip("/")
        self.stop_grace_seconds = stop_grace_seconds
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self.owner = owner
        self.list_interval_seconds = list_interval_seconds
        self._client: JobSubmissionClient | None = None
        self._lock = threading.Lock()
        self._jobs: set[str] = set()  # submitted or adopted by this process, not yet forgotten
        self._listed: set[str] = set()  # unfinished jobs of this server, as last listed
        self._listed_at = -float("inf")
        self._stop_sent: dict[str, float] = {}  # job id → when stop_job was last sent

    @property
    def client(self) -> JobSubmissionClient:
        """Connected on first use (the constructor checks the cluster's version over HTTP), so
        the backend starts even while the Ray head is still coming up."""
        with self._lock:
            if self._client is None:
                self._client = _job_client_class()(self.address)
            return self._client

    # --- scheduling: Ray's, not ours ---------------------------------------------------------------

    def has_slot(self, gpus: int) -> bool:
        """Always: a job waits in Ray's queue (PENDING, reported as `pending`) until a node has
        its GPUs."""
        return True

    def fits(self, gpus: int) -> bool:
        """Always: the cluster may grow (a GPU worker joins later); Ray fails a job that stays
        PENDING past its start timeout (RAY_JOB_START_TIMEOUT_SECONDS, 15 min by default)."""
        return True

    # --- Executor --------------------------------------------------------------------------------

    def submit(self, launch: Launch) -> str:
        job_id = submission_id(launch.run_id, launch.attempt)
        env = {k: v for k, v in launch.env.items() if k not in RAY_OWNED_ENV}
        env.setdefault("PYTHONUNBUFFERED", "1")  # logs reach Ray's log file as they are written
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, round(self.stop_grace_seconds)))
        options: dict[str, Any] = {
            "entrypoint": shlex.join(launch.command),  # Ray runs the entrypoint through a shell
            "submission_id": job_id,
            "entrypoint_num_cpus": self.entrypoint_num_cpus,
            "runtime_env": {"env_vars": env},
            "metadata": {"kdlab_run_id": launch.run_id, "kdlab_attempt": str(launch.attempt)},
        }
        if self.owner:
            options["metadata"][OWNER_KEY] = self.owner
        if launch.gpus > 0:
            options["entrypoint_num_gpus"] = launch.gpus
        try:
            submitted = str(self.client.submit_job(**options))
        except RuntimeError as err:
            # a submit retried after a lost answer: the job is already there, and it is ours
            if "already exists" in str(err) and self._exists(job_id):
                log.info("ray job %s was already submitted", job_id)
                submitted = job_id
            else:
                raise
        with self._lock:
            self._jobs.add(submitted)
        return submitted

    def cancel(self, executor_id: str, grace_seconds: float, *, wait: bool = False) -> None:
        """`stop_job`: Ray sends SIGTERM, and SIGKILL after the job's `RAY_JOB_STOP_WAIT_TIME_S`
        (`stop_grace_seconds` when it was submitted; Ray cannot shorten it per call, so
        `grace_seconds` only bounds the wait). Sent once per grace period, however often this is
        called. `wait`: return only when Ray reports the job ended (at most the grace period plus
        a few seconds)."""
        grace = max(grace_seconds, self.stop_grace_seconds)
        now = time.monotonic()
        with self._lock:
            sent = self._stop_sent.get(executor_id)
            resend = sent is None or now - sent > grace + 5
            if resend:
                self._stop_sent[executor_id] = now
        if resend:
            try:
                self.client.stop_job(executor_id)
            except RuntimeError as err:
                if self._not_found(err):
                    return
                with self._lock:
                    self._stop_sent.pop(executor_id, None)
                raise
        if not wait:
            return
        deadline = now + grace + 5
        while time.monotonic() < deadline:
            if not self.status(executor_id).alive:
                return
            time.sleep(POLL_SECONDS)
        log.warning("ray job %s still running %.0f s after stop_job", executor_id, grace_seconds)

    def status(self, executor_id: str) -> ProcessStatus:
        try:
            info = self.client.get_job_info(executor_id)
        except RuntimeError as err:
            if self._not_found(err):
                return ProcessStatus("unknown", detail=f"ray job {executor_id} not found")
            raise
        state = _status_name(info.status)
        message = (info.message or "").split("\n", 1)[0].strip()  # FAILED appends the log tail
        if state in ("PENDING", "RUNNING"):
            detail = f"ray job {state.lower()}: {message}".strip().rstrip(":")
            return ProcessStatus("pending" if state == "PENDING" else "running", detail=detail)
        if state == "SUCCEEDED":
            return ProcessStatus("exited", exit_code=0)
        code = getattr(info, "driver_exit_code", None)
        error_type = _status_name(getattr(info, "error_type", None) or "")
        exit_code: int | None
        if isinstance(code, int) and code != 0:
            exit_code = code  # the entrypoint's own exit (negative: killed by that signal)
        elif state == "STOPPED" or error_type.upper() in LOST_ERRORS:
            exit_code = None  # stopped from outside, or its node went away: a lost worker
        else:
            exit_code = 1  # Ray could not start it (start timeout, runtime env, ...): final
        detail = f"ray job {state.lower()}"
        if error_type:
            detail += f" ({error_type.lower()})"
        if message:
            detail += f": {message}"
        return ProcessStatus("exited", exit_code=exit_code, detail=detail)

    def logs(self, executor_id: str, tail: int = 200) -> list[str]:
        try:
            text = self.client.get_job_logs(executor_id)
        except RuntimeError as err:
            if self._not_found(err):
                return []
            raise
        lines = text.splitlines()
        return lines[-tail:] if tail > 0 else []

    def describe(self, status: ProcessStatus) -> str:
        """The exit in words, with Ray's reason when the exit code does not tell it, e.g.
        "exit code unknown (ray job stopped)"."""
        how = describe_exit(status.exit_code)
        if status.detail and "exit code" not in status.detail:
            how += f" ({status.detail})"
        return how

    # --- identity and bookkeeping ----------------------------------------------------------------

    def run_of(self, executor_id: str) -> tuple[str, int]:
        return parse_submission_id(executor_id)

    def summary(self) -> str:
        return f"Ray jobs at {self.address}"

    def known(self) -> list[str]:
        """Jobs submitted or adopted here and not forgotten, plus this server's unfinished
        `kdlab-` jobs in `list_jobs()` (asked at most every `list_interval_seconds`; when Ray
        does not answer, the last list)."""
        self._refresh_listing()
        with self._lock:
            return sorted(self._jobs | self._listed)

    def tracked(self) -> list[str]:
        """The jobs submitted or adopted here that Ray does not report ended (asks Ray)."""
        with self._lock:
            jobs = sorted(self._jobs)
        alive = []
        for job_id in jobs:
            try:
                if not self.status(job_id).alive:
                    continue
            except Exception:  # Ray does not answer: it may still run
                pass
            alive.append(job_id)
        return alive

    def adopt(self, executor_id: str) -> bool:
        """Watch a job an earlier server submitted; False when it is not a KD Lab job id."""
        if not self.owns(executor_id):
            return False
        with self._lock:
            self._jobs.add(executor_id)
        return True

    def forget(self, executor_id: str) -> None:
        with self._lock:
            self._jobs.discard(executor_id)
            self._listed.discard(executor_id)
            self._stop_sent.pop(executor_id, None)

    def _refresh_listing(self) -> None:
        with self._lock:
            if time.monotonic() - self._listed_at < self.list_interval_seconds:
                return
            self._listed_at = time.monotonic()
        try:
            jobs = self.client.list_jobs()
        except Exception as err:  # Ray down or restarting: keep the last list
            log.warning("could not list the Ray jobs at %s: %s", self.address, err)
            return
        listed = set()
        for job in jobs:
            job_id = job.submission_id
            if not job_id or _status_name(job.status) in TERMINAL or not self.owns(job_id):
                continue
            if self.owner and (job.metadata or {}).get(OWNER_KEY) != self.owner:
                continue
            listed.add(job_id)
        with self._lock:
            self._listed = listed

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _not_found(err: RuntimeError) -> bool:
        return "status code 404" in str(err) or "does not exist" in str(err)

    def _exists(self, job_id: str) -> bool:
        try:
            self.client.get_job_info(job_id)
        except RuntimeError:
            return False
        return True
