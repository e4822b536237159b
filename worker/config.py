"""The run config (DESIGN §2): one versioned pydantic model shared by form, API, DB and worker.

`RunConfig.model_json_schema()` drives the launch form, so every field has a description and a
sensible default. Unknown keys are errors everywhere (`extra="forbid"`) so a typo never passes
silently. Catalog names (datasets, models) and loss names are checked against the live registries,
with close matches suggested.

It re-exports the distillation specs (their home is `kdlab.worker.distill_config`) and the small
validation helpers the catalog shares (`error_lines`, `Params`, `unknown_name`, `JsonObject`;
their home is the leaf module `kdlab.worker.params`), so `from kdlab.worker.config import X` keeps working.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from kdlab.worker.distill_config import (
    MAX_PAIRS,
    AdapterSpec,
    BalancerSpec,
    DistillSpec,
    LossSpec,
    PairSpec,
    balancer_params_schema,
)
from kdlab.worker.params import (
    MAX_PARAMS_DEPTH,
    MAX_PARAMS_INT,
    JsonObject,
    Params,
    check_json_object,
    error_lines,
    params_field,
    unknown_name,
)
from kdlab.worker.params import StrictModel as _Strict

__all__ = [
    "MAX_PAIRS",
    "MAX_PARAMS_DEPTH",
    "MAX_PARAMS_INT",
    "AdapterSpec",
    "BalancerSpec",
    "DatasetSpec",
    "DistillSpec",
    "ExperimentName",
    "JsonObject",
    "LossSpec",
    "ModelSpec",
    "OptimizerSpec",
    "PairSpec",
    "Params",
    "ResourcesSpec",
    "RunConfig",
    "RunName",
    "SchedulerSpec",
    "TeacherSpec",
    "TeacherWeights",
    "TrainSpec",
    "balancer_params_schema",
    "check_json_object",
    "error_lines",
    "load_run_config",
    "params_field",
    "run_config_json_schema",
    "unknown_name",
]

# --------------------------------------------------------------------------- bounds

# Every number of a config is finite (`allow_inf_nan=False` on every model below, and
# `check_json_object` for free-form params) and bounded: an absurd value is a 422 at submit,
# never a failure later in the worker. Each bound lives here, next to the fields using it.
SEED_LIMIT = 2**32  # seeds are < 2**32: sklearn's random_state (the split) takes [0, 2**32 - 1]
MAX_STEPS = 2**62  # step counts; metrics.step is a BIGINT (< 2**63)
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_GPUS = 64  # GPUs one run holds (one machine)


# --------------------------------------------------------------------------- dataset and models


def _check_catalog_params(
    group: Literal["models", "datasets"], params: dict[str, Any], info: ValidationInfo
) -> None:
    """Validate `params` against the typed params of catalog entry `info.data["name"]`.

    Errors surface at `<spec>.params.<param>` because pydantic nests a ValidationError raised here.
    """
    name = info.data.get("name")
    if name is None:  # the name itself was invalid; that error is enough
        return
    from kdlab.worker import catalog

    model = catalog.params_model(group, name)
    if model is not None:
        model.model_validate(params)


class DatasetSpec(_Strict):
    """A dataset from the catalog and how to split it."""

    name: str = Field(description="Catalog dataset name (see `GET /api/catalog`).")
    params: JsonObject = params_field("dataset")
    val_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of the data held out for validation."
    )

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from kdlab.worker import catalog

        if name not in catalog.list_datasets():
            raise ValueError(unknown_name("dataset", name, catalog.list_datasets()))
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        _check_catalog_params("datasets", params, info)
        return params


class ModelSpec(_Strict):
    """A model architecture from the catalog."""

    name: str = Field(description="Catalog model name (see `GET /api/catalog`).")
    params: JsonObject = params_field("model")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from kdlab.worker import catalog

        if name not in catalog.list_models():
            raise ValueError(unknown_name("model", name, catalog.list_models()))
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        _check_catalog_params("models", params, info)
        return params


_Id = Annotated[str, Field(min_length=1, max_length=200)]


class TeacherWeights(_Strict):
    """Where the teacher's trained weights come from: exactly one of run_id, upload_id, path."""

    run_id: _Id | None = Field(default=None, description="A finished run whose weights to use.")
    upload_id: _Id | None = Field(default=None, description="An uploaded weights file.")
    path: _Id | None = Field(
        default=None,
        description="A local weights file, for the `kdlab train` CLI only; the server refuses it.",
    )
    checkpoint: Literal["best", "latest"] = Field(
        default="best", description="Which checkpoint of `run_id` to load."
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Self:
        given = [k for k in ("run_id", "upload_id", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of run_id, upload_id, path (got {given or 'none'})")
        return self


class TeacherSpec(ModelSpec):
    """The teacher: a catalog model plus the weights to load into it."""

    weights: TeacherWeights | None = Field(
        default=None,
        description="Trained weights; none means a randomly initialised teacher "
        "(refused at run time unless `distill.allow_weak_teacher`).",
    )


# --------------------------------------------------------------------------- training


class OptimizerSpec(_Strict):
    """Optimizer of the trained model (the student, in a distill run)."""

    name: Literal["adamw", "adam", "sgd"] = Field(default="adamw", description="Optimizer.")
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Weight decay.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="Momentum (sgd only).")


class SchedulerSpec(_Strict):
    """Learning-rate schedule, stepped once per optimizer step."""

    name: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Decay after warm-up."
    )
    warmup_steps: int = Field(
        default=0, ge=0, le=MAX_STEPS, description="Linear warm-up steps from 0 to lr."
    )


class TrainSpec(_Strict):
    """The training loop."""

    epochs: int = Field(
        default=10, ge=1, le=MAX_EPOCHS, description="Passes over the training split."
    )
    batch_size: int = Field(
        default=64, ge=1, le=MAX_BATCH_SIZE, description="Examples per optimizer step."
    )
    optimizer: OptimizerSpec = Field(default=OptimizerSpec(), description="Optimizer.")
    scheduler: SchedulerSpec = Field(default=SchedulerSpec(), description="LR schedule.")
    amp: Literal["none", "bf16", "fp16"] = Field(
        default="none", description="Mixed precision (bf16/fp16 autocast on GPU)."
    )
    grad_clip: float | None = Field(
        default=None, gt=0, description="Clip the gradient norm to this value; null = off."
    )
    ema_decay: float | None = Field(
        default=None, gt=0, lt=1, description="Keep an EMA of the student weights; null = off."
    )
    log_every: int = Field(
        default=10, ge=1, le=MAX_STEPS, description="Log train metrics every N steps."
    )
    eval_every_epochs: int = Field(
        default=1, ge=1, le=MAX_EPOCHS, description="Evaluate every N epochs."
    )
    best_metric: str = Field(
        default="eval/student_acc",
        min_length=1,
        description="Metric that picks the `best` checkpoint.",
    )
    student_loss: Literal["cross_entropy", "none"] = Field(
        default="cross_entropy",
        description="Supervised loss on labels; none = pure KD (distill runs only).",
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=MAX_STEPS,
        description="Stop after this many steps; null = run all epochs.",
    )
    tf32: bool = Field(
        default=True,
        description="On GPU, fp32 matmuls use TF32 tensor cores (Ampere and newer; about 10 "
        "mantissa bits); false = full fp32.",
    )
    deterministic: bool = Field(
        default=False,
        description="Deterministic kernels (cuDNN, cuBLAS, scatter): a resumed run on GPU "
        "repeats the uninterrupted one bit for bit, at some speed; an op with no "
        "deterministic kernel then fails naming itself.",
    )


class ResourcesSpec(_Strict):
    """What the run needs from the machine."""

    gpus: int = Field(default=0, ge=0, le=MAX_GPUS, description="GPUs to hold; 0 runs on CPU.")


# --------------------------------------------------------------------------- the run


# The one rule for run and experiment names: what a URL, a file name and a page show safely.
NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
NAME_MAX_LENGTH = 100


def _name(description: str) -> Any:
    return Field(
        min_length=1,
        max_length=NAME_MAX_LENGTH,
        pattern=NAME_PATTERN,
        description=f"{description}: letters, digits, '.', '_' and '-' (at most "
        f"{NAME_MAX_LENGTH}).",
    )


RunName = Annotated[str, _name("Run name")]
ExperimentName = Annotated[str, _name("Experiment it belongs to")]


class RunConfig(_Strict):
    """One run: `kind: distill` (teacher → student) or `kind: train` (one model, supervised)."""

    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    name: RunName
    experiment: ExperimentName = "default"
    kind: Literal["distill", "train"] = Field(
        description="distill: teacher → student; train: one model on the labels."
    )
    seed: int = Field(
        default=0,
        ge=0,
        lt=SEED_LIMIT,
        description="Seed for initialisation, data split and order (0 ≤ seed < 2**32).",
    )
    dataset: DatasetSpec = Field(description="Training data.")
    student: ModelSpec = Field(description="The model trained (in a train run: the only model).")
    teacher: TeacherSpec | None = Field(
        default=None, validate_default=True, description="Teacher (distill runs only)."
    )
    distill: DistillSpec | None = Field(
        default=None, validate_default=True, description="Distillation setup (distill runs only)."
    )
    train: TrainSpec = Field(default=TrainSpec(), description="Training loop.")
    resources: ResourcesSpec = Field(default=ResourcesSpec(), description="Resources.")

    @field_validator("teacher", "distill")
    @classmethod
    def _matches_kind(cls, value: BaseModel | None, info: ValidationInfo) -> BaseModel | None:
        kind = info.data.get("kind")
        if kind == "train" and value is not None:
            raise ValueError(
                f"a train run has no {info.field_name}; remove it or use kind: distill"
            )
        if kind == "distill" and value is None:
            raise ValueError(f"a distill run needs {info.field_name}")
        return value

    @field_validator("train")
    @classmethod
    def _student_loss_for_kind(cls, train: TrainSpec, info: ValidationInfo) -> TrainSpec:
        if info.data.get("kind") == "train" and train.student_loss == "none":
            raise ValueError("student_loss: a train run needs a supervised loss")
        return train


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run config from YAML or JSON; ValueError lists each error with its JSON path."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid run config\n" + "\n".join(error_lines(err))) from None


def run_config_json_schema() -> dict[str, Any]:
    """The JSON Schema of `RunConfig` (served at `GET /api/catalog` for the launch form)."""
    return RunConfig.model_json_schema()
