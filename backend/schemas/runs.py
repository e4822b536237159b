"""Request and response bodies of `/api/runs`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdlab.worker.config import ExperimentName, JsonObject, RunName
from kdlab.worker.names import ACTIVE_STATUSES, FINISHED_STATUSES, RunStatus

# the service's names for the statuses, kept as aliases of their one home (worker/names.py)
FINISHED = FINISHED_STATUSES
ACTIVE = ACTIVE_STATUSES


class RunOut(BaseModel):
    """A run as the API shows it (timestamps are UTC, ISO 8601)."""

    id: str
    name: str
    experiment: str = Field(description="Name of the experiment the run belongs to.")
    kind: Literal["distill", "train", "external"]
    status: RunStatus
    attempt: int = Field(description="Worker attempts so far (a lost worker's run is retried).")
    config: dict[str, Any] = Field(
        description="The resolved RunConfig (defaults filled in); for an external run, "
        "its name, experiment and free-form params."
    )
    error: str | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    teacher_run_id: str | None = Field(description="The run whose weights the teacher uses.")
    cloned_from: str | None
    mlflow_run_id: str | None
    mlflow_experiment_id: str | None = None


class ExternalRunCreated(RunOut):
    """An external run just registered: carries its run-scoped token, shown only this once."""

    token: str = Field(
        description="Bearer token scoped to this run (metrics, logs, artifacts); keep it, "
        "it is not shown again."
    )


class ExternalRunCreate(BaseModel):
    """Registers a run trained elsewhere; no executor starts it (`POST /api/runs`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["external"]
    name: RunName
    experiment: ExperimentName = "default"
    params: JsonObject = Field(
        default={},
        description="Free-form parameters to record (finite numbers, at most 32 levels deep).",
    )


class RunList(BaseModel):
    runs: list[RunOut]
    total: int = Field(description="Runs matching the filters (before limit/offset).")


class CloneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: RunName | None = Field(
        default=None, description="Name of the new run; default: the source run's name."
    )


class LogLines(BaseModel):
    lines: list[str] = Field(description="Log lines, oldest first.")


class LogAppend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lines: list[str] = Field(max_length=10_000, description="Lines to append, oldest first.")
    kind: Literal["log", "error"] = Field(default="log", description="error marks error output.")


class LogAccepted(BaseModel):
    accepted: int


class PairReport(BaseModel):
    """One distillation pair as the probe saw it (batch size 2)."""

    student_layer: str
    teacher_layer: str
    student_shape: list[int] | None = Field(description="None when the output is not a tensor.")
    teacher_shape: list[int] | None
    adapter: str | None = Field(
        description="Learned projection the loss adds, e.g. 'Linear(16→64)'; None when the "
        "shapes already match."
    )
    formula: str = Field(
        default="", description="The loss term as it will be computed (adapter included)."
    )


class MemoryEstimate(BaseModel):
    """Bytes per GPU for one training step (see `kdlab.backend.services.validation.estimate_memory`)."""

    per_gpu_bytes: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    teacher: int


class ValidationReport(BaseModel):
    valid: Literal[True] = True
    config: dict[str, Any] = Field(description="The resolved config, defaults filled in.")
    pairs: list[PairReport]
    memory: MemoryEstimate
    loss_formula: str = Field(
        default="",
        description="The total loss the run will optimise, as the trainer will log it.",
    )


# --------------------------------------------------------------------------- worker routes

WorkerStatus = Literal["running", "succeeded", "failed", "cancelled"]


class StatusReport(BaseModel):
    """`POST /api/runs/{id}/status`: a state change the run's worker owns."""

    model_config = ConfigDict(extra="forbid")

    status: WorkerStatus = Field(
        description="running (training started), or the outcome: succeeded, failed, cancelled."
    )
    error: str | None = Field(
        default=None,
        max_length=100_000,
        description="Why the run failed: the message and the last traceback lines.",
    )
    teacher_fingerprint: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 fingerprint of the teacher weights the worker loaded (kd.fingerprint).",
    )


class HeartbeatOut(BaseModel):
    """`POST /api/runs/{id}/heartbeat`: what the worker should know about its run."""

    cancel_requested: bool = Field(description="True: checkpoint, stop and report cancelled.")
    status: RunStatus
