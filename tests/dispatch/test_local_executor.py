"""LocalExecutor with tiny real commands: process groups, environment, slots, logs, cancel."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab.backend.executors.base import Launch
from kdlab.backend.executors.local import ExecutorId, LocalExecutor, NoSlot, detect_gpus, tail_lines


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_exit(executor: LocalExecutor, eid: str, timeout: float = 20.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = executor.status(eid)
        if status.state == "exited":
            return status.exit_code
        time.sleep(0.02)
    raise AssertionError(f"{eid} still running after {timeout} s")


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[LocalExecutor]:
    ex = LocalExecutor(tmp_path / "logs", cpu_slots=2, gpu_ids=[], owner="test", cpu_count=4)
    yield ex
    ex.kill_all()


ENV_DUMP = (
    "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
    "['CUDA_VISIBLE_DEVICES', 'OMP_NUM_THREADS', 'KDLAB_TOKEN', 'EXTRA', 'PYTHONUNBUFFERED']}));"
    "print(json.dumps([os.getpid(), os.getpgid(0), os.getsid(0)]))"
)


def test_submit_runs_in_its_own_group_with_slot_env_and_captured_output(
    executor: LocalExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDLAB_TOKEN", "admin-secret")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    eid = executor.submit(
        Launch("run1", 1, py(ENV_DUMP + ";import sys; sys.exit(3)"), {"EXTRA": "x"})
    )
    parsed = ExecutorId.parse(eid)
    assert (parsed.owner, parsed.gpus, parsed.log) == ("test", (), "run1/1.log")
    assert executor.run_of(eid) == ("run1", 1) and executor.owns(eid)
    assert executor.log_path(eid) == executor.logs_dir / "run1" / "1.log"
    assert not executor.owns("kdlab-run1-1") and not executor.owns(None)
    assert wait_exit(executor, eid) == 3
    assert executor.status(eid).detail == "exit code 3"
    env_line, ids_line = executor.logs(eid)
    env = json.loads(env_line)
    assert env == {
        "CUDA_VISIBLE_DEVICES": "",  # a CPU slot hides every GPU
        "OMP_NUM_THREADS": "2",  # 4 cores / 2 CPU slots
        "KDLAB_TOKEN": None,  # the admin token never reaches a worker
        "EXTRA": "x",
        "PYTHONUNBUFFERED": "1",
    }
    pid, pgid, sid = json.loads(ids_line)
    assert pid == parsed.pid and pgid == pid and sid == pid  # its own session and group
    assert (executor.logs_dir / "run1" / "1.log").exists()


def test_launch_env_may_set_threads_but_not_gpus(executor: LocalExecutor) -> None:
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "7"}
    eid = executor.submit(Launch("run1", 1, py(ENV_DUMP), env))
    assert wait_exit(executor, eid) == 0
    dumped = json.loads(executor.logs(eid)[0])
    assert dumped["OMP_NUM_THREADS"] == "1" and dumped["CUDA_VISIBLE_DEVICES"] == ""


def test_gpu_slots_are_handed_out_and_released(tmp_path: Path) -> None:
    ex = LocalExecutor(tmp_path, cpu_slots=1, gpu_ids=["0", "1", "2"], owner="t", cpu_count=6)
    try:
        assert ex.fits(3) and not ex.fits(4) and ex.has_slot(2)
        hold = py(
            "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], "
            "os.environ['OMP_NUM_THREADS'], flush=True); time.sleep(60)"
        )
        two = ex.submit(Launch("a", 1, hold, gpus=2))
        one = ex.submit(Launch("b", 1, hold, gpus=1))
        cpu = ex.submit(Launch("c", 1, hold, gpus=0))
        assert ex.free_slots() == (0, 0)
        with pytest.raises(NoSlot):
            ex.submit(Launch("d", 1, hold, gpus=1))
        with pytest.raises(NoSlot, match="needs 4 GPUs; this machine has 3"):
            ex.submit(Launch("e", 1, hold, gpus=4))
        deadline = time.monotonic() + 20
        while not all(ex.logs(e) for e in (two, one, cpu)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ex.logs(two) == ["0,1 4"] and ex.logs(one) == ["2 2"] and ex.logs(cpu) == [" 6"]
        assert ExecutorId.parse(two).gpus == ("0", "1")
        ex.cancel(two, 0)
        assert wait_exit(ex, two) == -signal.SIGKILL
        assert ex.free_slots() == (0, 2)
        again = ex.submit(Launch("d", 1, hold, gpus=2))
        assert ExecutorId.parse(again).gpus == ("0", "1")
    finally:
        ex.kill_all()
    assert ex.free_slots() == (1, 3)


def test_cancel_sends_sigterm_then_the_worker_exits_on_its_own(
    executor: LocalExecutor, tmp_path: Path
) -> None:
    marker = tmp_path / "saved"
    code = (
        "import signal, sys, time, pathlib\n"
        "def stop(*_):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('latest'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    eid = executor.submit(Launch("run", 1, py(code)))
    deadline = time.monotonic() + 20
    while executor.logs(eid) != ["ready"] and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.monotonic()
    executor.cancel(eid, grace_seconds=30)
    assert time.monotonic() - start < 1  # never blocks the caller
    assert wait_exit(executor, eid, timeout=10) == 0
    assert time.monotonic() - start < 10 and marker.read_text() == "latest"


def test_cancel_kills_the_whole_group_after_the_grace_period(executor: LocalExecutor) -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    eid = executor.submit(Launch("run", 1, py(code)))
    deadline = time.monotonic() + 20
    while not executor.logs(eid) and time.monotonic() < deadline:
        time.sleep(0.02)
    pgid = ExecutorId.parse(eid).pid
    start = time.monotonic()
    executor.cancel(eid, grace_seconds=1.0)
    executor.cancel(eid, grace_seconds=1.0)  # a repeat changes nothing
    assert wait_exit(executor, eid, timeout=10) == -signal.SIGKILL
    assert 0.9 < time.monotonic() - start < 8
    deadline = time.monotonic() + 5
    while not group_gone(pgid) and time.monotonic() < deadline:  # the grandchild too
        time.sleep(0.05)
    assert group_gone(pgid)


def test_logs_tail_and_missing_file(executor: LocalExecutor, tmp_path: Path) -> None:
    eid = executor.submit(Launch("run", 2, py("for i in range(5000): print('line', i)")))
    assert wait_exit(executor, eid) == 0
    assert executor.logs(eid, tail=3) == ["line 4997", "line 4998", "line 4999"]
    assert len(executor.logs(eid, tail=200)) == 200
    assert tail_lines(tmp_path / "nothing.log", 5) == []


def test_a_new_executor_adopts_a_running_worker(executor: LocalExecutor, tmp_path: Path) -> None:
    eid = executor.submit(Launch("run", 1, py("import time; time.sleep(60)")))
    restarted = LocalExecutor(executor.logs_dir, cpu_slots=1, gpu_ids=[], owner="test")
    other = LocalExecutor(executor.logs_dir, cpu_slots=1, gpu_ids=[], owner="elsewhere")
    assert restarted.owns(eid) and not other.owns(eid)
    assert other.status(eid).state == "unknown"
    assert restarted.status(eid).state == "running"
    assert restarted.adopt(eid) and restarted.free_slots() == (0, 0)
    restarted.cancel(eid, 0)
    status = executor.status(eid)  # the parent reaps it and sees the signal
    deadline = time.monotonic() + 10
    while status.state != "exited" and time.monotonic() < deadline:
        time.sleep(0.02)
        status = executor.status(eid)
    assert status.exit_code == -signal.SIGKILL
    # the adopter is not the parent: it sees the process gone, its exit code unknown
    assert restarted.status(eid).state == "exited" and restarted.status(eid).exit_code is None
    assert restarted.free_slots() == (1, 0)
    assert not restarted.adopt(eid)


def test_detect_gpus_reads_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in [
        ("0,2", ["0", "2"]),
        ("", []),
        ("-1", []),
        ("1,-1,2", ["1"]),
        ("GPU-abc, GPU-def", ["GPU-abc", "GPU-def"]),
    ]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert detect_gpus() == expected
