"""The Jinja2 environment of the pages, and the one helper that picks page or fragment."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import Response

from kdlab.worker import catalog

FRONTEND_DIR = Path(__file__).resolve().parents[2] / "frontend"
TEMPLATES_DIR = FRONTEND_DIR / "templates"
STATIC_DIR = FRONTEND_DIR / "static"


def shared_context(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    browser = getattr(request.state, "browser", None)
    return {
        "csrf_token": browser.csrf if browser is not None else "",
        "signed_in": browser is not None,
        "auth_required": not settings.open_access,
        "mlflow_ui_url": (settings.mlflow_ui_url or "").rstrip("/") or None,
    }


def format_duration(seconds: float | None) -> str:
    """`42 s`, `3 m 05 s`, `1 h 02 m`; `–` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} m {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} m"


def format_number(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "–"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "–"


templates = Jinja2Templates(directory=TEMPLATES_DIR, context_processors=[shared_context])
templates.env.filters.update(
    duration=format_duration, number=format_number, filesize=format_bytes, utc=format_time
)


def model_label(spec: Mapping[str, Any] | None) -> str:
    """`mlp hidden=[16]` for a model spec of a config: the entry's first (principal) param and
    those that differ from the catalog's defaults."""
    return " ".join(model_label_parts(spec))


def model_label_parts(spec: Mapping[str, Any] | None) -> list[str]:
    """The words of `model_label` (a page keeps each on one line)."""
    if not spec:
        return ["–"]
    name = str(spec.get("name", "?"))
    params = dict(spec.get("params") or {})
    try:
        typed = catalog.params_model("models", name)
    except (KeyError, ValueError):
        typed = None
    if typed is not None:
        fields = typed.model_fields
        principal = next(iter(fields), None)
        defaults = {k: f.default for k, f in fields.items() if not f.is_required()}
        params = {
            k: v
            for k, v in params.items()
            if k == principal or k not in defaults or defaults[k] != v
        }
    return [name, *(f"{k}={v}" for k, v in sorted(params.items()))]


templates.env.globals["model_label"] = model_label
templates.env.globals["model_label_parts"] = model_label_parts


def _vendored(pattern: str) -> str:
    """The path under static/ of the one vendored file matching `pattern` (its version is in
    its name; `frontend/static/vendor/README.md` says how to update it)."""
    found = sorted((STATIC_DIR / "vendor").glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected one vendored file {pattern} in {STATIC_DIR / 'vendor'}")
    return f"vendor/{found[0].name}"


templates.env.globals["vendor"] = {
    "htmx": _vendored("htmx-2.*.min.js"),
    "htmx_sse": _vendored("htmx-ext-sse-*.js"),
    "uplot_css": _vendored("uPlot-*.min.css"),
}


def is_fragment_request(request: Request) -> bool:
    """htmx asked for a piece of the page (not a history restore, which needs the whole page)."""
    return (
        request.headers.get("hx-request") == "true"
        and request.headers.get("hx-history-restore-request") != "true"
    )


def render(
    request: Request,
    page: str,
    context: dict[str, Any],
    *,
    partial: str | None = None,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The whole `page`, or `partial` when htmx asks for a fragment; always `Vary: HX-Request`."""
    name = partial if partial is not None and is_fragment_request(request) else page
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Vary"] = "HX-Request"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response
