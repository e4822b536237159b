"""The small validation helpers the run config and the catalog share: `error_lines` (pydantic
errors as `dotted.path: message` lines), `StrictModel`, `Params` (typed builder params) and
`unknown_name`, and `JsonObject` (free-form params, checked: finite, 64-bit, bounded nesting).

A leaf module (it imports nothing of the project): `kdlab.worker.catalog` imports it, and so does
`kdlab.worker.config`, which re-exports these names, so neither needs the other at import time.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from typing_extensions import Self

__all__ = [
    "MAX_PARAMS_DEPTH",
    "MAX_PARAMS_INT",
    "JsonObject",
    "Params",
    "StrictModel",
    "check_json_object",
    "error_lines",
    "params_field",
    "unknown_name",
]

MAX_PARAMS_DEPTH = 32  # nesting of lists/objects in free-form params
MAX_PARAMS_INT = 2**63  # integers in free-form params fit a signed 64-bit integer


def error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    """One `dotted.json.path: message` line per error (the format of every config error)."""
    lines = []
    for e in err.errors(include_url=False):
        path = ".".join(str(part) for part in (prefix, *e["loc"]) if part != "")
        message = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
        lines.append(f"{path or '<root>'}: {message}")
    return lines


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> str:
    """`unknown model 'mpl'; did you mean 'mlp'? Available: ...` for a name not in `choices`."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return f"unknown {kind} {name!r}{hint} Available: {', '.join(choices) or '(none)'}"


class StrictModel(BaseModel):
    """Unknown keys are errors and every number is finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Params(StrictModel):
    """Base for the typed params of a catalog entry, loss helper or balancer."""

    @classmethod
    def parse(cls, params: Mapping[str, Any] | None, owner: str) -> Self:
        """Validate `params`; a bad one raises ValueError naming `owner` and each param."""
        try:
            return cls.model_validate(dict(params or {}))
        except ValidationError as err:
            raise ValueError(f"{owner}: " + "; ".join(error_lines(err, "params"))) from None


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


def params_field(what: str) -> Any:
    return Field(
        default={},
        validate_default=True,
        description=f"Keyword parameters of the {what} (see its catalog entry).",
    )
