"""Chart-query latency of `GET /api/compare` at every width, both x axes, zoomed and not.

    python benchmarks/compare_queries.py [--runs 10] [--points 100000]
        [--sweep-runs 100] [--sweep-points 10000] [--sweep-keys 4]
        [--wide-keys 20] [--wide-points 100000] [--repeats 5]
        [--postgres-url postgresql+psycopg://...]

Fills a fresh SQLite database in a temporary data dir (and, with `--postgres-url`, that empty
PostgreSQL database, which the script migrates) in-process through the service's own ingest
(`kdlab.backend.services.metrics.ingest`, batches of 10,000 points: the same rows and roll-ups
as the REST API writes, without the JSON), then starts a real
`uvicorn --factory kdlab.backend.main:create_app` on loopback and times `GET /api/compare`:
the median of `repeats` calls after one warm-up.

- `runs` runs × `points` points of one key, `max_points` in {200, 500, 1000, 2000, 4000},
  `x=step` and `x=time`, the whole range and a 5% zoom window (the middle 5% of the steps, or
  of the time range);
- `sweep-runs` runs × `sweep-points` points × `sweep-keys` keys, `max_points=1000`;
- one run × `wide-keys` keys × `wide-points` points, `max_points=1000`.

Prints one JSON line per measurement (median_ms, all times, the answer's shape) and a summary.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.ingest_compare import (  # noqa: E402
    cpu_model,
    emit,
    kdlab_server,
    package_version,
    seed_runs,
    timed_median,
)

KEY = "train/loss_total"
T0 = 1_763_900_000.0
DT = 0.1  # seconds per step
BATCH = 10_000
WIDTHS = (200, 500, 1000, 2000, 4000)


def value(run: int, key: int, step: int) -> float:
    """A loss-like curve with deterministic noise and a rare spike."""
    noise = math.sin(step * 12.9898 + run * 78.233 + key * 3.1) * 43758.5453
    spike = 10.0 if step % 9973 == 0 else 0.0
    return 2.0 * math.exp(-step / 30_000) + 0.1 + 0.05 * (noise - math.floor(noise)) + spike


def fill(database_url: str, run_ids: list[str], keys: list[str], points: int) -> float:
    """Ingest every point in-process; returns the seconds it took."""
    from kdlab.backend.db.engine import make_engine, make_session_factory
    from kdlab.backend.schemas.metrics import MetricPointIn
    from kdlab.backend.services import metrics
    from kdlab.backend.settings import Settings

    settings = Settings(
        database_url=database_url,
        data_dir=Path(tempfile.gettempdir()),
        executor="none",
        mlflow_tracking_uri="none",
    )
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    began = time.perf_counter()
    per_key_batch = max(1, BATCH // len(keys))
    for r, run_id in enumerate(run_ids):
        for start in range(0, points, per_key_batch):
            batch = [
                MetricPointIn.model_construct(
                    key=key, step=s, value=value(r, k, s), time=T0 + s * DT
                )
                for k, key in enumerate(keys)
                for s in range(start, min(start + per_key_batch, points))
            ]
            with factory() as session:
                metrics.ingest(session, settings, run_id, batch)
    elapsed = time.perf_counter() - began
    engine.dispose()
    return elapsed


def measure(
    client: httpx.Client, label: str, params: dict[str, Any], repeats: int, **extra: Any
) -> float:
    answer: dict[str, Any] = {}

    def call() -> None:
        response = client.get("/api/compare", params=params)
        response.raise_for_status()
        answer["body"] = response.json()

    median, times = timed_median(call, repeats)
    series = answer["body"]["series"]
    emit(
        case=label,
        **extra,
        median_ms=round(median * 1000, 1),
        times_ms=[round(t * 1000, 1) for t in times],
        series=len(series),
        buckets=sorted({len(s["step"]) for s in series})[-3:],
        points=sum(s["points"] for s in series),
    )
    return median


def bench(label: str, database_url: str, args: argparse.Namespace, work: Path) -> dict:
    one_key = seed_runs(database_url, args.runs)
    sweep = seed_runs(database_url, args.sweep_runs)
    (wide,) = seed_runs(database_url, 1)
    sweep_keys = [f"sweep/key{k}" for k in range(args.sweep_keys)]
    wide_keys = [f"run/key{k:02d}" for k in range(args.wide_keys)]
    for name, ids, keys, points in (
        ("one_key", one_key, [KEY], args.points),
        ("sweep", sweep, sweep_keys, args.sweep_points),
        ("wide", [wide], wide_keys, args.wide_points),
    ):
        seconds = fill(database_url, ids, keys, points)
        total = len(ids) * len(keys) * points
        emit(db=label, fill=name, points=total, seconds=round(seconds, 1))
    results: dict[str, float] = {}
    base, server = kdlab_server(database_url, work / f"data-{label}", work / f"kdlab-{label}.log")
    with server, httpx.Client(base_url=base, timeout=300) as client:
        runs = ",".join(one_key)
        middle, half = args.points // 2, max(1, args.points // 40)  # 5%: middle ± 2.5%
        zooms: dict[str, dict[str, dict[str, Any]]] = {
            "step": {
                "whole": {},
                "zoom5%": {"min_step": middle - half, "max_step": middle + half - 1},
            },
            "time": {
                "whole": {},
                "zoom5%": {
                    "min_time": T0 + (middle - half) * DT,
                    "max_time": T0 + (middle + half - 1) * DT,
                },
            },
        }
        for x, windows in zooms.items():
            for window, extra in windows.items():
                for width in WIDTHS:
                    params = {"runs": runs, "keys": KEY, "max_points": width, "x": x, **extra}
                    name = f"{args.runs}x{args.points} {x} {window} max_points={width}"
                    results[name] = measure(
                        client, "one_key", params, args.repeats, db=label, x=x, window=window,
                        max_points=width,
                    )  # fmt: skip
        params = {"runs": ",".join(sweep), "keys": ",".join(sweep_keys), "max_points": 1000}
        name = f"{args.sweep_runs}x{args.sweep_keys} keys x{args.sweep_points}"
        results[name] = measure(client, "sweep", params, args.repeats, db=label)
        params = {"runs": wide, "keys": ",".join(wide_keys), "max_points": 1000}
        name = f"1x{args.wide_keys} keys x{args.wide_points}"
        results[name] = measure(client, "wide", params, args.repeats, db=label)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--sweep-runs", type=int, default=100)
    parser.add_argument("--sweep-points", type=int, default=10_000)
    parser.add_argument("--sweep-keys", type=int, default=4)
    parser.add_argument("--wide-keys", type=int, default=20)
    parser.add_argument("--wide-points", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--postgres-url", help="an empty PostgreSQL database to fill as well")
    args = parser.parse_args()
    emit(
        machine=cpu_model(),
        python=platform.python_version(),
        sqlite=__import__("sqlite3").sqlite_version,
        **{name: package_version(name) for name in ("fastapi", "sqlalchemy", "uvicorn")},
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        args=vars(args),
    )
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kdlab-compare-") as tmp:
        work = Path(tmp)
        targets = [("sqlite", f"sqlite:///{work / 'kdlab.db'}")]
        if args.postgres_url:
            targets.append(("postgres", args.postgres_url))
        for label, url in targets:
            results = bench(label, url, args, work)
            summary[label] = {
                "slowest_ms": round(max(results.values()) * 1000, 1),
                "slowest": max(results, key=lambda name: results[name]),
                "over_150ms": sorted(
                    name for name, s in results.items() if s > 0.150 and "keys" not in name
                ),
            }
    emit(summary=summary)


if __name__ == "__main__":
    main()
