"""Brute-force references for the roll-ups and the bucket rule (kdlab.backend.services.downsample's
docstring), computed in plain Python from the points alone."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

LEVELS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # the documented block widths
FINEST = LEVELS[0]
Point = tuple[int, float, float]  # step, value, wall_time


def expected_rollups(
    points: dict[tuple[str, str], dict[int, tuple[float, float]]], levels=LEVELS
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """{(run, key, level, block): (count, min, max, first_step, last_step, first_time,
    last_time, min_time, max_time)} and the sum apart (compared with a tolerance)."""
    out: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for (run_id, key), by_step in points.items():
        for width in levels:
            blocks: dict[int, list[int]] = {}
            for step in by_step:
                blocks.setdefault(step // width, []).append(step)
            for block, steps in blocks.items():
                values = [by_step[s][0] for s in steps]
                times = [by_step[s][1] for s in steps]
                first, last = min(steps), max(steps)
                out[(run_id, key, width, block)] = (
                    len(steps),
                    sum(values),
                    min(values),
                    max(values),
                    first,
                    last,
                    by_step[first][1],
                    by_step[last][1],
                    min(times),
                    max(times),
                )
    return out


def stored_rollups(session: Session) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    rows = session.execute(
        text(
            "SELECT run_id, key, level, block, count, total, min_value, max_value, first_step, "
            "last_step, first_time, last_time, min_time, max_time FROM metric_rollups"
        )
    ).all()
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def assert_same_rollups(stored: dict, expected: dict) -> None:
    assert stored.keys() == expected.keys()
    for name, want in expected.items():
        got = stored[name]
        assert got[0] == want[0] and got[2:] == want[2:], (name, got, want)
        assert math.isclose(got[1], want[1], rel_tol=1e-12, abs_tol=1e-9), (name, got, want)


def step_width(n: int, lo: int, hi: int) -> int:
    width = 1
    while hi // width - lo // width + 1 > n:
        width *= 2
    return width


def expected_series(
    points: list[Point],
    n: int,
    x: str = "step",
    min_step: int | None = None,
    max_step: int | None = None,
    min_time: float | None = None,
    max_time: float | None = None,
) -> dict[str, list]:
    """What GET /api/compare must answer for one series, by the documented rule."""
    inside = [
        (s, v, t)
        for s, v, t in points
        if (min_step is None or s >= min_step)
        and (max_step is None or s <= max_step)
        and (min_time is None or t >= min_time)
        and (max_time is None or t <= max_time)
    ]
    empty: dict[str, list] = {"step": [], "time": [], "value": [], "min": [], "max": []}
    if not inside:
        return empty
    cross = (x == "step" and (min_time, max_time) != (None, None)) or (
        x == "time" and (min_step, max_step) != (None, None)
    )
    if cross:  # a filter on the other axis: equal ranges between the window's extremes of x
        i = 0 if x == "step" else 2
        lo, hi = min(p[i] for p in inside), max(p[i] for p in inside)
        if x == "step":

            def bucket(s: int, t: float) -> int:
                return (s - lo) * n // (hi - lo + 1)

            raw = hi - lo + 1 <= n
        else:
            scale = n / (hi - lo) if hi > lo else 0.0

            def bucket(s: int, t: float) -> int:
                return min(math.floor((t - lo) * scale), n - 1)

            raw = False
    elif x == "step":
        lo, hi = min(s for s, _, _ in inside), max(s for s, _, _ in inside)
        width = step_width(n, lo, hi)

        def bucket(s: int, t: float) -> int:
            if width >= FINEST:
                return s // width - lo // width
            return (s - lo) * n // (hi - lo + 1)

        raw = hi - lo + 1 <= n
    else:
        first = min(t for _, _, t in points)
        last = max(t for _, _, t in points)
        tlo = first if min_time is None else max(first, min_time)
        thi = last if max_time is None else min(last, max_time)
        raw = len(points) <= n
        buckets = _time_buckets(points, n, tlo, thi, min_time, max_time)
    if x == "step" or cross:
        buckets = {}
        for s, v, t in inside:
            buckets.setdefault(bucket(s, t), []).append((s, v, t))
    if raw or (len(inside) <= n and len(inside) != len(buckets)):
        ordered = sorted(inside, key=(lambda p: p[0]) if x == "step" else (lambda p: (p[2], p[0])))
        values = [v for _, v, _ in ordered]
        return {
            "step": [s for s, _, _ in ordered],
            "time": [t for _, _, t in ordered],
            "value": values,
            "min": values,
            "max": values,
        }
    out: dict[str, list] = {"step": [], "time": [], "value": [], "min": [], "max": []}
    for b in sorted(buckets):
        members = buckets[b]
        values = [v for _, v, _ in members]
        out["step"].append(max(s for s, _, _ in members))
        out["time"].append(max(t for _, _, t in members))
        out["value"].append(math.fsum(values) / len(values))
        out["min"].append(min(values))
        out["max"].append(max(values))
    return out


def _time_buckets(
    points: list[Point],
    n: int,
    tlo: float,
    thi: float,
    min_time: float | None,
    max_time: float | None,
) -> dict[int, list[Point]]:
    """x = time on the roll-ups, by the documented rule: from the start level down, a block
    (of the series' points, whatever the window) wholly inside the window whose wall times span
    at most delta = (thi - tlo) / n goes whole to the bucket of its latest time; a block wholly
    outside is dropped; any other is split into its RATIO children, and on the finest level its
    points inside the window go one by one to the bucket of their own time."""
    scale = n / (thi - tlo) if thi > tlo else 0.0
    delta = (thi - tlo) / n
    ta = -math.inf if min_time is None else min_time
    tb = math.inf if max_time is None else max_time

    def bucket(t: float) -> int:
        return min(math.floor((t - tlo) * scale), n - 1)

    out: dict[int, list[Point]] = {}

    def visit(level: int, block: list[Point]) -> None:
        t0, t1 = min(p[2] for p in block), max(p[2] for p in block)
        if t1 < ta or t0 > tb:
            return
        if t0 >= ta and t1 <= tb and t1 - t0 <= delta:
            out.setdefault(bucket(t1), []).extend(block)
        elif level == FINEST:
            for point in block:
                if ta <= point[2] <= tb:
                    out.setdefault(bucket(point[2]), []).append(point)
        else:
            for child in _blocks(block, level // 2).values():
                visit(level // 2, child)

    # the start level: the coarsest no wider than the steps a bucket holds, estimated from
    # the coarsest blocks the series spans and the window's share of its time range
    first, last = min(p[2] for p in points), max(p[2] for p in points)
    b0, b1 = min(p[0] for p in points) // LEVELS[-1], max(p[0] for p in points) // LEVELS[-1]
    fraction = (thi - tlo) / (last - first) if last > first else 0.0
    per_bucket = (b1 - b0 + 1) * LEVELS[-1] * fraction / n
    start = max([FINEST, *(w for w in LEVELS if w <= per_bucket)])
    for block in _blocks(points, start).values():
        visit(start, block)
    return out


def _blocks(points: list[Point], width: int) -> dict[int, list[Point]]:
    blocks: dict[int, list[Point]] = {}
    for point in points:
        blocks.setdefault(point[0] // width, []).append(point)
    return blocks


def assert_series(got: dict, want: dict, context: Any = None) -> None:
    for name in ("step", "time", "min", "max"):
        assert got[name] == want[name], (context, name)
    assert len(got["value"]) == len(want["value"]), context
    for a, b in zip(got["value"], want["value"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), (context, a, b)
