"""Fault tests for local dispatch (DESIGN §4), with real processes and a real server.

First the supervisor against stand-in workers (tiny `python -c` commands: a kill, a crash, a
hang, a cancel, concurrent claims), then the real worker (`python -m kdlab.worker.run`) on tiny digits
configs: kill -9 mid-epoch → requeued and resumed exactly; cancel; an exception in a step; NaN.
Every test is bounded well under 90 s on a 2-core CPU machine.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from kdlab.backend.db.engine import make_engine, make_session_factory
from kdlab.backend.db.models import ApiToken, Artifact, Metric, Run, RunEvent, utcnow
from kdlab.backend.executors.base import Launch
from kdlab.backend.executors.local import ExecutorId, LocalExecutor
from kdlab.backend.services.dispatch import Claim
from kdlab.backend.services.runs import cancel_run, set_status
from kdlab.backend.settings import Settings
from kdlab.backend.supervisor import Supervisor
from tests import factories
from tests.dispatch.test_local_executor import group_gone
from tests.factories import create_run
from tests.helpers import wait_for

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


# --------------------------------------------------------------------------- helpers


def stand_in(code: str) -> Callable[[Claim, str, Path], list[str]]:
    """A command factory: `python -c code` instead of the real worker."""
    return lambda claim, api, work_dir: [sys.executable, "-c", code]


def tuned(settings: Settings, **changes: Any) -> Settings:
    base: dict[str, Any] = {
        "lease_seconds": 30.0,
        "sweep_interval_seconds": 0.1,
        "cancel_grace_seconds": 10.0,
        "max_attempts": 3,
        "cpu_slots": 1,
    }
    return settings.model_copy(update={**base, **changes})


@pytest.fixture
def factory(migrated_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(migrated_engine)


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    """Supervisors a test made; stopped, with their worker groups killed, afterwards."""
    made: list[Supervisor] = []
    yield made
    for sup in made:
        sup.stop(kill_workers=True)


def supervisor(
    made: list[Supervisor],
    settings: Settings,
    factory: sessionmaker[Session],
    *,
    owner: str = "test",
    **kwargs: Any,
) -> Supervisor:
    executor = LocalExecutor(
        settings.logs_dir, cpu_slots=settings.cpu_slots, gpu_ids=[], owner=owner
    )
    sup = Supervisor(settings, factory, executor, api_url="http://127.0.0.1:9", **kwargs)
    made.append(sup)
    return sup


def state(factory: sessionmaker[Session], run_id: str) -> Run:
    with factory() as session:
        run = session.get(Run, run_id)
        assert run is not None
        return run


def events(factory: sessionmaker[Session], run_id: str) -> list[tuple[str, str]]:
    with factory() as session:
        rows = session.execute(
            select(RunEvent.kind, RunEvent.message)
            .where(RunEvent.run_id == run_id)
            .order_by(RunEvent.id)
        ).all()
        return [(kind, message) for kind, message in rows]


def drive(
    sup: Supervisor, until: Callable[[], bool], timeout: float, interval: float = 0.05
) -> float:
    """Tick `sup` until `until()` holds; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        sup.tick()
        if until():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


# --------------------------------------------------------------------------- stand-in workers


