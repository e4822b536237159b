"""`RayExecutor`: each run attempt is one Ray job (the Ray Jobs API over the dashboard's HTTP).

Ray schedules the job's entrypoint (`python -m worker.run ...`) onto a node with the GPUs it asks
for (`entrypoint_num_gpus`) and sets `CUDA_VISIBLE_DEVICES` there; the worker reports to the
backend over HTTP exactly as under the local executor. Ray is optional: `pip install kdlab[ray]`.

Cancel is `stop_job`: Ray sends SIGTERM to the entrypoint (the worker saves `latest` and exits),
then SIGKILL after `RAY_JOB_STOP_WAIT_TIME_S`, which each job carries in its environment (set from
`stop_grace_seconds`), so Ray itself enforces the grace period on whichever node runs the job.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from typing import TYPE_CHECKING, Any

from backend.executors.base import Executor, Launch, ProcessStatus

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

INSTALL_HINT = "the Ray executor needs Ray's job client: pip install kdlab[ray]"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
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
    return f"kdlab-{run_id}-{attempt}"


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
    ) -> None:
        """`address`: the Ray dashboard / Jobs API, e.g. http://ray-head:8265.
        `dashboard_url`: where a browser reaches the dashboard (default: `address`)."""
        _job_client_class()  # fail now, with the install hint, when Ray is missing
        self.address = address.rstrip("/")
        self.dashboard_url = (dashboard_url or address).rstrip("/")
        self.stop_grace_seconds = stop_grace_seconds
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self._client: JobSubmissionClient | None = None
        self._lock = threading.Lock()

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
        """Always: a job waits in Ray's queue (PENDING, reported as `running` with the detail
        "ray job pending") until a node has its GPUs."""
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
        if launch.gpus > 0:
            options["entrypoint_num_gpus"] = launch.gpus
        try:
            return str(self.client.submit_job(**options))
        except RuntimeError as err:
            # a submit retried after a lost answer: the job is already there, and it is ours
            if "already exists" in str(err) and self._exists(job_id):
                log.info("ray job %s was already submitted", job_id)
                return job_id
            raise

    def cancel(self, executor_id: str, grace_seconds: float) -> None:
        """Stop the job and wait until Ray reports it ended (Ray SIGKILLs it after the job's
        `RAY_JOB_STOP_WAIT_TIME_S`), at most the grace period plus a few seconds."""
        try:
            self.client.stop_job(executor_id)
        except RuntimeError as err:
            if self._not_found(err):
                return
            raise
        deadline = time.monotonic() + max(grace_seconds, self.stop_grace_seconds) + 5
        while time.monotonic() < deadline:
            if self.status(executor_id).state != "running":
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
            return ProcessStatus("running", detail=f"ray job {state.lower()}: {message}".strip())
        if state == "SUCCEEDED":
            return ProcessStatus("exited", exit_code=0)
        code = getattr(info, "driver_exit_code", None)
        exit_code = code if isinstance(code, int) and code != 0 else 1
        error_type = getattr(info, "error_type", None)
        detail = f"ray job {state.lower()}"
        if error_type:
            detail += f" ({_status_name(error_type).lower()})"
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
