"""/api/compare: the same metrics of several runs, downsampled for overlaid curves."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from kdlab.backend.api.deps import PrincipalDep, SessionDep, SettingsDep
from kdlab.backend.api.metrics import WindowDep, parse_keys
from kdlab.backend.errors import Invalid
from kdlab.backend.schemas.metrics import SeriesResponse, split_list
from kdlab.backend.services import metrics

router = APIRouter(tags=["compare"])


@router.get("/compare")
def compare(
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    window: WindowDep,
    runs: Annotated[str, Query(description="Comma-separated run ids.")],
    keys: Annotated[str, Query(description="Comma-separated metric keys.")],
) -> SeriesResponse:
    """One series per run × key (runs outer, keys inner, in the order asked), columnar.

    Each series has at most `max_points` buckets, computed in SQL from the metric roll-ups
    (the rule: `kdlab.backend.services.downsample`): on x=step aligned step ranges of a power
    of two (equal ranges below 16 steps), on x=time equal time slices made of whole roll-up
    blocks, within the zoom range `min_step`/`max_step`/`min_time`/`max_time`. Every point in
    the range is in exactly one bucket; per bucket `min` and `max` are exact — a one-step spike
    always shows — `value` is the mean, and `step`/`time` are the largest step and latest time
    in the bucket (its last point's, for a run that logs in order). A series with at most
    `max_points` points comes back unchanged (min = max = value); a run without the key gets
    empty lists. Unknown run → 404; `max_points` above
    KDLAB_MAX_POINTS_PER_QUERY → 422.
    """
    run_ids = split_list(runs)
    key_list = parse_keys(keys)
    if run_ids is None or key_list is None:
        missing = "runs" if run_ids is None else "keys"
        raise Invalid.at(["query", missing], f"{missing} must name at least one item")
    for run_id in run_ids:
        principal.require_run(run_id)
    return SeriesResponse(series=metrics.series(session, settings, run_ids, key_list, window))
