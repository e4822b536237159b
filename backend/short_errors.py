"""Validation errors cut short before they are answered: an error body never echoes more than a
short prefix of the input (FastAPI's 422 carries each error's `input` whole, so a 10 MB unknown
field would come back as a 10 MB answer).

`shorten` keeps FastAPI's 422 shape (`{loc, msg, type, input}` and `ctx` where there was one):
strings (and bytes) over `PREFIX_CHARS` keep their first `PREFIX_CHARS` characters plus "…",
a dict or list input becomes its JSON cut the same way (a small one stays as it is), long `loc`
parts and messages are cut too, and past `MAX_ERRORS` errors one last entry says how many more
there were.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

PREFIX_CHARS = 200
MSG_CHARS = 1000
MAX_ERRORS = 50
ELLIPSIS = "…"
TOO_MANY = "too_many_errors"  # the type of the entry counting the errors left out


class _Full(Exception):
    pass


def _cut(text: str, limit: int = PREFIX_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + ELLIPSIS


def _json_prefix(value: Any, limit: int = PREFIX_CHARS) -> tuple[str, bool]:
    """`value` as JSON, stopping once past `limit` characters (never encodes all of a huge
    input); returns the text and whether it was cut."""
    parts: list[str] = []
    used = 0

    def emit(text: str) -> None:
        nonlocal used
        parts.append(text)
        used += len(text)
        if used > limit:
            raise _Full

    def walk(item: Any) -> None:
        if isinstance(item, Mapping):
            emit("{")
            for index, (key, inner) in enumerate(item.items()):
                emit((", " if index else "") + json.dumps(_cut(str(key), limit)) + ": ")
                walk(inner)
            emit("}")
        elif isinstance(item, list | tuple):
            emit("[")
            for index, inner in enumerate(item):
                if index:
                    emit(", ")
                walk(inner)
            emit("]")
        elif isinstance(item, str):
            emit(json.dumps(item[: limit + 1]))
        elif isinstance(item, bytes):
            emit(json.dumps(item[: limit + 1].decode("utf-8", "replace")))
        elif item is None or isinstance(item, bool | int | float):
            emit(json.dumps(item))
        else:
            emit(json.dumps(_cut(str(item), limit)))

    try:
        walk(value)
    except _Full:
        return "".join(parts)[:limit] + ELLIPSIS, True
    return "".join(parts), False


def short_input(value: Any) -> Any:
    """The input as an error may echo it: short values as they are, long ones cut."""
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, bytes | bytearray):
        return _cut(bytes(value[: PREFIX_CHARS + 1]).decode("utf-8", "replace"))
    if isinstance(value, Mapping | list | tuple):
        text, cut = _json_prefix(value)
        return text if cut else value
    if value is None or isinstance(value, bool | int | float):
        return value
    return _cut(str(value))


def _short_error(error: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(error)
    out["loc"] = [_cut(p) if isinstance(p, str) else p for p in error.get("loc", ())]
    if isinstance(error.get("msg"), str):
        out["msg"] = _cut(error["msg"], MSG_CHARS)
    if "input" in error:
        out["input"] = short_input(error["input"])
    if isinstance(error.get("ctx"), Mapping):
        out["ctx"] = {
            k: short_input(v) if isinstance(v, str | bytes | Mapping | list | tuple) else v
            for k, v in error["ctx"].items()
        }
    return out


def shorten(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The first `MAX_ERRORS` errors cut short, then one entry counting the rest."""
    items = list(errors)
    shown = [_short_error(e) for e in items[:MAX_ERRORS]]
    if len(items) == MAX_ERRORS + 1 and items[-1].get("type") == TOO_MANY:
        shown.append(dict(items[-1]))  # shortened before: its count stays
    elif len(items) > MAX_ERRORS:
        more = len(items) - MAX_ERRORS
        shown.append(
            {
                "loc": ["body"],
                "msg": f"and {more} more error{'s' if more > 1 else ''} (the first "
                f"{MAX_ERRORS} are listed)",
                "type": TOO_MANY,
                "input": None,
            }
        )
    return shown
