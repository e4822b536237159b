"""Metric ingest and compare latency: KD Lab's REST API vs an MLflow tracking server, one run.

    python benchmarks/ingest_compare.py [--runs 10] [--points 100000] [--batch 1000]
        [--max-points 1000] [--repeats 7] [--postgres-url postgresql+psycopg://...]
        [--postgres] [--no-mlflow] [--mlflow-log-points 30000] [--mlflow-history-runs 3]
        [--mirror]

(a) ingest: one client posts `runs × points` points in batches of `batch` to
    `POST /api/runs/{id}/metrics` of a real `uvicorn kdlab.backend.main:create_app` on loopback
    (SQLite; PostgreSQL too with `--postgres-url`, an empty database the script migrates, or
    `--postgres`, a throwaway server the script starts and stops);
    building and JSON-encoding each batch is inside the timing, as in a worker.
(b) compare: `GET /api/compare` for all runs × one key, downsampled to `max-points` per
    series; median wall time over `repeats` calls after one warm-up.
(c) MLflow (`pip install mlflow`; not a project dependency): `mlflow server` on loopback with a
    SQLite backend store, started here and stopped by its PID. `MlflowClient.log_batch` through it
    (`mlflow-log-points` points, 1,000 per call, as MLflow allows), and `get_metric_history` for
    `mlflow-history-runs` runs of `points` points each, through the server (REST, what a UI or a
    script does) and in-process (`SqlAlchemyStore`). Those runs are filled in-process with
    `log_batch` (MLflow's server takes ~1 ms per point, so filling 10×100k through it would take
    far longer than the rest of the benchmark); the time for all `runs` runs is the measured
    per-run median × `runs`, marked `"extrapolated": true` when fewer runs were measured.

(d) `--mirror`: the server as a user runs it by default, with the MLflow mirror on (its own
    process, `kdlab.backend.mlflow.process`, into the default `sqlite:///<data>/mlflow.db`,
    whose tables are created before the timing, as MLflow's in (e) are). Besides the ingest rate:
    the time until the outbox is empty (from the first point posted, and after the last one was
    acknowledged), every point then checked in MLflow exactly once (`get_metric_history`), and
    (e) MLflow's own in-process `SqlAlchemyStore.log_batch` (1,000 a call) of the same points
    into a fresh SQLite store: the mirror's target is ≤ 1.5× that time.

Prints one JSON line per measurement, then a summary line with the ratios (DESIGN §8 targets:
ingest ≥ 20× MLflow log_batch through its server; compare for 10×100k ≤ 150 ms and ≥ 200×
faster than get_metric_history).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KEY = "train/loss_total"
T0 = 1_763_900_000.0


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def curve(run: int, step: int) -> float:
    """A loss-like curve with deterministic noise (no numpy needed to reproduce it)."""
    noise = math.sin(step * 12.9898 + run * 78.233) * 43758.5453
    return 2.0 * math.exp(-step / 30_000) + 0.1 + 0.05 * (noise - math.floor(noise))


def wait_http(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up; log:\n{log.read_text()[-4000:]}")
        time.sleep(0.25)


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], health: str, log: Path, timeout: float):
    """Start `command` in its own process group, wait for `health`, stop it by its PID."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_http(health, process, timeout, log)
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # its group: the PID we started
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


# --- KD Lab -------------------------------------------------------------------------------


def seed_runs(database_url: str, count: int) -> list[str]:
    from kdlab.backend.db.engine import make_engine, make_session_factory
    from kdlab.backend.db.migrate import upgrade
    from kdlab.backend.db.models import Experiment, Run

    engine = make_engine(database_url)
    upgrade(engine)
    with make_session_factory(engine)() as session:
        experiment = Experiment(name=f"bench-{time.time_ns()}")
        session.add(experiment)
        session.flush()
        runs = [
            Run(
                experiment_id=experiment.id,
                name=f"bench-{i}",
                kind="external",
                status="running",
                config={"name": f"bench-{i}"},
            )
            for i in range(count)
        ]
        session.add_all(runs)
        session.commit()
        ids = [run.id for run in runs]
    engine.dispose()
    return ids


