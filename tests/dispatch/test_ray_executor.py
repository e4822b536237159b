"""RayExecutor against a real local Ray head that this module starts and stops by its process group.

The head runs with 2 CPUs and 2 *logical* GPUs (Ray accepts `--num-gpus` on a machine without
any), so GPU scheduling and `CUDA_VISIBLE_DEVICES` are exercised on CPU-only CI. Every port is a
free one and the temp dir is private, so this never touches another Ray on the machine (and never
runs a machine-wide `ray stop`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.job_submission")  # ray[default]: the Jobs API client

import httpx
from ray.job_submission import JobSubmissionClient

from backend.executors.base import Launch, ProcessStatus
from backend.executors.ray import RayExecutor, parse_submission_id, submission_id
from tests.conftest import free_port
from tests.factories import DIGITS_TEACHER, config

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
OWNER_VARIABLE = "KDLAB_TEST_RAY_OWNER"  # marks every process of the Ray started here


def _distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _marked_processes(mark: str) -> list[int]:
    """Pids of the processes of the Ray this module started: each inherits `OWNER_VARIABLE=mark`
    from `ray start` (gcs_server, raylet, dashboard, workers, and the jobs' own processes, which
    Ray starts in sessions of their own where a process-group signal does not reach)."""
    needle = f"{OWNER_VARIABLE}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0") and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def ray_url() -> Iterator[str]:
    """A Ray head (2 CPUs, 2 logical GPUs) with its dashboard on a free loopback port."""
    temp_dir = Path(tempfile.mkdtemp(prefix="kdray-", dir="/tmp"))  # short: Ray's unix sockets
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node, objects = (
        _distinct_free_ports(9)
    )
    ray_bin = Path(sys.executable).with_name("ray")
    command = [
        str(ray_bin),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node}",
        f"--object-manager-port={objects}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--num-gpus=2",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]
    # the jobs inherit this environment: no admin token, no Ray address of another cluster
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KDLAB_", "RAY_")) and k != "CUDA_VISIBLE_DEVICES"
    }
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # on SIGTERM stop at once, no drain
    env[OWNER_VARIABLE] = str(temp_dir)
    log_file = (temp_dir / "ray-start.log").open("wb")
    proc = subprocess.Popen(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # its own process group: stopped below by that group only
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited {proc.returncode}:\n"
                    + (temp_dir / "ray-start.log").read_text()[-3000:]
                )
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Ray's job API did not answer within {START_TIMEOUT:.0f} s:\n"
                        + (temp_dir / "ray-start.log").read_text()[-3000:]
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        _stop_ray(proc, temp_dir, url)
        log_file.close()


def _stop_ray(proc: subprocess.Popen, temp_dir: Path, url: str) -> None:
    """Stop jobs still running, SIGTERM the process group we started (SIGKILL after
    STOP_TIMEOUT), then SIGKILL by pid whatever of this Ray outlived its group."""
    with contextlib.suppress(Exception):
        client = JobSubmissionClient(url)
        for job in client.list_jobs():
            if job.submission_id and not job.status.is_terminal():
                client.stop_job(job.submission_id)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    deadline = time.monotonic() + 10
    while (left := _marked_processes(str(temp_dir))) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray processes left running: {left}"


@pytest.fixture
def executor(ray_url: str) -> RayExecutor:
    return RayExecutor(ray_url, stop_grace_seconds=10)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def launch(command: list[str], *, gpus: int = 0, env: dict[str, str] | None = None) -> Launch:
    return Launch(f"t{uuid.uuid4().hex[:10]}", 1, command, env or {}, gpus)


def wait_exited(executor: RayExecutor, eid: str, timeout: float = 60.0) -> ProcessStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = executor.status(eid)
        if status.state != "running":
            return status
        time.sleep(0.1)
    raise AssertionError(f"ray job {eid} still running after {timeout:.0f} s")


def wait_for_line(executor: RayExecutor, eid: str, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in executor.logs(eid)):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the logs of {eid}: {executor.logs(eid)}")


def json_line(lines: list[str], prefix: str) -> dict:
    return json.loads(next(line for line in lines if line.startswith(prefix))[len(prefix) :])


ENV_DUMP = (
    "import json, os; print('ENV ' + json.dumps({k: os.environ.get(k) for k in "
    f"['CUDA_VISIBLE_DEVICES', 'EXTRA', 'KDLAB_TOKEN', 'RAY_JOB_STOP_WAIT_TIME_S', '{OWNER_VARIABLE}']}}))"
)


def test_a_job_runs_reports_running_then_exit_zero_with_its_logs(executor):
    job = launch(
        py(ENV_DUMP + "; print('hello from ray'); import time; time.sleep(1.5)"),
        env={"EXTRA": "x y", "CUDA_VISIBLE_DEVICES": "7"},
    )
    eid = executor.submit(job)
    assert eid == submission_id(job.run_id, 1) == f"kdlab-{job.run_id}-1"
    assert parse_submission_id(eid) == (job.run_id, 1)
    assert executor.status(eid).state == "running"  # PENDING or RUNNING
    status = wait_exited(executor, eid)
    assert status == ProcessStatus("exited", exit_code=0)
    lines = executor.logs(eid)
    assert "hello from ray" in lines
    env = json_line(lines, "ENV ")
    assert env["EXTRA"] == "x y"  # the launch's environment reaches the job
    assert env["KDLAB_TOKEN"] is None  # nothing of the submitting process leaks in
    assert env["CUDA_VISIBLE_DEVICES"] != "7"  # Ray, not the submitter, assigns GPUs
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == "10"
    assert env[OWNER_VARIABLE]  # a job's processes carry the mark the teardown sweeps by
    assert executor.logs(eid, tail=1) == lines[-1:]
    # a retried submit of the same attempt finds the same job instead of failing
    assert executor.submit(job) == eid


def test_a_gpu_job_gets_its_gpu_from_ray(executor):
    eid = executor.submit(launch(py(ENV_DUMP), gpus=1))
    assert wait_exited(executor, eid).exit_code == 0
    visible = json_line(executor.logs(eid), "ENV ")["CUDA_VISIBLE_DEVICES"]
    assert visible in ("0", "1")  # one of the head's two logical GPUs


def test_a_failing_job_exits_with_its_code_and_reason(executor):
    eid = executor.submit(launch(py("import sys; print('boom'); sys.exit(3)")))
    status = wait_exited(executor, eid)
    assert (status.state, status.exit_code) == ("exited", 3)
    assert "failed" in status.detail and "exit code 3" in status.detail
    assert "boom" in executor.logs(eid)


SIGTERM_CHECKPOINTS = (
    "import os, signal, sys, time\n"
    "def term(*_):\n"
    "    print('term: saving latest', flush=True); time.sleep(4); print('checkpointed', flush=True)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, term)\n"
    "print('PID', os.getpid(), flush=True)\n"
    "time.sleep(120)\n"
)


def test_cancel_lets_the_job_checkpoint_within_the_grace_period(executor):
    eid = executor.submit(launch(py(SIGTERM_CHECKPOINTS)))
    wait_for_line(executor, eid, "PID ")
    pid = int(next(line for line in executor.logs(eid) if line.startswith("PID ")).split()[1])
    started = time.monotonic()
    executor.cancel(eid, grace_seconds=10)
    took = time.monotonic() - started
    status = executor.status(eid)
    assert status.state == "exited" and "stopped" in status.detail
    assert 3.5 < took < 10 + 5  # waited for the 4 s checkpoint, not Ray's default 3 s
    assert "checkpointed" in executor.logs(eid)
    assert not _alive(pid)


def test_cancel_forces_a_job_that_ignores_sigterm_after_the_grace(ray_url):
    executor = RayExecutor(ray_url, stop_grace_seconds=2)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"
    eid = executor.submit(launch(py(code)))
    wait_for_line(executor, eid, "up")
    started = time.monotonic()
    executor.cancel(eid, grace_seconds=2)
    took = time.monotonic() - started
    assert executor.status(eid).state == "exited"
    assert took < 2 + 5
    # cancelling a finished job is a no-op
    executor.cancel(eid, grace_seconds=2)


def test_unknown_jobs(executor):
    assert executor.status("kdlab-nope-1").state == "unknown"
    assert executor.logs("kdlab-nope-1") == []
    executor.cancel("kdlab-nope-1", grace_seconds=1)
    assert parse_submission_id("kdlab-a-b-12") == ("a-b", 12)
    for other in ("raysubmit_x", "kdlab-7", "kdlab-run-x"):
        with pytest.raises(ValueError, match="not a KD Lab Ray job id"):
            parse_submission_id(other)


def test_missing_ray_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImportError, match=r"pip install kdlab\[ray\]"):
        RayExecutor("http://127.0.0.1:1")


# --- end to end: a digits run through the API, trained as a Ray job ------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "worker" / "run.py").exists(), reason="worker.run not written yet")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_digits_run_trains_as_a_ray_job(executor, live_server, settings, tmp_path):
    from backend.db.engine import make_engine, make_session_factory
    from backend.services import dispatch

    body = config(
        DIGITS_TEACHER,
        name="ray-digits",
        student={"name": "mlp", "params": {"hidden": [32]}},
        train={"epochs": 1, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.003}},
    )
    api = httpx.Client(base_url=live_server, timeout=30)
    created = api.post("/api/runs", json=body)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]

    # claim it as the supervisor does (queued → starting, attempt 1, a run-scoped token)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            claim = dispatch.claim_next(
                session,
                can_start=lambda gpus: True,
                fits=lambda gpus: True,
                max_attempts=1,
                executor="ray",
            )
    finally:
        engine.dispose()
    assert claim is not None and claim.run_id == run_id
    command = [
        sys.executable,
        "-m",
        "worker.run",
        "--run-id",
        run_id,
        "--api",
        live_server,
        "--token",
        claim.token,
        "--work-dir",
        str(tmp_path / "work"),
    ]
    eid = executor.submit(Launch(run_id, claim.attempt, command, {}, claim.gpus))
    status = wait_exited(executor, eid, timeout=90)
    logs = "\n".join(executor.logs(eid, tail=40))
    assert status.exit_code == 0, f"{status.detail}\n{logs}"

    run = api.get(f"/api/runs/{run_id}").json()
    assert run["status"] == "succeeded", (run["error"], logs)
    student = api.get(f"/api/runs/{run_id}/student")
    assert student.status_code == 200 and len(student.content) > 1000
    assert student.headers["x-content-sha256"]
