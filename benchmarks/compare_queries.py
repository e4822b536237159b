"""Chart-query latency of `GET /api/compare` at every width, both x axes, zoomed and not.

    python benchmarks/compare_queries.py [--runs 10] [--points 100000]
        [--sweep-runs 100] [--sweep-points 10000] [--sweep-keys 4]
        [--wide-keys 20] [--wide-points 100000] [--repeats 5]
        [--postgres | --postgres-url postgresql+psycopg://...]
        [--no-mlflow] [--mlflow-server-repeats 1] [--slow-s 10]

Fills a fresh SQLite database in a temporary data dir (and a PostgreSQL one: with `--postgres`
a throwaway PostgreSQL 15 server owned by the script, `initdb -A trust` in a temporary dir, run
as the `postgres` user and stopped with `pg_ctl stop` at the end, even on error; with
`--postgres-url` that empty database) in-process through the service's own ingest
(`kdlab.backend.services.metrics.ingest`, batches of 10,000 points: the same rows and roll-ups
as the REST API writes, without the JSON), then starts a real
`uvicorn --factory kdlab.backend.main:create_app` on loopback and times `GET /api/compare`:
the median of `repeats` calls after one warm-up, each timed until the answer's last byte has
arrived (decoding the JSON is left to the client, outside the timing) (only the warm-up, marked `warm_up_only`, when
it took over `slow-s` seconds). On PostgreSQL the script runs `ANALYZE`
before the timing (what autovacuum does within a minute of a bulk load).

- `runs` runs × `points` points of one key, `max_points` in {200, 500, 1000, 2000, 4000},
  `x=step` and `x=time`, the whole range and a 5% zoom window (the middle 5% of the steps, or
  of the time range);
- `sweep-runs` runs × `sweep-points` points × `sweep-keys` keys, `max_points=1000`;
- one run × `wide-keys` keys × `wide-points` points, `max_points=1000`.

MLflow baseline (`pip install mlflow`, not a project dependency; skip with `--no-mlflow`): the
same `runs` × `points` points (same values, times as int ms) are logged into a fresh MLflow
SQLite store in-process with `SqlAlchemyStore.log_batch`, 1,000 metrics a call (as MLflow
allows), then `get_metric_history` is timed for all `runs` runs in-process (the median of
`repeats` full passes after one warm-up pass) and through a real `mlflow server` on that store via
`MlflowClient`, started here and stopped by its PID (the median of `mlflow-server-repeats` full
passes after one run's history as warm-up; 0 skips it: a pass is ~10x the in-process one). That is
what a script needs to draw the same chart from MLflow (its UI samples; the API returns the full
history). Every one-key case then carries `vs_mlflow_in_process` (MLflow's time / ours) and
whether it is ≥ 200×, the target, measured against the in-process store (the faster of the two).

Prints one JSON line per measurement (median_ms, all times, the answer's shape) and a summary:
per database the slowest case, the cases over 150 ms, the smallest MLflow ratio and the cases
under 200×.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from sqlalchemy import Engine

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.ingest_compare import (  # noqa: E402
    cpu_model,
    emit,
    free_port,
    kdlab_server,
    package_version,
    running,
    seed_runs,
)

KEY = "train/loss_total"
T0 = 1_763_900_000.0
DT = 0.1  # seconds per step
BATCH = 10_000
WIDTHS = (200, 500, 1000, 2000, 4000)
MLFLOW_BATCH = 1000  # the most metrics MLflow takes in one log_batch call
PG_BIN = Path(os.environ.get("KDLAB_PG_BIN", "/usr/lib/postgresql/15/bin"))
TARGET_S = 0.150  # one-key cases and the wide run page
SWEEP_TARGET_S = 0.400
TARGET_RATIO = 200.0


def value(run: int, key: int, step: int) -> float:
    """A loss-like curve with deterministic noise and a rare spike."""
    noise = math.sin(step * 12.9898 + run * 78.233 + key * 3.1) * 43758.5453
    spike = 10.0 if step % 9973 == 0 else 0.0
    return 2.0 * math.exp(-step / 30_000) + 0.1 + 0.05 * (noise - math.floor(noise)) + spike


def fill(database_url: str, run_ids: list[str], keys: list[str], points: int) -> tuple[float, int]:
    """Ingest every point in-process; returns the seconds it took and the ANALYZEs run.

    On PostgreSQL the planner's statistics are refreshed (`ANALYZE`) each time the points filled
    double (10k, 20k, 40k, ...), as autovacuum does on a live server: with the statistics of a
    near-empty table, the roll-up refresh of each batch gets slower with the run's length
    (measured: 1.2 s for the first 10,000 points of a run, 14 s for the tenth)."""
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
    postgres = engine.dialect.name == "postgresql"
    filled, next_analyze, analyses = 0, BATCH, 0
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
            filled += len(batch)
            if postgres and filled >= next_analyze:
                analyze(engine)
                analyses, next_analyze = analyses + 1, 2 * filled
    elapsed = time.perf_counter() - began
    engine.dispose()
    return elapsed, analyses


def analyze(engine: Engine) -> None:
    """`ANALYZE` every table (PostgreSQL): the statistics autovacuum gathers after a bulk load."""
    from sqlalchemy import text

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE"))


# --- a throwaway PostgreSQL server (as tests/conftest.py starts one) ------------------------


def as_postgres(*command: str | Path) -> str:
    """Run a PostgreSQL binary as the `postgres` user (initdb refuses root); its stdout."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    try:
        done = subprocess.run(
            [*prefix, *map(str, command)], check=True, capture_output=True, text=True
        )
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{error.stderr}") from error
    return done.stdout


