"""The distillation part of the run config: layer pairs and their losses, the balancer, the
teacher input adapter (`DistillSpec`). `kdlab.worker.config` re-exports every name."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from typing_extensions import Self

from kdlab.worker.params import JsonObject, Params, params_field, unknown_name
from kdlab.worker.params import StrictModel as _Strict

MAX_PAIRS = 128  # distillation layer pairs of one run


class LossSpec(_Strict):
    """A KD loss from `kdlab.worker.kd.losses.LOSSES`."""

    name: str = Field(default="logits_kl", description="KD loss name, e.g. logits_kl, feature_mse.")
    params: JsonObject = params_field("loss")

    @field_validator("name")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        from kdlab.worker.kd.losses import LOSSES

        if name not in LOSSES:
            raise ValueError(unknown_name("loss", name, LOSSES))
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is not None:
            from kdlab.worker.kd.losses import build_loss

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
