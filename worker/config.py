"""The run config (DESIGN §2): one versioned pydantic model shared by form, API, DB and worker.

`RunConfig.model_json_schema()` drives the launch form, so every field has a description and a
sensible default. Unknown keys are errors everywhere (`extra="forbid"`) so a typo never passes
silently. Catalog names (datasets, models) and loss names are checked against the live registries,
with close matches suggested.

It re-exports the small validation helpers the catalog shares (`error_lines`, `Params`,
`unknown_name`); their home is the leaf module `worker.params`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from typing_extensions import Self

from worker.params import Params, error_lines, unknown_name
from worker.params import StrictModel as _Strict

__all__ = [
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
MAX_PAIRS = 128  # distillation layer pairs of one run
MAX_PARAMS_DEPTH = 32  # nesting of lists/objects in free-form params
MAX_PARAMS_INT = 2**63  # integers in free-form params fit a signed 64-bit integer


def _json_errors(value: Any, loc: tuple[str | int, ...], depth: int) -> Iterable[InitErrorDetails]:
    if isinstance(value, float):
        if not math.isfinite(value):
            yield InitErrorDetails(type="finite_number", loc=loc, input=value)
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -MAX_PARAMS_INT <= value < MAX_PARAMS_INT:
            yield InitErrorDetails(
                type=PydanticCustomError(
                    "int_too_large", "integers must be within ±2**63 (a signed 64-bit integer)"
                ),
                loc=loc,
                input=value,
            )
    elif isinstance(value, (dict, list)):
        if depth > MAX_PARAMS_DEPTH:
            yield InitErrorDetails(
                type=PydanticCustomError(
                    "too_deep",
                    "nested more than {limit} levels deep",
                    {"limit": MAX_PARAMS_DEPTH},
                ),
                loc=loc,
                input="...",
            )
            return
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            yield from _json_errors(item, (*loc, key), depth + 1)


def check_json_object(value: dict[str, Any]) -> dict[str, Any]:
    """Free-form params: every number finite and within 64 bits, at most MAX_PARAMS_DEPTH
    levels of nesting; a ValidationError naming the path of each bad value otherwise."""
    errors = list(_json_errors(value, (), 1))
    if errors:
        raise ValidationError.from_exception_data("params", errors)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_object)]


def _params_field(what: str) -> Any:
    return Field(
        default={},
        validate_default=True,
        description=f"Keyword parameters of the {what} (see its catalog entry).",
    )


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
    from worker import catalog

    model = catalog.params_model(group, name)
    if model is not None:
        model.model_validate(params)


class DatasetSpec(_Strict):
    """A dataset from the catalog and how to split it."""

    name: str = Field(description="Catalog dataset name (see `GET /api/catalog`).")
    params: JsonObject = _params_field("dataset")
    val_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of the data held out for validation."
    )

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from worker import catalog

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
    params: JsonObject = _params_field("model")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from worker import catalog

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


# --------------------------------------------------------------------------- distillation


class LossSpec(_Strict):
    """A KD loss from `worker.kd.losses.LOSSES`."""

    name: str = Field(default="logits_kl", description="KD loss name, e.g. logits_kl, feature_mse.")
    params: JsonObject = _params_field("loss")

    @field_validator("name")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        from worker.kd.losses import LOSSES

        if name not in LOSSES:
            raise ValueError(unknown_name("loss", name, LOSSES))
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is not None:
            from worker.kd.losses import build_loss

            build_loss(name, params)  # ValueError naming a bad param
        return params


class PairSpec(_Strict):
    """One student layer ↔ teacher layer pair and the loss between their outputs."""

    student_layer: str = Field(
        default="", description="Student module name from named_modules(); empty = model output."
    )
    teacher_layer: str = Field(
        default="", description="Teacher module name from named_modules(); empty = model output."
    )
    loss: LossSpec = Field(
        default=LossSpec.model_construct(name="logits_kl", params={}),
        description="Loss between the two outputs.",
    )


class _StaticBalancerParams(Params):
    kd_weight: float | list[float] = Field(
        default=0.5, description="One weight in [0, 1], or one per pair summing to at most 1."
    )

    @field_validator("kd_weight")
    @classmethod
    def _valid_weights(cls, weight: float | list[float]) -> float | list[float]:
        weights = weight if isinstance(weight, list) else [weight]
        if not weights or any(not 0 <= w <= 1 for w in weights):
            raise ValueError(f"weights must be in [0, 1] (and at least one), got {weight}")
        if sum(weights) > 1 + 1e-9:
            raise ValueError(
                f"weights must sum to at most 1, got {weight} (sum {sum(weights):.4g})"
            )
        return weight


class _DynamicBalancerParams(_StaticBalancerParams):
    eps: float = Field(default=1e-12, gt=0, description="Guards the rescaling against 0.")


_BALANCER_PARAMS: dict[str, type[Params]] = {
    "static": _StaticBalancerParams,
    "dynamic": _DynamicBalancerParams,
}


def balancer_params_schema(name: str) -> dict[str, Any]:
    """JSON Schema of a balancer's params (`static` | `dynamic`), for the launch form."""
    return _BALANCER_PARAMS[name].model_json_schema()


