"""Where PostgreSQL's single-client ingest floor is: a batch's cost in-process, with and without
the foreign keys from `metrics` / `metric_rollups` to `runs`.

    python benchmarks/pg_ingest_floor.py [--batches 60] [--batch 1000]

On a throwaway PostgreSQL server (`compare_queries.throwaway_postgres`, fsync on), migrated to
head: one run gets `batches` batches of `batch` points of one key through
`kdlab.backend.services.metrics.ingest` (the service's own ingest, no HTTP), after an ANALYZE
at the 6th batch; then the two foreign keys are dropped (in this scratch database only) and a
second run gets the same. Prints the median milliseconds per batch of each (the first 10
batches left out), as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.compare_queries import throwaway_postgres, value  # noqa: E402
from benchmarks.ingest_compare import seed_runs  # noqa: E402


def ingest_ms(url: str, run_id: str, batches: int, size: int) -> float:
    from kdlab.backend.db.engine import make_engine, make_session_factory
    from kdlab.backend.schemas.metrics import MetricPointIn
    from kdlab.backend.services import metrics
    from kdlab.backend.settings import Settings

    settings = Settings(
        database_url=url,
        data_dir=Path(tempfile.gettempdir()),
        executor="none",
        mlflow_tracking_uri="none",
    )
    engine = make_engine(url)
    factory = make_session_factory(engine)
    times = []
    for b in range(batches):
        batch = [
            MetricPointIn.model_construct(key="train/loss", step=s, value=value(0, 0, s), time=s)
            for s in range(b * size, (b + 1) * size)
        ]
        began = time.perf_counter()
        with factory() as session:
            metrics.ingest(session, settings, run_id, batch)
        times.append(time.perf_counter() - began)
        if b == 5:  # statistics, as autovacuum gathers them within a minute
            with engine.begin() as connection:
                connection.exec_driver_sql("ANALYZE")
    engine.dispose()
    return statistics.median(times[10:]) * 1000


def drop_foreign_keys(url: str) -> list[str]:
    from kdlab.backend.db.engine import make_engine

    engine = make_engine(url)
    dropped = []
    with engine.begin() as connection:
        for table in ("metrics", "metric_rollups"):
            names = connection.exec_driver_sql(
                "SELECT conname FROM pg_constraint "
                f"WHERE conrelid = '{table}'::regclass AND contype = 'f'"
            ).scalars()
            for name in list(names):
                connection.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
                dropped.append(name)
    engine.dispose()
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    with throwaway_postgres("kdlab_floor") as (url, version):
        with_keys, without_keys = seed_runs(url, 2)
        with_ms = ingest_ms(url, with_keys, args.batches, args.batch)
        dropped = drop_foreign_keys(url)
        without_ms = ingest_ms(url, without_keys, args.batches, args.batch)
    print(
        json.dumps(
            {
                "postgres": version,
                "batch": args.batch,
                "median_ms_per_batch": round(with_ms, 2),
                "without_foreign_keys_ms": round(without_ms, 2),
                "dropped": dropped,
            }
        )
    )


if __name__ == "__main__":
    main()