def test_a_worker_killed_by_a_signal_is_requeued_until_out_of_attempts(
    settings: Settings, factory: sessionmaker[Session], supervisors: list[Supervisor]
) -> None:
    settings = tuned(settings, max_attempts=2)
    code = "import os, signal; print('about to die', flush=True); os.kill(os.getpid(), 9)"
    sup = supervisor(supervisors, settings, factory, command=stand_in(code))
    with factory() as session:
        run_id = create_run(session, name="doomed").id
    drive(sup, lambda: state(factory, run_id).status == "failed", timeout=30)
    run = state(factory, run_id)
    assert run.attempt == 2 and run.max_attempts == 2 and run.executor_id is None
    assert run.error == "worker killed by SIGKILL (attempt 2 of 2; no attempts left)"
    messages = [m for _, m in events(factory, run_id)]
    assert (
        "attempt 1 of 2 lost: worker killed by SIGKILL; queued again, the next attempt resumes "
        "from latest.pt" in messages
    )
    statuses = [m for k, m in events(factory, run_id) if k == "status"]
    assert statuses == ["starting", "queued", "starting", "failed"]  # (factory rows: no "queued")
    assert messages.count("about to die") == 2  # each attempt's output tail is in the log
    assert any(
        m.startswith("--- worker output, attempt 2 (killed by SIGKILL), last 1 lines of ")
        for m in messages
    )
    with factory() as session:  # both attempts' tokens are revoked
        tokens = session.scalars(select(ApiToken).where(ApiToken.run_id == run_id)).all()
        assert len(tokens) == 2 and all(t.revoked_at is not None for t in tokens)


def test_a_worker_crashing_without_a_report_fails_with_its_last_lines(
    settings: Settings, factory: sessionmaker[Session], supervisors: list[Supervisor]
) -> None:
    code = "import sys\nfor i in range(30): print('line', i)\nsys.exit(2)"
    sup = supervisor(supervisors, tuned(settings), factory, command=stand_in(code))
    with factory() as session:
        run_id = create_run(session, name="crash").id
    drive(sup, lambda: state(factory, run_id).status == "failed", timeout=30)
    run = state(factory, run_id)
    assert run.attempt == 1
    assert run.error is not None
    head, *lines = run.error.splitlines()
    assert head == (
        "the worker process ended (exit code 2) without reporting an outcome; its last output:"
    )
    assert lines == [f"line {i}" for i in range(10, 30)]  # the last 20 lines


def test_a_hung_worker_loses_its_lease_and_its_group_is_killed(
    settings: Settings, factory: sessionmaker[Session], supervisors: list[Supervisor]
) -> None:
    settings = tuned(settings, lease_seconds=1.0, max_attempts=1)
    code = "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    sup = supervisor(supervisors, settings, factory, command=stand_in(code))
    with factory() as session:
        run_id = create_run(session, name="hung").id
    drive(sup, lambda: state(factory, run_id).executor_id is not None, timeout=10)
    pgid = ExecutorId.parse(state(factory, run_id).executor_id or "").pid
    took = drive(sup, lambda: state(factory, run_id).status == "failed", timeout=20)
    assert 0.5 < took < 10
    error = state(factory, run_id).error or ""
    assert error.startswith("worker hung: no heartbeat for ") and "(lease 1 s)" in error
    drive(sup, lambda: group_gone(pgid), timeout=10)


def test_a_run_claimed_elsewhere_that_went_silent_is_requeued(
    settings: Settings, factory: sessionmaker[Session], supervisors: list[Supervisor]
) -> None:
    sup = supervisor(
        supervisors,
        tuned(settings, lease_seconds=5.0),
        factory,
        command=stand_in("import time; time.sleep(60)"),
    )
    with factory() as session:
        run = create_run(session, name="elsewhere", status="running")
        run.executor, run.executor_id, run.attempt = "local", "otherhost:1:1:-:x/1.log", 1
        run.heartbeat_at = utcnow() - timedelta(seconds=60)
        session.commit()
        run_id = run.id
    sup.sweep()  # judged by its lease alone (its process is not on this machine)
    run = state(factory, run_id)
    assert (run.status, run.heartbeat_at, run.executor_id) == ("queued", None, None)
    lost = [m for k, m in events(factory, run_id) if k == "error"]
    assert lost and lost[0].startswith("attempt 1 of 3 lost: no heartbeat for 60 s (lease 5 s)")
    sup.claim()  # and it is picked up again here, as attempt 2
    assert state(factory, run_id).attempt == 2


