"""Write contention: many workers posting metrics while compare views read, on `kdlab serve`.

    python benchmarks/write_contention.py [--writers 16] [--readers 4] [--seconds 60]
        [--batch 1000] [--no-mirror] [--postgres-url postgresql+psycopg://...]

`kdlab serve` as a user starts it (SQLite in a fresh data dir, the MLflow mirror ON unless
`--no-mirror`, the local supervisor idle), in its own process group, stopped by its PID.
Each writer registers an external run (its own run token, like a worker) and posts batches of
`batch` new points (4 keys) as fast as the server answers, for `seconds`; a 429/503 is
honoured like the worker's client does (wait `Retry-After`, send the same batch again).
Each reader asks `GET /api/compare` for all runs × one key, over and over.

At the end every run's stored point count per key is read back and compared with what the
server acknowledged. Prints one JSON line per writer/reader summary, then a summary line:
5xx answers (any, 503 included), points acknowledged vs stored (every point present once),
post latency p50/p99/max, compare latency p50/p99. The issue 9 target: zero 5xx, every point
present once, post p99 ≤ 2 s with 16 writers + 4 readers for 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_compare import (  # a sibling script, not a package
    cpu_model,
    curve,
    emit,
    free_port,
    package_version,
    running,
)

KEYS = ("train/loss_total", "train/loss_student", "train/loss_kd", "train/lr")
COMPARE_KEY = KEYS[0]
T0 = 1_763_900_000.0


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    acknowledged: int = 0
    retries: int = 0

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def register(base: str, index: int) -> tuple[str, str]:
    body = {"kind": "external", "name": f"writer-{index}", "experiment": "contention"}
    response = httpx.post(f"{base}/api/runs", json=body, timeout=60)
    response.raise_for_status()
    created = response.json()
    return created["run"]["id"] if "run" in created else created["id"], created["token"]


def batch_body(run: int, first_step: int, size: int) -> bytes:
    steps = range(first_step, first_step + size // len(KEYS))
    points = [
        {"key": key, "step": s, "value": curve(run, s) + k, "time": T0 + s * 0.1}
        for k, key in enumerate(KEYS)
        for s in steps
    ]
    return json.dumps({"points": points}).encode()


def writer(base: str, run: int, run_id: str, token: str, args, stop: threading.Event, tally: Tally):
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    per_key = args.batch // len(KEYS)
    step = 0
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        while not stop.is_set():
            body = batch_body(run, step, args.batch)
            while True:
                began = time.perf_counter()
                response = client.post(f"/api/runs/{run_id}/metrics", content=body)
                tally.latencies.append(time.perf_counter() - began)
                tally.count(response.status_code)
                if response.status_code in (429, 503):
                    tally.retries += 1
                    time.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                response.raise_for_status()
                tally.acknowledged += response.json()["accepted"]
                break
            step += per_key


def reader(base: str, run_ids: list[str], args, stop: threading.Event, tally: Tally):
    params = {"runs": ",".join(run_ids), "keys": COMPARE_KEY, "max_points": args.max_points}
    with httpx.Client(base_url=base, timeout=120) as client:
        while not stop.is_set():
            began = time.perf_counter()
            response = client.get("/api/compare", params=params)
            tally.latencies.append(time.perf_counter() - began)
            tally.count(response.status_code)


def stored_points(base: str, run_id: str) -> int:
    response = httpx.get(f"{base}/api/runs/{run_id}/metrics/keys", timeout=120)
    response.raise_for_status()
    return sum(entry["count"] for entry in response.json()["keys"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--max-points", type=int, default=1000)
    parser.add_argument("--no-mirror", action="store_true", help="KDLAB_MLFLOW_TRACKING_URI=none")
    parser.add_argument("--postgres-url", default=None, help="an empty, migrated-on-start DB")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kdlab-contention-") as tmp:
        data_dir = Path(tmp) / "data"
        port = free_port()
        env = {**os.environ, "KDLAB_DATA_DIR": str(data_dir)}
        env.pop("KDLAB_TOKEN", None)
        if args.no_mirror:
            env["KDLAB_MLFLOW_TRACKING_URI"] = "none"
        if args.postgres_url:
            env["KDLAB_DATABASE_URL"] = args.postgres_url
        command = [sys.executable, "-m", "kdlab.backend.cli", "serve", "--port", str(port)]
        base = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        with running(command, env, f"{base}/api/health", log, timeout=120):
            runs = [register(base, i) for i in range(args.writers)]
            stop = threading.Event()
            writes = [Tally() for _ in runs]
            reads = [Tally() for _ in range(args.readers)]
            threads = [
                threading.Thread(target=writer, args=(base, i, rid, tok, args, stop, writes[i]))
                for i, (rid, tok) in enumerate(runs)
            ]
            run_ids = [rid for rid, _ in runs]
            threads += [
                threading.Thread(target=reader, args=(base, run_ids, args, stop, tally))
                for tally in reads
            ]
            for thread in threads:
                thread.start()
            time.sleep(args.seconds)
            stop.set()
            for thread in threads:
                thread.join()
            stored = [stored_points(base, rid) for rid in run_ids]
            server_log_tail = log.read_text()[-2000:]

    for i, tally in enumerate(writes):
        emit(
            kind="writer",
            run=i,
            posts=len(tally.latencies),
            statuses=tally.statuses,
            acknowledged=tally.acknowledged,
            stored=stored[i],
        )
    post_latencies = [x for t in writes for x in t.latencies]
    compare_latencies = [x for t in reads for x in t.latencies]
    acknowledged = sum(t.acknowledged for t in writes)
    summary = {
        "kind": "summary",
        "database": "postgresql" if args.postgres_url else "sqlite",
        "mirror": not args.no_mirror,
        "writers": args.writers,
        "readers": args.readers,
        "seconds": args.seconds,
        "batch": args.batch,
        "posts": len(post_latencies),
        "compares": len(compare_latencies),
        "server_errors": sum(t.server_errors for t in writes + reads),
        "statuses_503_429": sum(t.retries for t in writes),
        "points_acknowledged": acknowledged,
        "points_stored": sum(stored),
        "every_point_once": all(t.acknowledged == s for t, s in zip(writes, stored, strict=True)),
        "post_p50_s": round(statistics.median(post_latencies), 4) if post_latencies else None,
        "post_p99_s": round(percentile(post_latencies, 0.99), 4),
        "post_max_s": round(max(post_latencies, default=float("nan")), 4),
        "compare_p50_s": round(percentile(compare_latencies, 0.5), 4),
        "compare_p99_s": round(percentile(compare_latencies, 0.99), 4),
        "points_per_s": round(acknowledged / args.seconds),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "sqlalchemy": package_version("sqlalchemy"),
        "mlflow": package_version("mlflow"),
        "date": time.strftime("%Y-%m-%d"),
    }
    emit(**summary)
    if summary["server_errors"]:
        print(server_log_tail, file=sys.stderr)


if __name__ == "__main__":
    main()