def kdlab_server(database_url: str, data_dir: Path, log: Path, mirror: bool = False):
    port = free_port()
    env = {
        **os.environ,
        "KDLAB_DATABASE_URL": database_url,
        "KDLAB_DATA_DIR": str(data_dir),
        "KDLAB_EXECUTOR": "none",
        "KDLAB_HOST": "127.0.0.1",
    }
    if not mirror:
        # the API alone (pass --mirror for the server as run by default: the mirror on, in
        # its own process, replaying every point into MLflow)
        env["KDLAB_MLFLOW_TRACKING_URI"] = "none"
    env.pop("KDLAB_TOKEN", None)
    command = [sys.executable, "-m", "uvicorn", "--factory", "kdlab.backend.main:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    base = f"http://127.0.0.1:{port}"
    return base, running(command, env, f"{base}/api/health", log, timeout=60)


def kdlab_ingest(base: str, run_ids: list[str], points: int, batch: int) -> float:
    """Seconds to post every point of every run, one client, one batch after the other."""
    with httpx.Client(base_url=base, timeout=120) as client:
        began = time.perf_counter()
        for r, run_id in enumerate(run_ids):
            for start in range(0, points, batch):
                body = {
                    "points": [
                        {"key": KEY, "step": s, "value": curve(r, s), "time": T0 + s * 0.1}
                        for s in range(start, min(start + batch, points))
                    ]
                }
                response = client.post(
                    f"/api/runs/{run_id}/metrics",
                    content=json.dumps(body),
                    headers={"content-type": "application/json"},
                )
                response.raise_for_status()
        return time.perf_counter() - began


def timed_median(call: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    call()  # warm-up: connection, statement caches, page cache
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times), times


def kdlab_compare(
    base: str, run_ids: list[str], max_points: int, repeats: int, x: str
) -> tuple[float, list[float], dict[str, Any]]:
    params = {"runs": ",".join(run_ids), "keys": KEY, "max_points": max_points, "x": x}
    answer: dict[str, Any] = {}
    with httpx.Client(base_url=base, timeout=120) as client:

        def call() -> None:
            response = client.get("/api/compare", params=params)
            response.raise_for_status()
            answer["body"] = response.json()

        median, times = timed_median(call, repeats)
    series = answer["body"]["series"]
    shape = {
        "series": len(series),
        "buckets_per_series": sorted({len(s["step"]) for s in series}),
        "bytes": len(json.dumps(answer["body"])),
    }
    assert len(series) == len(run_ids) and all(len(s["step"]) <= max_points for s in series)
    return median, times, shape


def wait_log(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r} in {log} within {timeout} s")
        time.sleep(0.1)


def pending_outbox(database_url: str) -> int:
    from sqlalchemy import text

    from kdlab.backend.db.engine import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            count = connection.scalar(
                text("SELECT count(*) FROM mlflow_outbox WHERE done_at IS NULL")
            )
    finally:
        engine.dispose()
    return int(count or 0)


def wait_caught_up(database_url: str, timeout: float) -> float:
    """Seconds until the mirror left no outbox row pending."""
    began = time.perf_counter()
    while pending_outbox(database_url):
        if time.perf_counter() - began > timeout:
            raise RuntimeError(f"the mirror did not catch up within {timeout} s")
        time.sleep(0.2)
    return time.perf_counter() - began


def mlflow_store_uri(data_dir: Path) -> str:
    return f"sqlite:///{data_dir.resolve() / 'mlflow.db'}"  # the server's default


def prepare_mlflow_store(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments()  # creates MLflow's tables


def check_mirrored(database_url: str, uri: str, run_ids: list[str], points: int) -> dict:
    """Every point of every run in MLflow exactly once (steps 0..points-1, one point each)."""
    from mlflow.tracking import MlflowClient
    from sqlalchemy import select

    from kdlab.backend.db.engine import make_engine, make_session_factory
    from kdlab.backend.db.models import Run

    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        mapped = {
            row.id: row.mlflow_run_id
            for row in session.execute(select(Run.id, Run.mlflow_run_id).where(Run.id.in_(run_ids)))
        }
    engine.dispose()
    client = MlflowClient(tracking_uri=uri)
    total = duplicates = missing = 0
    for run_id in run_ids:
        steps = [m.step for m in client.get_metric_history(mapped[run_id], KEY)]
        total += len(steps)
        duplicates += len(steps) - len(set(steps))
        missing += len(set(range(points)) - set(steps))
    return {"points_in_mlflow": total, "duplicates": duplicates, "missing": missing}


def mlflow_in_process_log_batch(run_count: int, points: int, work: Path) -> float:
    """Seconds MLflow's own `SqlAlchemyStore.log_batch` (1,000 a call) takes for the same
    points into a fresh SQLite store (its tables created before the timing)."""
    from mlflow.entities import Metric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{work / 'mlflow-log-batch.db'}", str(work / "mlruns-lb"))
    experiment = store.create_experiment(f"bench-{time.time_ns()}")
    runs = [
        store.create_run(experiment, "bench", 0, [], f"r{i}").info.run_id for i in range(run_count)
    ]
    began = time.perf_counter()
    for r, run in enumerate(runs):
        for start in range(0, points, 1000):
            metrics = [
                Metric(KEY, curve(r, s), int((T0 + s * 0.1) * 1000), s)
                for s in range(start, min(start + 1000, points))
            ]
            store.log_batch(run, metrics=metrics, params=[], tags=[])
    return time.perf_counter() - began


def analyze(database_url: str) -> None:
    from sqlalchemy import text

    from kdlab.backend.db.engine import make_engine

    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("ANALYZE metrics"))
    engine.dispose()


def bench_kdlab(label: str, database_url: str, args: argparse.Namespace, work: Path) -> dict:
    run_ids = seed_runs(database_url, args.runs)
    data, log = work / f"data-{label}", work / f"kdlab-{label}.log"
    uri = mlflow_store_uri(data)
    if args.mirror:
        prepare_mlflow_store(uri)
    base, server = kdlab_server(database_url, data, log, mirror=args.mirror)
    total = args.runs * args.points
    with server:
        if args.mirror:  # start-up ends when the mirror process has MLflow open
            wait_log(log, "MLflow mirror ready", 120)
        seconds = kdlab_ingest(base, run_ids, args.points, args.batch)
        ingest = total / seconds
        emit(
            measurement="ingest",
            system="kdlab",
            database=label,
            mirror="process (default)" if args.mirror else "off",
            points=total,
            batch=args.batch,
            clients=1,
            seconds=round(seconds, 2),
            points_per_s=round(ingest),
        )
        results = {"ingest_points_per_s": ingest}
        if args.mirror:
            lag = wait_caught_up(database_url, args.mirror_timeout)
            results |= {"mirror_lag_s": lag, "mirror_total_s": seconds + lag}
        if label == "postgresql":
            # what autovacuum does within a minute of a bulk load: without statistics the
            # planner guesses the group count and may sort on disk instead of hashing
            analyze(database_url)
            emit(measurement="analyze", database=label, note="ANALYZE metrics before compare")
        for x in ("step", "time"):
            median, times, shape = kdlab_compare(base, run_ids, args.max_points, args.repeats, x)
            emit(
                measurement="compare",
                system="kdlab",
                database=label,
                x=x,
                runs=args.runs,
                points_per_run=args.points,
                max_points=args.max_points,
                median_ms=round(median * 1000, 1),
                all_ms=[round(t * 1000, 1) for t in times],
                **shape,
            )
            results[f"compare_{x}_s"] = median
    if args.mirror:
        check = check_mirrored(database_url, uri, run_ids, args.points)
        baseline = mlflow_in_process_log_batch(args.runs, args.points, work)
        results |= {"mlflow_log_batch_s": baseline, **check}
        emit(
            measurement="mirror",
            database=label,
            points=total,
            caught_up_after_first_point_s=round(results["mirror_total_s"], 2),
            caught_up_after_last_ack_s=round(results["mirror_lag_s"], 2),
            mlflow_in_process_log_batch_s=round(baseline, 2),
            mlflow_in_process_log_batch_points_per_s=round(total / baseline),
            ratio_to_mlflow_log_batch=round(results["mirror_total_s"] / baseline, 2),
            target_1_5x_met=results["mirror_total_s"] <= 1.5 * baseline,
            **check,
            exactly_once=check["points_in_mlflow"] == total and not check["duplicates"],
        )
    return results


# --- MLflow -------------------------------------------------------------------------------


def bench_mlflow(args: argparse.Namespace, work: Path) -> dict:
    from mlflow.entities import Metric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    store_uri = f"sqlite:///{work / 'mlflow.db'}"
    port = free_port()
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [mlflow_bin, "server", "--backend-store-uri", store_uri]
    command += ["--default-artifact-root", str(work / "mlflow-artifacts")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    base = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}

    def metrics(run: int, start: int, stop: int) -> list[Metric]:
        return [
            Metric(KEY, curve(run, s), int((T0 + s * 0.1) * 1000), s) for s in range(start, stop)
        ]

    started = time.perf_counter()
    with running(command, dict(os.environ), f"{base}/health", work / "mlflow.log", timeout=240):
        emit(measurement="mlflow_server_start", seconds=round(time.perf_counter() - started, 1))
        client = MlflowClient(tracking_uri=base)
        experiment = client.create_experiment(f"bench-{time.time_ns()}")

        # (c1) log_batch through the server
        run_id = client.create_run(experiment).info.run_id
        began = time.perf_counter()
        for start in range(0, args.mlflow_log_points, 1000):
            client.log_batch(
                run_id, metrics=metrics(0, start, min(start + 1000, args.mlflow_log_points))
            )
        seconds = time.perf_counter() - began
        results["ingest_points_per_s"] = args.mlflow_log_points / seconds
        emit(
            measurement="ingest",
            system="mlflow",
            path="MlflowClient.log_batch via mlflow server (REST)",
            points=args.mlflow_log_points,
            batch=1000,
            clients=1,
            seconds=round(seconds, 2),
            points_per_s=round(results["ingest_points_per_s"]),
        )

        # (c2) get_metric_history, runs of `points` points each
        store = SqlAlchemyStore(store_uri, str(work / "mlflow-artifacts"))
        history_runs = [
            client.create_run(experiment).info.run_id for _ in range(args.mlflow_history_runs)
        ]
        began = time.perf_counter()
        for r, history_run in enumerate(history_runs):
            for start in range(0, args.points, 1000):
                store.log_batch(
                    history_run,
                    metrics=metrics(r, start, min(start + 1000, args.points)),
                    params=[],
                    tags=[],
                )
        fill = time.perf_counter() - began
        emit(
            measurement="mlflow_fill",
            path="SqlAlchemyStore.log_batch in-process",
            points=args.points * len(history_runs),
            seconds=round(fill, 1),
            points_per_s=round(args.points * len(history_runs) / fill),
        )
        for path, history in (
            ("rest", client.get_metric_history),
            ("in_process", store.get_metric_history),
        ):
            per_run = []
            for history_run in history_runs:
                began = time.perf_counter()
                got = history(history_run, KEY)
                per_run.append(time.perf_counter() - began)
                assert len(got) == args.points, (len(got), args.points)
            median = statistics.median(per_run)
            total = median * args.runs
            results[f"history_{path}_s"] = total
            emit(
                measurement="compare",
                system="mlflow",
                path=f"get_metric_history ({path})",
                points_per_run=args.points,
                runs_measured=len(history_runs),
                per_run_ms=[round(t * 1000) for t in per_run],
                median_per_run_ms=round(median * 1000),
                runs=args.runs,
                total_ms=round(total * 1000),
                extrapolated=len(history_runs) != args.runs,
                points_per_s=round(args.points / median),
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--points", type=int, default=100_000, help="points per run")
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--max-points", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=7)
    postgres = parser.add_mutually_exclusive_group()
    postgres.add_argument("--postgres-url", help="an empty PostgreSQL database to measure too")
    postgres.add_argument(
        "--postgres",
        action="store_true",
        help="measure PostgreSQL too, on a throwaway server this script starts and stops "
        "(compare_queries.throwaway_postgres)",
    )
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="the server as run by default, MLflow mirror on: ingest rate, catch-up time, "
        "exactly-once check, and MLflow's in-process log_batch of the same points",
    )
    parser.add_argument("--mirror-timeout", type=float, default=1800.0)
    parser.add_argument("--mlflow-log-points", type=int, default=30_000)
    parser.add_argument("--mlflow-history-runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory, removed")
    args = parser.parse_args()
    if args.postgres:
        from benchmarks.compare_queries import throwaway_postgres  # it imports this module

        with throwaway_postgres("kdlab_ingest_bench") as (url, version):
            emit(measurement="postgres", version=version, owned_by_script=True)
            args.postgres_url = url
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdlab-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    emit(
        measurement="environment",
        cpu=cpu_model(),
        cores=os.cpu_count(),
        loadavg_start=list(os.getloadavg()),
        python=platform.python_version(),
        **{
            name: package_version(name)
            for name in ("fastapi", "sqlalchemy", "uvicorn", "pydantic", "psycopg", "mlflow")
        },
        command=" ".join([Path(sys.executable).name, *sys.argv]),
    )
    try:
        kdlab = {"sqlite": bench_kdlab("sqlite", f"sqlite:///{work / 'kdlab.db'}", args, work)}
        if args.postgres_url:
            kdlab["postgresql"] = bench_kdlab("postgresql", args.postgres_url, args, work)
        mlflow = None if args.no_mlflow else bench_mlflow(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    summary: dict[str, Any] = {"measurement": "summary", "loadavg_end": list(os.getloadavg())}
    for database, ours in kdlab.items():
        row: dict[str, Any] = {
            "ingest_points_per_s": round(ours["ingest_points_per_s"]),
            **(
                {
                    "ingest_target_40k_met": ours["ingest_points_per_s"] >= 40_000,
                    "mirror_caught_up_s": round(ours["mirror_total_s"], 1),
                    "mlflow_in_process_log_batch_s": round(ours["mlflow_log_batch_s"], 1),
                    "mirror_vs_log_batch": round(
                        ours["mirror_total_s"] / ours["mlflow_log_batch_s"], 2
                    ),
                    "mirror_target_1_5x_met": ours["mirror_total_s"]
                    <= 1.5 * ours["mlflow_log_batch_s"],
                    "exactly_once": ours["points_in_mlflow"] == args.runs * args.points
                    and not ours["duplicates"],
                }
                if args.mirror
                else {}
            ),
            "compare_ms": round(ours["compare_step_s"] * 1000, 1),
            "compare_target_150ms_met": ours["compare_step_s"] <= 0.150,
        }
        if mlflow is not None:
            ingest_ratio = ours["ingest_points_per_s"] / mlflow["ingest_points_per_s"]
            rest_ratio = mlflow["history_rest_s"] / ours["compare_step_s"]
            local_ratio = mlflow["history_in_process_s"] / ours["compare_step_s"]
            row |= {
                "ingest_vs_mlflow_log_batch": round(ingest_ratio, 1),
                "ingest_target_20x_met": ingest_ratio >= 20,
                "compare_vs_mlflow_history_rest": round(rest_ratio, 1),
                "compare_vs_mlflow_history_in_process": round(local_ratio, 1),
                "compare_target_200x_met": local_ratio >= 200,
            }
        summary[database] = row
    emit(**summary)


if __name__ == "__main__":
    main()