def test_cancel_stops_the_process_group_and_marks_the_run_cancelled(
    settings: Settings, factory: sessionmaker[Session], supervisors: list[Supervisor]
) -> None:
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    sup = supervisor(
        supervisors, tuned(settings, cancel_grace_seconds=5.0), factory, command=stand_in(code)
    )
    with factory() as session:
        run_id = create_run(session, name="cancel-me").id
    drive(sup, lambda: state(factory, run_id).executor_id is not None, timeout=10)
    pgid = ExecutorId.parse(state(factory, run_id).executor_id or "").pid
    with factory() as session:
        cancel_run(session, run_id)
    took = drive(sup, lambda: state(factory, run_id).status == "cancelled", timeout=10)
    assert took < 5  # SIGTERM's default action ends the stand-in at once
    assert "cancelled; the worker stopped (killed by SIGTERM)" in [
        m for _, m in events(factory, run_id)
    ]
    drive(sup, lambda: group_gone(pgid), timeout=5)


def test_a_run_needing_more_gpus_than_the_machine_has_fails_at_once(
    settings: Settings, factory: sessionmaker[Session], supervisors: list[Supervisor]
) -> None:
    sup = supervisor(supervisors, tuned(settings), factory, command=stand_in("pass"))
    config = factories.config(factories.DIGITS_TEACHER, resources={"gpus": 2})
    with factory() as session:
        big = create_run(session, name="big", run_config=config)
        small = create_run(session, name="small")
        big_id, small_id = big.id, small.id
    sup.claim()
    assert state(factory, big_id).status == "failed"
    assert "needs 2 GPU(s)" in (state(factory, big_id).error or "")
    assert state(factory, small_id).status == "starting"


def test_a_restarted_server_adopts_its_running_workers(
    settings: Settings, factory: sessionmaker[Session], supervisors: list[Supervisor]
) -> None:
    """Workers outlive the server; the next server on the same data dir adopts them (their slot
    stays taken), and when one dies unobserved it is a lost worker: requeued."""
    settings = tuned(settings)
    first = supervisor(
        supervisors, settings, factory, command=stand_in("import time; time.sleep(60)")
    )
    with factory() as session:
        run_id = create_run(session, name="survivor").id
    drive(first, lambda: state(factory, run_id).executor_id is not None, timeout=10)
    first.stop()  # the server shuts down; its worker goes on
    eid = state(factory, run_id).executor_id or ""
    pid = ExecutorId.parse(eid).pid
    os.kill(pid, 0)  # still running

    second = supervisor(supervisors, settings, factory, command=stand_in("pass"))
    second.sweep()
    assert second.executor.known() == [eid] and second.executor.free_slots() == (0, 0)
    assert state(factory, run_id).status == "starting"  # nothing changed
    os.kill(pid, signal.SIGKILL)
    drive(second, lambda: state(factory, run_id).attempt == 2, timeout=10)
    lost = [m for k, m in events(factory, run_id) if k == "error"]
    assert lost[0].startswith("attempt 1 of 3 lost: worker exit code unknown")


