"""The small validation helpers the run config and the catalog share: `error_lines` (pydantic
errors as `dotted.path: message` lines), `StrictModel`, `Params` (typed builder params) and
`unknown_name`.

A leaf module (it imports nothing of the project): `worker.catalog` imports it, and so does
`worker.config`, which re-exports these names, so neither needs the other at import time.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

__all__ = ["Params", "StrictModel", "error_lines", "unknown_name"]


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
