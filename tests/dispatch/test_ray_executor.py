"""RayExecutor against a real local Ray head that this module starts and stops by its process group.

The head runs with 2 CPUs and 2 *logical* GPUs (Ray accepts `--num-gpus` on a machine without
any), so GPU scheduling and `CUDA_VISIBLE_DEVICES` are exercised on CPU-only CI. Every port is a
free one and the temp dir is private, so this never touches another Ray on the machine (and never
runs a machine-wide `ray stop`).

Then the supervisor with KDLAB_EXECUTOR=ray: the lease of a pending job (a stand-in executor, and
a real job asking for more GPUs than the head has), the settings, and end to end: a server whose
app runs the supervisor, two digits runs posted to its API, one trained to `succeeded` as a Ray
job, the other cancelled while it trains.
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
from datetime import timedelta, timezone
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from kdlab.backend.db.engine import make_session_factory
from kdlab.backend.db.models import Run, RunEvent, utcnow
from kdlab.backend.executors.base import Executor, Launch, ProcessStatus
from kdlab.backend.executors.ray import RayExecutor, parse_submission_id, submission_id
from kdlab.backend.main import create_app
from kdlab.backend.services.runs import cancel_run
from kdlab.backend.settings import Settings
from kdlab.backend.supervisor import Supervisor, make_executor, server_identity
from tests.conftest import free_port
from tests.factories import DIGITS_TEACHER, config, create_run
from tests.helpers import require_module

# skipped without Ray, except with KDLAB_REQUIRE_RAY=1 (.ci/run): then a missing Ray fails
# (ray.job_submission is ray[default]'s Jobs API client; kdlab.backend.executors.ray imports it lazily)
JobSubmissionClient = require_module(
    "ray.job_submission", "KDLAB_REQUIRE_RAY", "'ray[default]' (the ray extra)"
).JobSubmissionClient

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
    # a Ray node's own data dir: where `python -m kdlab.worker.run` keeps its scratch files
    env["KDLAB_DATA_DIR"] = str(temp_dir / "node-data")
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
        if not status.alive:
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
    assert executor.status(eid).state in ("pending", "running")
    assert (
        eid in executor.known() and executor.owns(eid) and executor.run_of(eid) == (job.run_id, 1)
    )
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
    executor.cancel(eid, grace_seconds=10, wait=True)
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
    executor.cancel(eid, grace_seconds=2)  # returns at once: Ray stops the job
    assert time.monotonic() - started < 2
    status = wait_exited(executor, eid, timeout=10)
    took = time.monotonic() - started
    assert status.exit_code is None and "stopped" in executor.describe(status)
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
        assert not executor.owns(other)
    assert executor.owns("kdlab-nope-1") and not executor.owns(None)
    assert executor.log_path("kdlab-nope-1") is None and executor.has_slot(8) and executor.fits(8)


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


# --- the supervisor with KDLAB_EXECUTOR=ray ------------------------------------------------------


def ray_settings(settings: Settings, address: str | None, **changes: object) -> Settings:
    base: dict[str, object] = {
        "executor": "ray",
        "ray_address": address,
        "lease_seconds": 1.0,
        "sweep_interval_seconds": 0.2,
        "cancel_grace_seconds": 2.0,
        "max_attempts": 3,
    }
    return settings.model_copy(update={**base, **changes})


@pytest.fixture
def factory(migrated_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(migrated_engine)


def run_row(factory: sessionmaker[Session], run_id: str) -> Run:
    with factory() as session:
        run = session.get(Run, run_id)
        assert run is not None
        return run


def events(factory: sessionmaker[Session], run_id: str, kind: str | None = None) -> list[str]:
    with factory() as session:
        query = select(RunEvent.message).where(RunEvent.run_id == run_id).order_by(RunEvent.id)
        if kind is not None:
            query = query.where(RunEvent.kind == kind)
        return list(session.scalars(query))


def age(factory: sessionmaker[Session], run_id: str, seconds: float) -> None:
    """Make the run look silent for `seconds` (its lease start moved back)."""
    with factory() as session:
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(updated_at=utcnow() - timedelta(seconds=seconds), heartbeat_at=None)
        )
        session.commit()


class QueuedJobs(Executor):
    """A stand-in for a Ray cluster whose jobs stay in its queue until told to run."""

    name = "ray"
    shared_work_dir = False

    def __init__(self) -> None:
        self.state: str = "pending"
        self.launches: list[Launch] = []
        self.stopped: list[str] = []

    def submit(self, launch: Launch) -> str:
        self.launches.append(launch)
        return submission_id(launch.run_id, launch.attempt)

    def cancel(self, executor_id: str, grace_seconds: float) -> None:
        self.stopped.append(executor_id)

    def status(self, executor_id: str) -> ProcessStatus:
        return ProcessStatus(self.state, detail=f"ray job {self.state}")  # type: ignore[arg-type]

    def logs(self, executor_id: str, tail: int = 200) -> list[str]:
        return []

    def run_of(self, executor_id: str) -> tuple[str, int]:
        return parse_submission_id(executor_id)

    def known(self) -> list[str]:
        return [submission_id(launch.run_id, launch.attempt) for launch in self.launches]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_pending_job_is_not_a_lost_worker_its_lease_starts_when_it_runs(
    settings: Settings, factory: sessionmaker[Session]
) -> None:
    settings = ray_settings(settings, "http://ray.invalid:8265", lease_seconds=1.0)
    cluster = QueuedJobs()
    sup = Supervisor(settings, factory, cluster, api_url="http://backend:8000")
    with factory() as session:
        run_id = create_run(session, name="waits-for-a-gpu").id
    sup.claim()
    eid = run_row(factory, run_id).executor_id
    assert eid == submission_id(run_id, 1)
    (launch,) = cluster.launches
    # a Ray job gets no path of the server's data dir; its token comes in the environment
    assert "--work-dir" not in launch.command and "--token" not in launch.command
    assert launch.command[-4:] == ["--run-id", run_id, "--api", "http://backend:8000"]
    assert set(launch.env) == {"KDLAB_RUN_TOKEN"} and launch.env["KDLAB_RUN_TOKEN"]

    for _ in range(2):  # pending far longer than the lease: held, in the database too
        age(factory, run_id, 60)
        sup.sweep()
        run = run_row(factory, run_id)
        assert (run.status, run.attempt, run.executor_id) == ("starting", 1, eid)
        assert (utcnow() - run.updated_at.replace(tzinfo=timezone.utc)).total_seconds() < 5
    assert cluster.stopped == []

    cluster.state = "running"  # Ray starts it: the lease counts from now, not from the claim
    age(factory, run_id, 60)
    sup.sweep()
    assert run_row(factory, run_id).status == "starting"
    time.sleep(settings.lease_seconds + 0.3)  # and the worker never reports: lost after all
    sup.sweep()
    run = run_row(factory, run_id)
    assert (run.status, run.executor_id) == ("queued", None)
    assert cluster.stopped == [eid]
    errors = events(factory, run_id, "error")
    assert len(errors) == 1 and errors[0].startswith("attempt 1 of 3 lost: worker hung: ")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_executor_comes_from_the_settings(settings: Settings, ray_url: str) -> None:
    executor = make_executor(ray_settings(settings, ray_url, cancel_grace_seconds=7.0))
    assert isinstance(executor, RayExecutor)
    assert executor.address == ray_url and executor.stop_grace_seconds == 7.0
    assert executor.owner == server_identity(settings)
    with pytest.raises(ValueError, match="set KDLAB_RAY_ADDRESS"):
        make_executor(ray_settings(settings, None))
    # the app's lifespan runs the supervisor for ray, and refuses to start without an address
    app = create_app(ray_settings(settings, ray_url))
    with TestClient(app, base_url="http://127.0.0.1"):
        assert isinstance(app.state.supervisor.executor, RayExecutor)
    app.state.engine.dispose()
    app = create_app(ray_settings(settings, None))
    with (
        pytest.raises(ValueError, match="KDLAB_RAY_ADDRESS"),
        TestClient(app, base_url="http://127.0.0.1"),
    ):
        pass
    app.state.engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_real_pending_job_holds_its_lease_and_can_be_cancelled(
    settings: Settings, factory: sessionmaker[Session], ray_url: str
) -> None:
    """3 GPUs asked of a head with 2: the job waits in Ray's queue, the run stays `starting` past
    its lease, a restarted server finds the job, and a cancel stops it there."""
    settings = ray_settings(settings, ray_url, lease_seconds=1.0)
    sup = Supervisor(
        settings, factory, api_url="http://127.0.0.1:9", command=lambda *_: py("print('never')")
    )
    with factory() as session:
        run_id = create_run(
            session, name="too-big", run_config=config(DIGITS_TEACHER, resources={"gpus": 3})
        ).id
    sup.claim()
    eid = run_row(factory, run_id).executor_id or ""
    assert parse_submission_id(eid) == (run_id, 1)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        sup.tick()
        time.sleep(0.2)
    run = run_row(factory, run_id)
    assert (run.status, run.attempt, run.executor_id) == ("starting", 1, eid)
    assert sup.executor.status(eid).state == "pending"
    # a restarted server finds this server's unfinished jobs; another server's list does not
    assert eid in RayExecutor(ray_url, owner=server_identity(settings)).known()
    assert eid not in RayExecutor(ray_url, owner="another-server").known()

    with factory() as session:
        cancel_run(session, run_id)
    sup.tick()  # nothing ran: cancelled at once (Ray cannot stop a job before it starts)
    run = run_row(factory, run_id)
    assert (run.status, run.attempt) == ("cancelled", 1)
    assert f"cancelled before its worker started (ray job {eid} waiting)" in events(factory, run_id)
    for _ in range(5):  # and it stays so: a finished run's pending job is no lost worker
        sup.tick()
        time.sleep(0.1)
    assert (run_row(factory, run_id).status, run_row(factory, run_id).attempt) == ("cancelled", 1)


# --- end to end: digits runs through the API, trained as Ray jobs by the app's supervisor --------


@pytest.fixture
def ray_server(settings: Settings, ray_url: str) -> Iterator[tuple[str, Settings]]:
    """The app with KDLAB_EXECUTOR=ray served by a real uvicorn on a free loopback port; its
    lifespan runs the supervisor, whose jobs call back to this port."""
    import threading

    import uvicorn

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = ray_settings(
        settings,
        ray_url,
        port=port,
        public_url=url,
        lease_seconds=30.0,
        cancel_grace_seconds=15.0,
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield url, settings
    finally:
        supervisor = app.state.supervisor
        server.should_exit = True
        thread.join(timeout=20)
        if supervisor is not None:
            supervisor.executor.kill_all()  # jobs a failed test left running
        app.state.engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_digits_runs_train_and_cancel_as_ray_jobs_through_the_api(
    ray_server: tuple[str, Settings], factory: sessionmaker[Session]
) -> None:
    url, settings = ray_server
    api = httpx.Client(base_url=url, timeout=30)

    def post(name: str, epochs: int) -> str:
        body = config(
            DIGITS_TEACHER,
            name=name,
            student={"name": "mlp", "params": {"hidden": [32]}},
            train={"epochs": epochs, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.003}},
        )
        created = api.post("/api/runs", json=body)
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    def get(run_id: str) -> dict:
        return api.get(f"/api/runs/{run_id}").json()

    def logs(run_id: str) -> str:
        return api.get(f"/api/runs/{run_id}/logs").text[-3000:]

    started = time.monotonic()
    short = post("ray-digits", epochs=1)
    long = post("ray-digits-long", epochs=500)

    # the long one: cancelled while it trains (steps logged), through the API
    deadline = time.monotonic() + 60
    while not (
        get(long)["status"] == "running" and api.get(f"/api/runs/{long}/metrics").json()["series"]
    ):
        assert time.monotonic() < deadline, (get(long), logs(long))
        time.sleep(0.2)
    eid = run_row(factory, long).executor_id
    assert eid == submission_id(long, 1)
    assert api.post(f"/api/runs/{long}/cancel").status_code < 300
    asked = time.monotonic()
    while get(long)["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() - asked < settings.cancel_grace_seconds + 10, logs(long)
        time.sleep(0.2)
    run = get(long)
    assert run["status"] == "cancelled", (run["error"], logs(long))
    assert run["attempt"] == 1

    # the short one: trained to the end by a Ray job, its student exported
    deadline = time.monotonic() + 90
    while get(short)["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, (get(short), logs(short))
        time.sleep(0.2)
    run = get(short)
    assert run["status"] == "succeeded", (run["error"], logs(short))
    assert (run["attempt"], run_row(factory, short).executor) == (1, "ray")
    names = {a["name"] for a in api.get(f"/api/runs/{short}/artifacts").json()}
    assert "student.safetensors" in names
    student = api.get(f"/api/runs/{short}/student")
    assert student.status_code == 200 and len(student.content) > 1000
    assert time.monotonic() - started < 120