def test_stale_and_lingering_workers_are_stopped(
    settings: Settings, factory: sessionmaker[Session], supervisors: list[Supervisor]
) -> None:
    """A worker whose run moved on without it (requeued elsewhere) is killed at once; one still
    alive `lease_seconds` after its run finished gets SIGTERM."""
    settings = tuned(settings, lease_seconds=1.0, cpu_slots=2)
    sup = supervisor(
        supervisors, settings, factory, command=stand_in("import time; time.sleep(60)")
    )
    with factory() as session:
        stale_id = create_run(session, name="stale").id
        done_id = create_run(session, name="done").id
    drive(sup, lambda: all(state(factory, r).executor_id for r in (stale_id, done_id)), 10)
    pids = {
        r: ExecutorId.parse(state(factory, r).executor_id or "").pid for r in (stale_id, done_id)
    }
    with factory() as session:  # another server requeued one; the other one's worker reported
        stale, done = session.get(Run, stale_id), session.get(Run, done_id)
        assert stale is not None and done is not None
        set_status(session, stale, "queued")
        stale.executor_id = None
        set_status(session, done, "running")
        set_status(session, done, "succeeded")
        session.commit()
    sup.sweep()  # sweeps only: the requeued run must not be claimed again here

    def sweep_until(condition: Callable[[], bool], timeout: float) -> float:
        start = time.monotonic()
        while not condition():
            assert time.monotonic() - start < timeout
            sup.sweep()
            time.sleep(0.05)
        return time.monotonic() - start

    sweep_until(lambda: group_gone(pids[stale_id]), timeout=5)
    assert not group_gone(pids[done_id])  # a finished run's worker gets time to wind down
    took = sweep_until(lambda: group_gone(pids[done_id]), timeout=10)
    assert 0.5 < took < 10
    sup.sweep()
    assert sup.executor.known() == []  # both reaped and forgotten
    assert state(factory, done_id).status == "succeeded"


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_two_supervisors_never_claim_a_run_twice(
    settings: Settings, database_url: str, supervisors: list[Supervisor]
) -> None:
    """Two servers on one database (each its own engine and executor) claim 6 queued runs at the
    same moment: every run is started exactly once."""
    settings = tuned(settings, cpu_slots=6)
    submits: list[str] = []
    lock = threading.Lock()
    engines = [make_engine(database_url) for _ in range(2)]
    sups = []
    for i, engine in enumerate(engines):
        sup = supervisor(
            supervisors,
            settings,
            make_session_factory(engine),
            owner=f"server{i}",
            command=stand_in("pass"),
        )
        real_submit = sup.executor.submit

        def counting_submit(launch: Launch, real: Any = real_submit) -> str:
            with lock:
                submits.append(launch.run_id)
            return real(launch)

        sup.executor.submit = counting_submit  # type: ignore[method-assign]
        sups.append(sup)
    factory = make_session_factory(engines[0])
    with factory() as session:
        run_ids = {create_run(session, name=f"r{i}").id for i in range(6)}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def claim(sup: Supervisor) -> None:
        try:
            barrier.wait()
            for _ in range(5):
                sup.claim()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=claim, args=(s,)) for s in sups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(submits) == sorted(run_ids)  # each run once, none twice
    with factory() as session:
        runs = session.scalars(select(Run)).all()
        assert {(r.status, r.attempt) for r in runs} == {("starting", 1)}
        owners = {ExecutorId.parse(r.executor_id or "").owner for r in runs}
        assert owners <= {"server0", "server1"}
    for engine in engines:
        engine.dispose()


# --------------------------------------------------------------------------- the real worker

TINY: dict[str, Any] = {
    "experiment": "faults",
    "kind": "train",
    "seed": 0,
    "student": {"name": "mlp", "params": {"hidden": [32]}},
    "train": {
        "epochs": 3,
        "batch_size": 32,
        "optimizer": {"name": "adamw", "lr": 0.003},
        "log_every": 5,
    },
}
STEPS_PER_EPOCH = 45  # ceil(1437 training digits / 32)


def tiny(name: str, dataset: str, epochs: int = 3, **params: Any) -> dict[str, Any]:
    train = {**TINY["train"], "epochs": epochs}
    return {**TINY, "name": name, "dataset": {"name": dataset, "params": params}, "train": train}


@pytest.fixture
def real(
    settings: Settings,
    live_server: str,
    factory: sessionmaker[Session],
    supervisors: list[Supervisor],
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Supervisor]:
    """Start a supervisor thread that runs `python -m kdlab.worker.run` against the live server
    (the test plug-ins importable by the server and the workers)."""
    monkeypatch.syspath_prepend(str(PLUGINS))

    def start(**changes: Any) -> Supervisor:
        tuned_settings = tuned(settings, lease_seconds=15.0, sweep_interval_seconds=0.2, **changes)
        executor = LocalExecutor(tuned_settings.logs_dir, cpu_slots=1, gpu_ids=[], owner="t")
        env = {
            "OMP_NUM_THREADS": "1",
            "KDLAB_HEARTBEAT_SECONDS": "1",
            "PYTHONPATH": str(PLUGINS),
        }
        sup = Supervisor(tuned_settings, factory, executor, api_url=live_server, worker_env=env)
        supervisors.append(sup)
        sup.start()
        return sup

    return start


