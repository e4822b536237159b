"""JSON nested too deeply is a 422 naming the path, before any parser recurses into it.

Python's `json.loads` (what FastAPI parses a body with) recurses once per level and raises
RecursionError somewhere near 1,000 levels, which FastAPI answers as a bare 400 and a caller of
`json.loads` as a 500. `too_deep` scans the raw text iteratively (one regex pass over the
structural characters, strings skipped whole) and names the path of the first value nested deeper
than the limit; `DepthCheckedRoute` runs it on every JSON body of a router before FastAPI parses.
The free-form params inside stay bounded by `kdlab.worker.config.MAX_PARAMS_DEPTH` (32): this outer
bound only has to be far below the parser's recursion limit and above any valid config's depth.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from kdlab.worker.config import MAX_PARAMS_DEPTH

MAX_JSON_DEPTH = MAX_PARAMS_DEPTH + 32  # a run config's own nesting plus its params' 32 levels

_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},:]', re.DOTALL)


def too_deep(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> list[str | int] | None:
    """The path (keys and indices) of the first container nested more than `limit` levels deep
    in JSON `text`, or None. Text that is not JSON is left to the parser's own error."""
    if isinstance(text, bytes):
        if text.count(b"[") + text.count(b"{") <= limit:  # the common case: nothing to scan
            return None
        text = text.decode("utf-8", errors="replace")
    elif text.count("[") + text.count("{") <= limit:
        return None
    # per open container: [is_object, current key or index, expecting a key]
    stack: list[list[Any]] = []
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            if len(stack) >= limit:
                return [entry[1] for entry in stack]
            stack.append([token == "{", None if token == "{" else 0, token == "{"])
        elif token in ("]", "}"):
            if not stack:
                return None  # malformed: the parser says so
            stack.pop()
        elif not stack:
            continue
        elif token == ",":
            top = stack[-1]
            if top[0]:
                top[2] = True
            elif isinstance(top[1], int):
                top[1] += 1
        elif token == ":":
            stack[-1][2] = False
        elif stack[-1][0] and stack[-1][2]:  # a key of the innermost object
            try:
                stack[-1][1] = json.loads(token)  # one flat string: no recursion
            except ValueError:
                return None  # malformed: the parser says so
    return None


def too_deep_error(path: list[str | int], loc: list[str | int]) -> dict[str, Any]:
    """A FastAPI-shaped validation error for a value nested too deeply at `loc + path`."""
    return {
        "type": "too_deep",
        "loc": [*loc, *path],
        "msg": f"nested more than {MAX_JSON_DEPTH} levels deep",
        "input": "...",
    }


class DepthCheckedRoute(APIRoute):
    """An APIRoute whose JSON body is refused with a 422 (path named) when it nests more than
    MAX_JSON_DEPTH levels, before FastAPI's parser recurses into it. The body read here is the
    one FastAPI parses next (Starlette caches it on the request)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            # FastAPI parses a body as JSON when it says so, or says nothing
            if request.method in ("POST", "PUT", "PATCH") and (
                not content_type or "json" in content_type
            ):
                path = too_deep(await request.body())
                if path is not None:
                    raise RequestValidationError([too_deep_error(path, ["body"])])
            return await handler(request)

        return checked
