"""Errors the services raise; the app turns each into its HTTP status with a JSON `detail`."""

from __future__ import annotations

from typing import Any, ClassVar

from kdlab.backend.short_errors import shorten


class ServiceError(Exception):
    status_code = 400
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail if detail is not None else message


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Forbidden(ServiceError):
    status_code = 403


class Unauthorized(ServiceError):
    status_code = 401


class PayloadTooLarge(ServiceError):
    status_code = 413


class Unavailable(ServiceError):
    """503: nothing was done; send the same request again after `Retry-After` seconds (the
    worker's client does)."""

    status_code = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class Invalid(ServiceError):
    """422 with FastAPI's shape: `detail` is a list of `{"loc": [...], "msg": ...}`."""

    status_code = 422

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        errors = shorten(errors)  # every 422 echoes only a short prefix of the input
        lines = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        super().__init__(lines, detail=errors)

    @classmethod
    def at(cls, loc: list[str | int], msg: str) -> Invalid:
        return cls([{"loc": loc, "msg": msg, "type": "value_error"}])