def queue(factory: sessionmaker[Session], settings: Settings, config: dict[str, Any]) -> str:
    """Queue a run through the same service as POST /api/runs (validated)."""
    from kdlab.backend.services.runs import create_run as service_create_run

    with factory() as session:
        return service_create_run(session, settings, config).id


def series(factory: sessionmaker[Session], run_id: str, key: str) -> dict[int, float]:
    with factory() as session:
        rows = session.execute(
            select(Metric.step, Metric.value).where(Metric.run_id == run_id, Metric.key == key)
        ).all()
        return {step: value for step, value in rows}


def artifact_names(factory: sessionmaker[Session], run_id: str) -> set[str]:
    with factory() as session:
        return set(session.scalars(select(Artifact.name).where(Artifact.run_id == run_id)))


def finished(factory: sessionmaker[Session], run_id: str) -> Run | None:
    run = state(factory, run_id)
    return run if run.status in ("succeeded", "failed", "cancelled") else None


def logged_step(settings: Settings, run_id: str, attempt: int) -> int:
    """The last step the worker printed progress for (its captured stdout)."""
    try:
        lines = (settings.logs_dir / run_id / f"{attempt}.log").read_text().splitlines()
    except FileNotFoundError:
        return 0
    progress = [line for line in lines if line.startswith("epoch ") and "| loss_total" in line]
    return int(progress[-1].split()[3].split("/")[0]) if progress else 0