@contextlib.contextmanager
def throwaway_postgres(database: str = "kdlab_bench") -> Iterator[tuple[str, str]]:
    """Start a PostgreSQL server on a free loopback port in a temporary dir, create
    `database`; yields (its SQLAlchemy URL, the server version); stops it with `pg_ctl stop`
    and removes the dir on the way out, error or not."""
    if not (PG_BIN / "initdb").exists():
        raise SystemExit(f"--postgres: no initdb in {PG_BIN} (apt-get install postgresql-15)")
    from sqlalchemy import text

    from kdlab.backend.db.engine import make_engine

    root = Path(tempfile.mkdtemp(prefix="kdlab-bench-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    starting = False
    try:
        as_postgres(PG_BIN / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        starting = True
        as_postgres(PG_BIN / "pg_ctl", "-D", data, "-o", options, "-l", root / "log", "start", "-w")
        base = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
        admin = make_engine(f"{base}/postgres").execution_options(isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{database}"'))
            server_version = str(connection.scalar(text("SHOW server_version")))
        admin.dispose()
        yield f"{base}/{database}", server_version
    finally:
        # interrupted during `pg_ctl start`, the server may still be writing its pid file
        pid_file, deadline = data / "postmaster.pid", time.monotonic() + 10
        while starting and not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_file.exists():
            with contextlib.suppress(RuntimeError):
                as_postgres(PG_BIN / "pg_ctl", "-D", data, "stop", "-m", "fast", "-w")
        shutil.rmtree(root, ignore_errors=True)


# --- MLflow: the same points, the full history of every run --------------------------------


def mlflow_baseline(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Log the one-key data into a fresh MLflow SQLite store in-process, then time
    `get_metric_history` for all runs (in-process, and through `mlflow server` unless
    `--mlflow-server-repeats 0`); returns the median seconds of a full pass per path."""
    from mlflow.entities import Metric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    store_uri = f"sqlite:///{work / 'mlflow.db'}"
    artifacts = work / "mlflow-artifacts"
    store = SqlAlchemyStore(store_uri, str(artifacts))
    experiment = store.create_experiment(f"bench-{time.time_ns()}")
    run_ids = [
        store.create_run(experiment, "bench", 0, [], f"bench-{r}").info.run_id
        for r in range(args.runs)
    ]
    began = time.perf_counter()
    for r, run_id in enumerate(run_ids):
        for start in range(0, args.points, MLFLOW_BATCH):
            metrics = [
                Metric(KEY, value(r, 0, s), int((T0 + s * DT) * 1000), s)
                for s in range(start, min(start + MLFLOW_BATCH, args.points))
            ]
            store.log_batch(run_id, metrics=metrics, params=[], tags=[])
    seconds = time.perf_counter() - began
    total = args.runs * args.points
    emit(
        mlflow_fill="SqlAlchemyStore.log_batch in-process (SQLite)",
        points=total,
        batch=MLFLOW_BATCH,
        seconds=round(seconds, 1),
        points_per_s=round(total / seconds),
    )

    def full_pass(history: Any) -> None:
        for run_id in run_ids:
            got = history(run_id, KEY)
            assert len(got) == args.points, (len(got), args.points)

    results: dict[str, float] = {}

    def record(path: str, history: Any, repeats: int, warm_up: Callable[[], Any]) -> None:
        warm_up()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            full_pass(history)
            times.append(time.perf_counter() - began)
        median = statistics.median(times)
        results[path] = median
        emit(
            mlflow_history=path,
            runs=args.runs,
            points_per_run=args.points,
            passes=repeats,
            median_ms=round(median * 1000, 1),
            times_ms=[round(t * 1000, 1) for t in times],
            per_run_ms=round(median * 1000 / args.runs, 1),
            points_per_s=round(total / median),
        )

    # in-process: a full pass to warm up, as `timed` does for KD Lab's calls
    record(
        "in_process",
        store.get_metric_history,
        args.repeats,
        lambda: full_pass(store.get_metric_history),
    )
    store.engine.dispose()
    if args.mlflow_server_repeats > 0:
        port = free_port()
        mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        command = [mlflow_bin, "server", "--backend-store-uri", store_uri]
        command += ["--default-artifact-root", str(artifacts)]
        command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        base = f"http://127.0.0.1:{port}"
        with running(command, dict(os.environ), f"{base}/health", work / "mlflow.log", 240):
            rest = MlflowClient(tracking_uri=base).get_metric_history
            # REST is ~10x slower than in-process (~60 s a pass at 10x100k on 2 cores): one
            # run's history warms the server up, then `--mlflow-server-repeats` full passes
            record("rest", rest, args.mlflow_server_repeats, lambda: rest(run_ids[0], KEY))
    return results


# --- KD Lab -------------------------------------------------------------------------------


def timed(call: Callable[[], Any], repeats: int, slow_s: float) -> tuple[float, list[float], bool]:
    """`timed_median`, except that a warm-up call over `slow_s` seconds is the only sample
    (returns True then): a case 100x over its target needs no median to show it."""
    began = time.perf_counter()
    call()
    warm_up = time.perf_counter() - began
    if warm_up > slow_s:
        return warm_up, [warm_up], True
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times), times, False


def measure(
    client: httpx.Client,
    label: str,
    params: dict[str, Any],
    args: argparse.Namespace,
    mlflow: dict[str, float] | None = None,
    **extra: Any,
) -> float:
    answer: dict[str, Any] = {}

    def call() -> None:
        # timed until the answer's last byte has arrived; decoding it (a browser's native
        # JSON.parse, here Python's json) is the client's work and stays outside
        response = client.get("/api/compare", params=params)
        response.raise_for_status()
        answer["response"] = response

    median, times, slow = timed(call, args.repeats, args.slow_s)
    if slow:
        extra["warm_up_only"] = True  # over --slow-s: the warm-up call is the one sample
    series = answer["response"].json()["series"]
    ratios: dict[str, Any] = {}
    if mlflow:
        for path, seconds in mlflow.items():
            ratios[f"vs_mlflow_{path}"] = round(seconds / median, 1)
        ratios["target_200x_met"] = mlflow["in_process"] / median >= TARGET_RATIO
    emit(
        case=label,
        **extra,
        median_ms=round(median * 1000, 1),
        times_ms=[round(t * 1000, 1) for t in times],
        series=len(series),
        buckets=sorted({len(s["step"]) for s in series})[-3:],
        points=sum(s["points"] for s in series),
        **ratios,
    )
    return median


def bench(
    label: str,
    database_url: str,
    args: argparse.Namespace,
    work: Path,
    mlflow: dict[str, float] | None,
) -> dict[str, dict[str, float]]:
    """Fill `database_url`, time every case; returns {"one_key": {case: s}, "sweep": ...}."""
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
        seconds, analyses = fill(database_url, ids, keys, points)
        total = len(ids) * len(keys) * points
        emit(
            db=label, fill=name, points=total, seconds=round(seconds, 1),
            points_per_s=round(total / seconds), analyze_during_fill=analyses,
        )  # fmt: skip
    if database_url.startswith("postgresql"):
        from kdlab.backend.db.engine import make_engine

        engine = make_engine(database_url)
        analyze(engine)
        engine.dispose()
        emit(db=label, note="ANALYZE before the timing")
    results: dict[str, dict[str, float]] = {"one_key": {}, "sweep": {}, "wide": {}}
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
                    results["one_key"][name] = measure(
                        client, "one_key", params, args, mlflow, db=label, x=x,
                        window=window, max_points=width,
                    )  # fmt: skip
        params = {"runs": ",".join(sweep), "keys": ",".join(sweep_keys), "max_points": 1000}
        name = f"{args.sweep_runs}x{args.sweep_keys} keys x{args.sweep_points}"
        results["sweep"][name] = measure(client, "sweep", params, args, db=label)
        params = {"runs": wide, "keys": ",".join(wide_keys), "max_points": 1000}
        name = f"1x{args.wide_keys} keys x{args.wide_points}"
        results["wide"][name] = measure(client, "wide", params, args, db=label)
    return results


def summarize(results: dict[str, dict[str, float]], mlflow: dict[str, float] | None) -> dict:
    one_key = results["one_key"]
    slowest = max(one_key, key=lambda name: one_key[name])
    row: dict[str, Any] = {
        "cases": len(one_key),
        "slowest": slowest,
        "slowest_ms": round(one_key[slowest] * 1000, 1),
        "over_150ms": [name for name, s in one_key.items() if s > TARGET_S],  # measured order
    }
    for kind, target in (("sweep", SWEEP_TARGET_S), ("wide", TARGET_S)):
        ((name, seconds),) = results[kind].items()
        row[kind] = name
        row[f"{kind}_ms"] = round(seconds * 1000, 1)
        row[f"{kind}_target_{round(target * 1000)}ms_met"] = seconds <= target
    if mlflow:
        for path, history in mlflow.items():
            ratios = {name: history / s for name, s in one_key.items()}
            smallest = min(ratios, key=lambda name: ratios[name])
            row[f"min_vs_mlflow_{path}"] = round(ratios[smallest], 1)
            row[f"min_vs_mlflow_{path}_case"] = smallest
            if path == "in_process":
                row["under_200x"] = [name for name, ratio in ratios.items() if ratio < TARGET_RATIO]
    row["targets_met"] = (
        not row["over_150ms"]
        and row["sweep_target_400ms_met"]
        and row["wide_target_150ms_met"]
        and (not mlflow or not row["under_200x"])
    )
    return row


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
    postgres = parser.add_mutually_exclusive_group()
    postgres.add_argument(
        "--postgres",
        action="store_true",
        help=f"start a throwaway PostgreSQL server ({PG_BIN}) and measure it too",
    )
    postgres.add_argument("--postgres-url", help="an empty PostgreSQL database to fill as well")
    parser.add_argument(
        "--slow-s",
        type=float,
        default=10.0,
        help="a case whose warm-up call takes longer is not repeated (its one time is reported)",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="skip the MLflow baseline")
    parser.add_argument(
        "--mlflow-server-repeats",
        type=int,
        default=1,
        help="full passes of get_metric_history through `mlflow server` (0: in-process only)",
    )
    args = parser.parse_args()
    if not args.no_mlflow and package_version("mlflow") is None:
        parser.error("the MLflow baseline needs `pip install mlflow` (or pass --no-mlflow)")
    # a SIGTERM unwinds like Ctrl-C: the servers this script started are stopped
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, _: sys.exit(128 + signum))

    began = time.perf_counter()
    emit(
        machine=cpu_model(),
        cores=os.cpu_count(),
        loadavg_start=list(os.getloadavg()),
        python=platform.python_version(),
        sqlite=__import__("sqlite3").sqlite_version,
        **{
            name: package_version(name)
            for name in ("fastapi", "sqlalchemy", "uvicorn", "psycopg", "mlflow")
        },
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        args=vars(args),
    )
    summary: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="kdlab-compare-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        mlflow = None
        if not args.no_mlflow:
            mlflow = mlflow_baseline(args, work)
            summary["mlflow"] = {
                "version": package_version("mlflow"),
                "store": "SQLite",
                **{
                    f"history_{path}_ms": round(seconds * 1000, 1)
                    for path, seconds in mlflow.items()
                },
            }
        targets = [("sqlite", f"sqlite:///{work / 'kdlab.db'}")]
        if args.postgres:
            url, server_version = stack.enter_context(throwaway_postgres())
            emit(postgres=server_version, bin=str(PG_BIN), owned_by_script=True)
            targets.append(("postgres", url))
        elif args.postgres_url:
            targets.append(("postgres", args.postgres_url))
        for label, url in targets:
            summary[label] = summarize(bench(label, url, args, work, mlflow), mlflow)
    emit(
        summary=summary,
        loadavg_end=list(os.getloadavg()),
        wall_s=round(time.perf_counter() - began, 1),
    )


if __name__ == "__main__":
    main()
