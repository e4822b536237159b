"""Metric ingest and compare latency: KD Lab's REST API vs an MLflow tracking server, one run.

    python benchmarks/ingest_compare.py [--runs 10] [--points 100000] [--batch 1000]
        [--max-points 1000] [--repeats 7] [--postgres-url postgresql+psycopg://...]
        [--no-mlflow] [--mlflow-log-points 30000] [--mlflow-history-runs 3]

(a) ingest: one client posts `runs × points` points in batches of `batch` to
    `POST /api/runs/{id}/metrics` of a real `uvicorn kdlab.backend.main:create_app` on loopback
    (SQLite; PostgreSQL too with `--postgres-url`, an empty database the script migrates);
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
        # the API alone: with the mirror on, its thread replays every point into MLflow on
        # the same 2 cores during the measurement (pass --mirror to measure that too)
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
    base, server = kdlab_server(database_url, data, log, mirror=args.mirror)
    with server:
        total = args.runs * args.points
        seconds = kdlab_ingest(base, run_ids, args.points, args.batch)
        ingest = total / seconds
        emit(
            measurement="ingest",
            system="kdlab",
            database=label,
            points=total,
            batch=args.batch,
            clients=1,
            seconds=round(seconds, 2),
            points_per_s=round(ingest),
        )
        results = {"ingest_points_per_s": ingest}
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
    parser.add_argument("--postgres-url", help="an empty PostgreSQL database to measure too")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--mirror", action="store_true", help="keep KD Lab's MLflow mirror on while measuring"
    )
    parser.add_argument("--mlflow-log-points", type=int, default=30_000)
    parser.add_argument("--mlflow-history-runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory, removed")
    args = parser.parse_args()

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