class Recorder:
    """A MetricSink that keeps every logged point."""

    def __init__(self) -> None:
        self.points: dict[str, dict[int, float]] = {}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.points.setdefault(key, {})[step] = value

    def log_metadata(self, meta: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def reference_losses(config: dict[str, Any], out_dir: Path) -> dict[int, float]:
    """train/loss_total of an uninterrupted in-process run of `config` (one thread, CPU)."""
    import torch

    from kdlab.worker.config import RunConfig
    from kdlab.worker.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sink = Recorder()
        Trainer(RunConfig.model_validate(config), out_dir, sink, device="cpu").fit()
    finally:
        torch.set_num_threads(threads)
    return sink.points["train/loss_total"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_kill_9_mid_epoch_requeues_and_resumes_exactly(
    settings: Settings,
    factory: sessionmaker[Session],
    real: Callable[..., Supervisor],
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    real()
    config = tiny("killed", "slow_digits", delay=0.002, epochs=2)  # ≈ 3-4 s per epoch
    run_id = queue(factory, settings, config)
    # latest.pt reaches the server about a second after epoch 1 ends; kill -9 once the worker
    # has printed a step of epoch 2
    wait_for(
        lambda: "latest.pt" in artifact_names(factory, run_id),
        45,
        "latest.pt among the run's artifacts",
        interval=0.05,
    )
    run = state(factory, run_id)
    assert (run.status, run.attempt) == ("running", 1)
    wait_for(
        lambda: logged_step(settings, run_id, attempt=1) > STEPS_PER_EPOCH,
        20,
        f"attempt 1 to log a step past {STEPS_PER_EPOCH}",
        interval=0.1,
    )
    os.kill(ExecutorId.parse(run.executor_id or "").pid, signal.SIGKILL)
    killed_at = logged_step(settings, run_id, attempt=1)
    assert STEPS_PER_EPOCH < killed_at < 2 * STEPS_PER_EPOCH  # inside epoch 2, past its start

    run = wait_for(lambda: finished(factory, run_id), 60, "the run to finish", interval=0.1)
    assert run.status == "succeeded", run.error
    assert run.attempt == 2
    messages = [m for _, m in events(factory, run_id)]
    assert (
        "attempt 1 of 3 lost: worker killed by SIGKILL; queued again, the next attempt resumes "
        "from latest.pt" in messages
    )
    assert any(m.startswith("resuming from the run's latest.pt") for m in messages)

    losses = series(factory, run_id, "train/loss_total")
    total = 2 * STEPS_PER_EPOCH
    expected_steps = sorted({*range(5, total + 1, 5), total})
    assert sorted(losses) == expected_steps  # every logged step exactly once
    reference = reference_losses(
        tiny("killed", "slow_digits", delay=0.0, epochs=2), tmp_path / "ref"
    )
    assert sorted(reference) == expected_steps
    assert losses[total] == pytest.approx(reference[total], rel=1e-6, abs=1e-7)
    assert losses == pytest.approx(reference, rel=1e-6, abs=1e-7)  # the whole curve
    assert time.monotonic() - started < 90


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cancel_during_training_stops_within_the_grace_period(
    settings: Settings, factory: sessionmaker[Session], real: Callable[..., Supervisor]
) -> None:
    grace = 20.0
    real(cancel_grace_seconds=grace)
    run_id = queue(factory, settings, tiny("cancelled", "slow_digits", delay=0.002))
    wait_for(
        lambda: logged_step(settings, run_id, attempt=1) >= 10,
        45,
        "attempt 1 to log step 10",
        interval=0.1,
    )
    run = state(factory, run_id)
    assert run.status == "running"
    pgid = ExecutorId.parse(run.executor_id or "").pid
    with factory() as session:
        cancel_run(session, run_id)
    asked = time.monotonic()
    run = wait_for(lambda: finished(factory, run_id), grace + 10, "the run to finish", interval=0.1)
    took = time.monotonic() - asked
    assert run.status == "cancelled" and took < grace, (run.status, took)
    assert "latest.pt" in artifact_names(factory, run_id)
    wait_for(lambda: group_gone(pgid), 10, f"process group {pgid} to be gone", interval=0.1)
    assert max(series(factory, run_id, "train/loss_total")) < 3 * STEPS_PER_EPOCH


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_raising_in_a_step_fails_with_the_traceback_tail(
    settings: Settings, factory: sessionmaker[Session], real: Callable[..., Supervisor]
) -> None:
    real()
    run_id = queue(factory, settings, tiny("raises", "exploding_digits", after_items=5 * 32))
    run = wait_for(lambda: finished(factory, run_id), 60, "the run to finish", interval=0.1)
    assert run.status == "failed" and run.attempt == 1
    error = run.error or ""
    assert error.startswith("exploding_digits: item 161 requested, after_items=160")
    assert 'File "' in error and "kdlab_test_datasets.py" in error  # the traceback tail
    assert error.rstrip().endswith(
        "RuntimeError: exploding_digits: item 161 requested, after_items=160"
    )
    assert set(series(factory, run_id, "train/loss_total")) == {5}  # steps 1-5 trained


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_nan_loss_fails_the_run_naming_the_term(
    settings: Settings, factory: sessionmaker[Session], real: Callable[..., Supervisor]
) -> None:
    real()
    config = {
        **tiny("nan", "nan_digits", after_items=3 * 32),
        "kind": "distill",
        "teacher": {"name": "mlp", "params": {"hidden": [32]}},
        "distill": {
            "pairs": [
                {
                    "student_layer": "",
                    "teacher_layer": "",
                    "loss": {"name": "logits_kl", "params": {"temperature": 2.0}},
                }
            ],
            "balancer": {"name": "static", "params": {"kd_weight": 0.5}},
            "allow_weak_teacher": True,  # a random teacher: no teacher run needed
        },
    }
    run_id = queue(factory, settings, config)
    run = wait_for(lambda: finished(factory, run_id), 60, "the run to finish", interval=0.1)
    assert run.status == "failed" and run.attempt == 1
    assert (run.error or "").startswith("NaN in train/kd/output"), run.error
    assert " at step 5 " in (run.error or "").splitlines()[0]
