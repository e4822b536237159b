"""Flat form fields ⇄ a nested run config.

Each input of the launch form is named `<dotted.path>:<type>` (`train.optimizer.lr:float`,
`distill.pairs.0.loss.name:str`); a number segment is a list index. The type says how to read
the text: `str`, `int`, `float`, `bool` (a hidden "false" before the checkbox's "true": the last
value wins), `list` (comma-separated numbers, `16, 16`) and `json` (any JSON value, e.g. a
per-pair weight list). An empty field is left out, so the schema's default applies. Names that
start with `_` (form actions) and the CSRF field are not part of the config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

TYPES = ("str", "int", "float", "bool", "list", "json")
Loc = list[str | int]


class FieldError(ValueError):
    def __init__(self, loc: Loc, msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def split_name(name: str) -> tuple[Loc, str]:
    """`distill.pairs.0.loss.name:str` → (["distill", "pairs", 0, "loss", "name"], "str")."""
    path, _, kind = name.rpartition(":")
    if not path or kind not in TYPES:
        path, kind = name, "str"
    return [int(p) if p.isdigit() else p for p in path.split(".")], kind


def _number(text: str) -> int | float:
    value = float(text)
    return (
        int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
    )


def parse_value(text: str, kind: str, loc: Loc) -> Any:
    """The typed value of one field's text; FieldError in words when it does not read."""
    text = text.strip()
    try:
        if kind == "str":
            return text
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            return text.lower() in ("true", "on", "1", "yes")
        if kind == "list":
            return [_number(part) for part in text.strip("[]").split(",") if part.strip()]
        return json.loads(text)
    except ValueError:
        expected = {
            "int": "a whole number",
            "float": "a number",
            "list": "numbers separated by commas, e.g. 64, 32",
            "json": 'a JSON value, e.g. 0.5, [0.3, 0.2] or {"a": 1}',
        }.get(kind, "a value")
        raise FieldError(loc, f"{text!r} is not {expected}") from None


def _set(tree: dict[str, Any], loc: Loc, value: Any) -> None:
    node = tree
    for part in loc[:-1]:
        node = node.setdefault(str(part), {})
        if not isinstance(node, dict):
            return
    node[str(loc[-1])] = value


def _lists(node: Any) -> Any:
    """Dicts whose keys are all list indexes become lists, in index order."""
    if not isinstance(node, dict):
        return node
    items = {key: _lists(value) for key, value in node.items()}
    if items and all(key.isdigit() for key in items):
        return [items[key] for key in sorted(items, key=int)]
    return items


def decode(fields: Iterable[tuple[str, str]]) -> tuple[dict[str, Any], list[FieldError]]:
    """The nested config the form describes, and the fields that could not be read."""
    values: dict[tuple[str | int, ...], tuple[str, str]] = {}
    for name, text in fields:
        if name.startswith("_") or name == "csrf_token":
            continue
        loc, kind = split_name(name)
        values[tuple(loc)] = (text, kind)  # last wins (checkbox after its hidden "false")
    tree: dict[str, Any] = {}
    errors = []
    for loc_key, (text, kind) in values.items():
        loc = list(loc_key)
        if kind != "bool" and not text.strip():
            continue
        try:
            _set(tree, loc, parse_value(text, kind, loc))
        except FieldError as err:
            errors.append(err)
    return _lists(tree), errors


def field_id(loc: Iterable[str | int]) -> str:
    """The HTML id of the input for `loc` (also where its error message is attached)."""
    return "f-" + "-".join(str(part) for part in loc).replace("_", "-").replace("/", "-")
