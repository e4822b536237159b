"""`LocalExecutor`: each run attempt is a process group on this machine (DESIGN §4).

- `submit` starts the command in a new session (`start_new_session=True`: its own process group,
  out of reach of the terminal's Ctrl-C), with `CUDA_VISIBLE_DEVICES` set to the GPUs it holds
  (empty for a CPU slot) and `OMP_NUM_THREADS` set to its share of the cores, stdout and stderr
  appended to `<logs_dir>/<run>/<attempt>.log`.
- Slots: one per GPU (from `CUDA_VISIBLE_DEVICES`, else the UUIDs `nvidia-smi -L` lists, a MIG
  instance's UUID in place of its parent GPU; CUDA is never initialised in this process, which
  forks workers) and `cpu_slots` for runs with `gpus: 0`. A slot is held from `submit` until
  the process has exited and been reaped. Workers get `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so a
  numeric id means the GPU of that index in `nvidia-smi`, not CUDA's fastest-first order.
- The executor id names the owner (host + data directory), the pid, the process start time (so a
  reused pid is not mistaken for the worker), the GPUs held and the log file:
  `owner:pid:start:gpus:run/attempt.log`. A server restarted on the same data directory
  `adopt`s the workers its predecessor started (they keep training while it is down).
- `cancel` sends SIGTERM to the group (the worker writes `latest` and exits) and SIGKILL after the
  grace period, from a background thread: it never blocks the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import kdlab
from kdlab.backend.executors.base import Executor, Launch, ProcessStatus, describe_exit, killed
from kdlab.backend.executors.gpus import detect_gpus

__all__ = [
    "ExecutorId",
    "LocalExecutor",
    "NoSlot",
    "describe_exit",
    "detect_gpus",
    "killed",
]

# the folder that holds the `kdlab` package (the repository, or site-packages)
PROJECT_ROOT = Path(kdlab.__file__).parent.parent
# never handed to a worker: it talks to the API with its own run-scoped token
PRIVATE_ENV = ("KDLAB_TOKEN", "KDLAB_DATABASE_URL")


class NoSlot(RuntimeError):
    """No free slot for the launch right now (or never, see `LocalExecutor.fits`)."""


def default_owner(data_dir: Path) -> str:
    """Host name + a short hash of the data directory: stable across restarts of one server,
    distinct for two servers on one machine that share a database."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]
    return f"{host}-{digest}"


