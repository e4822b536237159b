"""Request and response bodies of the metric routes: `/api/runs/{id}/metrics*` and `/api/compare`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

KEY_PATTERN = r"^[A-Za-z0-9_./~-]+$"
KEY_MAX_LENGTH = 250  # the width of metrics.key
MAX_STEP = 2**63 - 1  # metrics.step is a BIGINT

MetricKey = Annotated[
    str, StringConstraints(min_length=1, max_length=KEY_MAX_LENGTH, pattern=KEY_PATTERN)
]
XAxis = Literal["step", "time"]


class MetricPointIn(BaseModel):
    """One point as a worker reports it."""

    model_config = ConfigDict(extra="forbid")

    key: MetricKey = Field(
        description="Metric name: letters, digits and `_ . / ~ -`, at most 250 characters, "
        "e.g. `train/loss_total` or `train/kd/output~output`."
    )
    step: int = Field(ge=0, le=MAX_STEP, strict=True, description="Training step, an integer ≥ 0.")
    value: float = Field(strict=True, description="A JSON number; NaN and ±inf are refused.")
    time: float | None = Field(
        default=None,
        strict=True,
        description="Unix seconds when the point was measured (a JSON number); default: now.",
    )


class MetricBatchIn(BaseModel):
    """`POST /api/runs/{id}/metrics`; at most `KDLAB_MAX_METRIC_BATCH` points per request."""

    model_config = ConfigDict(extra="forbid")

    points: list[MetricPointIn]


class MetricBatchAccepted(BaseModel):
    accepted: int = Field(
        description="Points of the request now stored (all of them: a batch is stored whole "
        "or not at all; a point that was already there counts too)."
    )


class SeriesOut(BaseModel):
    """One run × key, columnar: entry `i` of every list describes bucket (or point) `i`.

    A bucket's `min`/`max` are exact, `value` is the mean of its points, `step`/`time` the
    largest step and latest time in it (those of its last point for a run that logs in order).
    A series with at most `max_points` points comes back unchanged (min = max = value).
    """

    run_id: str
    key: str
    step: list[int]
    time: list[float]
    value: list[float]
    min: list[float]
    max: list[float]
    points: int = Field(
        default=0, description="Raw points in the window these buckets summarise (≥ buckets)."
    )


class SeriesResponse(BaseModel):
    series: list[SeriesOut]


class MetricKeyOut(BaseModel):
    key: str
    count: int = Field(description="Points stored under this key.")
    last_step: int
    last_value: float = Field(description="Value at `last_step`.")
    last_time: float = Field(description="Unix seconds of the point at `last_step`.")


class MetricKeysResponse(BaseModel):
    run_id: str
    keys: list[MetricKeyOut] = Field(description="Sorted by key.")


def split_list(raw: str | None) -> list[str] | None:
    """`a,b,,a` → `["a", "b"]` (blanks dropped, first occurrence kept); None or blank → None."""
    if raw is None:
        return None
    items = list(dict.fromkeys(item.strip() for item in raw.split(",") if item.strip()))
    return items or None


def check_keys(keys: list[str], loc: list[str | int]) -> list[dict[str, Any]]:
    """FastAPI-shaped errors for every key that could not have been stored."""
    pattern = re.compile(KEY_PATTERN)
    return [
        {
            "loc": loc,
            "msg": f"metric key {key!r} must be 1–{KEY_MAX_LENGTH} characters of "
            "letters, digits and _ . / ~ -",
            "type": "string_pattern_mismatch",
        }
        for key in keys
        if len(key) > KEY_MAX_LENGTH or not pattern.match(key)
    ]


def inline_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON Schema with every `$ref` replaced by its definition (for an OpenAPI
    requestBody declared by hand, where `#/$defs/...` would not resolve)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)
