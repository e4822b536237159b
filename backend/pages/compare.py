"""The compare page (`/compare?run=…&key=…`): any metric of any number of runs overlaid, the
config differences, the whole view in the URL. The charts themselves are drawn in the browser
from `/api/compare` (frontend/static/js/pages/compare.js)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from kdlab.backend.api.deps import SessionDep
from kdlab.backend.errors import NotFound
from kdlab.backend.pages.security import verify_csrf
from kdlab.backend.pages.templating import render
from kdlab.backend.schemas.metrics import split_list
from kdlab.backend.schemas.runs import ACTIVE
from kdlab.backend.services import metrics as metric_service
from kdlab.backend.services import runs as service
from kdlab.backend.services.dispatch import DEMO_EXPERIMENT

router = APIRouter(dependencies=[Depends(verify_csrf)], include_in_schema=False)

DEFAULT_KEYS = ("eval/student_acc", "train/loss_total")
EXPERIMENT_RUNS = 50  # the newest runs of an experiment a view overlays
DEFAULT_PREFIXES = ("train/kd/",)
RECENT_RUNS = 30


def _listed(repeated: list[str] | None, joined: str | None) -> list[str]:
    """`?run=a&run=b` and `?runs=a,b` alike, first occurrence kept."""
    items = [*(repeated or []), *(split_list(joined) or [])]
    return list(dict.fromkeys(i.strip() for i in items if i.strip()))


def demo_view() -> str:
    """The compare view `kdlab serve --demo` opens: the demo's runs, accuracy and KD term."""
    query = urlencode([("experiment", DEMO_EXPERIMENT), ("key", "eval/student_acc"),
                       ("key", "eval/student_loss")])  # fmt: skip
    return f"/compare?{query}"


def default_keys(available: list[str]) -> list[str]:
    """What the page shows before a key is picked: accuracy, total loss and each KD term."""
    chosen = [k for k in DEFAULT_KEYS if k in available]
    chosen += [k for k in available if k.startswith(DEFAULT_PREFIXES)]
    return chosen or available[:2]


@router.get("/compare")
def compare_page(
    request: Request,
    session: SessionDep,
    run: Annotated[list[str] | None, Query()] = None,
    runs: str | None = None,
    key: Annotated[list[str] | None, Query()] = None,
    keys: str | None = None,
    experiment: str | None = None,
) -> Response:
    """`?run=a&run=b` (or `runs=a,b`) compares those runs; `?experiment=NAME` every run of the
    experiment, oldest first, as it stands when the page loads (a reload shows runs added
    since)."""
    if experiment:
        listing = service.list_runs(
            session, experiment=experiment, sort="created", limit=EXPERIMENT_RUNS
        )
        if listing.total == 0:
            raise NotFound(f"experiment {experiment!r} has no runs")
        chosen = listing.runs
    else:
        run_ids = _listed(run, runs)
        chosen = [service.run_out(service.get_run(session, run_id)) for run_id in run_ids]
    available = sorted({k for r in chosen for k in metric_service.run_keys(session, r.id)})
    asked = _listed(key, keys)
    context = {
        "nav": "compare",
        "experiment": experiment,
        "runs": chosen,
        "available_keys": sorted(set(available) | set(asked)),
        "selected_keys": asked or default_keys(available),
        "configs": [{"id": r.id, "name": r.name, "config": r.config} for r in chosen],
        "recent": [] if chosen else service.list_runs(session, limit=RECENT_RUNS).runs,
        "any_live": any(r.status in ACTIVE for r in chosen),
        "live_ids": ",".join(r.id for r in chosen if r.status in ACTIVE),
    }
    return render(request, "pages/compare.html", context)