def _start_ticks(pid: int) -> str:
    """The process start time in clock ticks since boot (Linux); "0" where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone" if Path("/proc/self/stat").exists() else "0"
    except OSError:
        return "0"
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str) -> bool:
    """Whether `pid` is still the process that was started (not a zombie, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat_file = Path(f"/proc/{pid}/stat")
    if not stat_file.exists():
        return not Path("/proc/self/stat").exists()  # no /proc (macOS): kill(0) is all we have
    try:
        fields = stat_file.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and (start == "0" or fields[19] == start)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def tail_lines(path: Path, count: int, block: int = 8192) -> list[str]:
    """The last `count` lines of a text file (read backwards in blocks; missing file: [])."""
    if count <= 0:
        return []
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return []
    with handle:
        handle.seek(0, os.SEEK_END)
        position = handle.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(block, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-count:]


@dataclass(frozen=True)
class ExecutorId:
    owner: str
    pid: int
    start: str
    gpus: tuple[str, ...]
    log: str  # relative to the logs dir: "<run>/<attempt>.log"

    def __str__(self) -> str:
        gpus = ",".join(self.gpus) or "-"
        return f"{self.owner}:{self.pid}:{self.start}:{gpus}:{self.log}"

    @classmethod
    def parse(cls, text: str) -> ExecutorId:
        try:
            owner, pid, start, gpus, log = text.split(":", 4)
            return cls(owner, int(pid), start, tuple(gpus.split(",")) if gpus != "-" else (), log)
        except ValueError:
            raise ValueError(f"not a local executor id: {text!r}") from None


@dataclass
class _Process:
    eid: ExecutorId
    popen: subprocess.Popen[bytes] | None  # None: adopted from an earlier server process
    exit_code: int | None = None
    exited: bool = False
    killer: threading.Thread | None = None


class LocalExecutor(Executor):
    """Process groups on this machine; see the module docstring."""

    name = "local"

    def __init__(
        self,
        logs_dir: Path,
        *,
        cpu_slots: int = 1,
        gpu_ids: Sequence[str] | None = None,
        owner: str | None = None,
        cpu_count: int | None = None,
    ):
        if cpu_slots < 1:
            raise ValueError(f"cpu_slots must be at least 1, got {cpu_slots}")
        self.logs_dir = Path(logs_dir)
        self.cpu_slots = cpu_slots
        self.gpu_ids: tuple[str, ...] = tuple(detect_gpus() if gpu_ids is None else gpu_ids)
        for gpu in self.gpu_ids:  # they travel in the executor id, `:`- and `,`-separated
            if not gpu or gpu == "-" or any(c in gpu for c in ":,") or gpu != gpu.strip():
                raise ValueError(f"not a usable GPU id: {gpu!r}")
        self.owner = owner or default_owner(self.logs_dir)
        if ":" in self.owner:
            raise ValueError(f"executor owner may not contain ':' ({self.owner!r})")
        self.cpu_count = cpu_count or os.cpu_count() or 1
        self._lock = threading.RLock()
        self._procs: dict[str, _Process] = {}
        self._free_gpus: list[str] = list(self.gpu_ids)
        self._free_cpu = cpu_slots

    # ------------------------------------------------------------------------------- slots
    def fits(self, gpus: int) -> bool:
        """Whether a launch needing `gpus` GPUs can ever run here."""
        return gpus <= len(self.gpu_ids)

    def has_slot(self, gpus: int) -> bool:
        """Whether a launch needing `gpus` GPUs (0: a CPU slot) could start now."""
        self.poll()
        with self._lock:
            return len(self._free_gpus) >= gpus if gpus > 0 else self._free_cpu > 0

    def summary(self) -> str:
        cpu, gpus = self.free_slots()
        return f"local processes: {cpu} CPU slot(s), {gpus} GPU(s) free"

    def free_slots(self) -> tuple[int, int]:
        """(free CPU slots, free GPUs)."""
        self.poll()
        with self._lock:
            return self._free_cpu, len(self._free_gpus)

    def _acquire(self, gpus: int) -> tuple[str, ...]:
        if not self.fits(gpus):
            raise NoSlot(f"the run needs {gpus} GPUs; this machine has {len(self.gpu_ids)}")
        if gpus > 0:
            if len(self._free_gpus) < gpus:
                raise NoSlot(f"{gpus} GPUs wanted, {len(self._free_gpus)} free")
            held, self._free_gpus = self._free_gpus[:gpus], self._free_gpus[gpus:]
            return tuple(held)
        if self._free_cpu < 1:
            raise NoSlot("no free CPU slot")
        self._free_cpu -= 1
        return ()

    def _release(self, gpus: tuple[str, ...]) -> None:
        if gpus:
            self._free_gpus.extend(g for g in gpus if g not in self._free_gpus)
            order = {g: i for i, g in enumerate(self.gpu_ids)}
            self._free_gpus.sort(key=lambda g: order.get(g, len(order)))
        else:
            self._free_cpu = min(self.cpu_slots, self._free_cpu + 1)

    def threads_for(self, gpus: tuple[str, ...]) -> int:
        """OMP threads for one slot: the cores shared by the slots of its pool."""
        if gpus:
            return max(1, self.cpu_count * len(gpus) // max(1, len(self.gpu_ids)))
        return max(1, self.cpu_count // self.cpu_slots)

    # ------------------------------------------------------------------------------ submit
    def log_path(self, executor_id: str) -> Path:
        return self.logs_dir / ExecutorId.parse(executor_id).log

    def _env(self, launch: Launch, gpus: tuple[str, ...]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        env["OMP_NUM_THREADS"] = str(self.threads_for(gpus))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(launch.env)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # "" hides every GPU
        # numeric ids (an operator's CUDA_VISIBLE_DEVICES) count in nvidia-smi's order, not
        # CUDA's default fastest-first one; UUIDs mean the same device either way
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        # `python -m kdlab.worker.run` imports this project even where it is not installed
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(PROJECT_ROOT) not in paths:
            paths.append(str(PROJECT_ROOT))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def submit(self, launch: Launch) -> str:
        """Start the launch in its own process group; raises `NoSlot` when none is free."""
        with self._lock:
            gpus = self._acquire(launch.gpus)
            try:
                log = f"{launch.run_id}/{launch.attempt}.log"
                log_path = self.logs_dir / log
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("ab") as out:
                    popen = subprocess.Popen(
                        launch.command,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=self._env(launch, gpus),
                        start_new_session=True,
                        close_fds=True,
                    )
            except BaseException:
                self._release(gpus)
                raise
            eid = ExecutorId(self.owner, popen.pid, _start_ticks(popen.pid), gpus, log)
            self._procs[str(eid)] = _Process(eid, popen)
            return str(eid)

    def owns(self, executor_id: str | None) -> bool:
        """Whether the id was made by an executor with this owner (this machine, this data dir)."""
        if not executor_id:
            return False
        try:
            return ExecutorId.parse(executor_id).owner == self.owner
        except ValueError:
            return False

    def run_of(self, executor_id: str) -> tuple[str, int]:
        """(run id, attempt) from the id's log path `<run>/<attempt>.log`."""
        log = ExecutorId.parse(executor_id).log
        run_id, _, attempt = log.partition("/")
        attempt = attempt.removesuffix(".log")
        if not run_id or not attempt.isdigit():
            raise ValueError(f"not a local executor id: {executor_id!r}")
        return run_id, int(attempt)

    def tracked(self) -> list[str]:
        """Executor ids of the processes this executor holds a slot for."""
        with self._lock:
            return [eid for eid, proc in self._procs.items() if not proc.exited]

    def known(self) -> list[str]:
        """Executor ids of every process in the table, exited ones not yet `forget`-ten included."""
        with self._lock:
            return list(self._procs)

    def adopt(self, executor_id: str) -> bool:
        """Track a worker started by an earlier server on this data dir (its slot is held until
        it exits). False when it is not ours, or already gone."""
        if not self.owns(executor_id):
            return False
        eid = ExecutorId.parse(executor_id)
        with self._lock:
            if executor_id in self._procs:
                return not self._procs[executor_id].exited
            if not _alive(eid.pid, eid.start):
                return False
            # hold what it holds (a GPU this server does not hand out is simply not counted)
            gpus = tuple(g for g in eid.gpus if g in self._free_gpus)
            if eid.gpus:
                self._free_gpus = [g for g in self._free_gpus if g not in gpus]
            else:
                self._free_cpu = max(0, self._free_cpu - 1)
            held = ExecutorId(eid.owner, eid.pid, eid.start, gpus, eid.log)
            self._procs[executor_id] = _Process(held, None)
            return True

    # ------------------------------------------------------------------------------ observe
    def _check(self, proc: _Process) -> None:
        """Reap `proc` if it ended: exit code, stragglers in its group killed, slot released."""
        if proc.exited:
            return
        if proc.popen is not None:
            code = proc.popen.poll()
            if code is None:
                return
            proc.exit_code = code
        elif _alive(proc.eid.pid, proc.eid.start):
            return
        proc.exited = True
        _signal_group(proc.eid.pid, signal.SIGKILL)  # children the worker left behind
        self._release(proc.eid.gpus)

    def poll(self) -> list[str]:
        """Reap every tracked process that ended; their executor ids."""
        ended: list[str] = []
        with self._lock:
            for eid, proc in self._procs.items():
                if not proc.exited:
                    self._check(proc)
                    if proc.exited:
                        ended.append(eid)
        return ended

    def status(self, executor_id: str) -> ProcessStatus:
        with self._lock:
            proc = self._procs.get(executor_id)
            if proc is not None:
                self._check(proc)
                if not proc.exited:
                    return ProcessStatus("running", detail=f"pid {proc.eid.pid}")
                if proc.exit_code is None:
                    return ProcessStatus(
                        "exited", None, f"pid {proc.eid.pid} ended; its exit code is unknown"
                    )
                return ProcessStatus("exited", proc.exit_code, describe_exit(proc.exit_code))
        if not self.owns(executor_id):
            return ProcessStatus("unknown", detail="started by another server")
        eid = ExecutorId.parse(executor_id)
        if _alive(eid.pid, eid.start):
            return ProcessStatus("running", detail=f"pid {eid.pid} (not tracked)")
        return ProcessStatus("exited", None, f"pid {eid.pid} ended; its exit code is unknown")

    def logs(self, executor_id: str, tail: int = 200) -> list[str]:
        return tail_lines(self.log_path(executor_id), tail)

    def forget(self, executor_id: str) -> None:
        """Drop an exited process from the table (after the supervisor has handled its end)."""
        with self._lock:
            proc = self._procs.get(executor_id)
            if proc is not None and proc.exited:
                del self._procs[executor_id]

    # ------------------------------------------------------------------------------ stop
    def cancel(self, executor_id: str, grace_seconds: float) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_seconds` (at once when ≤ 0).
        Returns immediately; a second call while the first waits only shortens nothing."""
        with self._lock:
            proc = self._procs.get(executor_id)
            if proc is None:
                if not self.adopt(executor_id):
                    return
                proc = self._procs[executor_id]
            self._check(proc)
            if proc.exited:
                return
            pgid = proc.eid.pid
            if grace_seconds <= 0:
                _signal_group(pgid, signal.SIGKILL)
                return
            if proc.killer is not None and proc.killer.is_alive():
                return
            _signal_group(pgid, signal.SIGTERM)
            proc.killer = threading.Thread(
                target=self._kill_after,
                args=(proc, time.monotonic() + grace_seconds),
                name=f"kdlab-kill-{pgid}",
                daemon=True,
            )
            proc.killer.start()

    def _kill_after(self, proc: _Process, deadline: float) -> None:
        while time.monotonic() < deadline:
            with self._lock:
                self._check(proc)
                if proc.exited:
                    return
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        with self._lock:
            self._check(proc)
            if not proc.exited:
                _signal_group(proc.eid.pid, signal.SIGKILL)
        if proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
        with self._lock:
            self._check(proc)

    def kill_all(self, wait_seconds: float = 10.0) -> None:
        """SIGKILL every tracked process group and reap it (tests, and a server told to stop
        its workers)."""
        with self._lock:
            procs = [p for p in self._procs.values() if not p.exited]
            for proc in procs:
                _signal_group(proc.eid.pid, signal.SIGKILL)
        deadline = time.monotonic() + wait_seconds
        for proc in procs:
            if proc.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.poll()