class BalancerSpec(_Strict):
    """How the student loss and the KD terms combine into one scalar."""

    name: Literal["static", "dynamic"] = Field(
        default="static",
        description="static: (1−Σw)·student + Σ wᵢ·kdᵢ; dynamic: KD terms rescaled to the "
        "student loss magnitude first.",
    )
    params: JsonObject = Field(
        default={"kd_weight": 0.5},
        validate_default=True,
        description="kd_weight: a float in [0, 1], or one weight per pair summing to at most 1; "
        "dynamic also takes eps.",
    )

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is not None:
            _BALANCER_PARAMS[name].model_validate(params)
        return params

    def weight_count(self) -> int | None:
        """Number of per-pair weights when `kd_weight` is a list, else None."""
        weight = self.params.get("kd_weight")
        return len(weight) if isinstance(weight, list) else None


_Channels = float | list[float]


class _NormalizationParams(Params):
    mean_from: _Channels = Field(description="Mean the batch was normalised with.")
    std_from: _Channels = Field(description="Std the batch was normalised with (> 0).")
    mean_to: _Channels = Field(description="Mean the teacher expects.")
    std_to: _Channels = Field(description="Std the teacher expects (> 0).")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        values = {k: v if isinstance(v, list) else [v] for k, v in self.model_dump().items()}
        if len({len(v) for v in values.values()}) != 1:
            raise ValueError("mean_from, std_from, mean_to, std_to need the same channel count")
        if any(s <= 0 for k in ("std_from", "std_to") for s in values[k]):
            raise ValueError("std_from and std_to must be > 0")
        return self


class AdapterSpec(_Strict):
    """Transform applied to the batch before the teacher sees it."""

    name: Literal["normalization"] = Field(
        default="normalization",
        description="normalization: (x·std_from + mean_from − mean_to) / std_to, per channel.",
    )
    params: JsonObject = Field(
        description="mean_from, std_from (the student's normalization) and mean_to, std_to "
        "(the teacher's): a float or one value per channel."
    )

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        _NormalizationParams.model_validate(params)
        return params


class DistillSpec(_Strict):
    """What to distill: layer pairs, their losses and how they are balanced."""

    pairs: list[PairSpec] = Field(
        default=[PairSpec()],
        min_length=1,
        max_length=MAX_PAIRS,
        description="Student ↔ teacher layer pairs; the default distills the model outputs.",
    )
    balancer: BalancerSpec = Field(default=BalancerSpec(), description="Loss balancer.")
    teacher_input_adapter: AdapterSpec | None = Field(
        default=None, description="Optional transform of the teacher's input."
    )
    allow_weak_teacher: bool = Field(
        default=False,
        description="Run even when the teacher evaluates near chance level before step 0.",
    )

    @field_validator("pairs")
    @classmethod
    def _unique_pairs(cls, pairs: list[PairSpec]) -> list[PairSpec]:
        keys = [(p.student_layer, p.teacher_layer) for p in pairs]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(
                f"each (student_layer, teacher_layer) pair may appear once: {duplicates}"
            )
        return pairs

    @field_validator("balancer")
    @classmethod
    def _one_weight_per_pair(cls, balancer: BalancerSpec, info: ValidationInfo) -> BalancerSpec:
        count, pairs = balancer.weight_count(), info.data.get("pairs")
        if count is not None and pairs is not None and count != len(pairs):
            raise ValueError(f"params.kd_weight has {count} weights for {len(pairs)} pairs")
        return balancer


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
