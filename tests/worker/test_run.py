"""`python -m kdlab.worker.run` and `kdlab train --server` end to end, as real processes against a real
server (`live_server`, SQLite and PostgreSQL): train, distil from the trained run, cancel, stop
and resume, fail; plus teacher-weight resolution in-process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy.orm import Session

from kdlab.backend.db.engine import make_engine
from kdlab.backend.db.models import Run
from kdlab.backend.services.auth import create_token
from kdlab.backend.settings import Settings
from kdlab.worker import catalog, kd
from kdlab.worker.client import ApiClient
from kdlab.worker.config import RunConfig, TeacherWeights
from kdlab.worker.local_run import load_teacher_state, run_local
from kdlab.worker.metrics import read_jsonl
from kdlab.worker.run import resolve_teacher_weights, run_worker
from tests.factories import DIGITS_KD, DIGITS_TEACHER, config
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("kdlab")
KDLAB = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kdlab.backend.cli"]
PROCESS_TIMEOUT = 60

TINY = {"epochs": 2, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.01}}
TEACHER = config(
    DIGITS_TEACHER,
    name="w-teacher",
    student={"name": "mlp", "params": {"hidden": [32]}},
    train=TINY,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers (OMP_NUM_THREADS=1): identical arithmetic
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- helpers


def worker_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KDLAB_HEARTBEAT_SECONDS": "0.2",
        "KDLAB_DATA_DIR": str(tmp_path / "kdlab-home"),  # nothing lands in ~/.kdlab
        "PYTHONUNBUFFERED": "1",
    }


def run_token(settings: Settings, run_id: str) -> str:
    """A run-scoped token, as the LocalExecutor makes one for each attempt."""
    engine = make_engine(settings.resolved_database_url)
    try:
        with Session(engine) as session:
            token = create_token(session, name=f"worker {run_id}", scope="run", run_id=run_id)
            session.commit()
    finally:
        engine.dispose()
    return token


def db_run(settings: Settings, run_id: str) -> dict[str, Any]:
    engine = make_engine(settings.resolved_database_url)
    try:
        with Session(engine) as session:
            run = session.get(Run, run_id)
            assert run is not None
            found = {"teacher_fingerprint": run.teacher_fingerprint, "heartbeat": run.heartbeat_at}
            session.rollback()
    finally:
        engine.dispose()
    return found


def create(url: str, body: dict[str, Any]) -> str:
    response = httpx.post(f"{url}/api/runs", json=body, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def start_worker(
    url: str, settings: Settings, run_id: str, work_dir: Path, tmp_path: Path
) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "kdlab.worker.run", "--run-id", run_id, "--api", url]
    command += ["--work-dir", str(work_dir)]
    env = {**worker_env(tmp_path), "KDLAB_RUN_TOKEN": run_token(settings, run_id)}
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = PROCESS_TIMEOUT) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"worker still running after {timeout} s:\n{output[-4000:]}") from None
    return output


def run_worker_process(
    url: str, settings: Settings, run_id: str, tmp_path: Path
) -> tuple[int, str]:
    process = start_worker(url, settings, run_id, tmp_path / f"work-{run_id}", tmp_path)
    output = finish(process)
    return process.returncode, output


def get(url: str, path: str, **params: Any) -> Any:
    response = httpx.get(f"{url}{path}", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def metric_keys(url: str, run_id: str) -> dict[str, dict[str, Any]]:
    return {k["key"]: k for k in get(url, f"/api/runs/{run_id}/metrics/keys")["keys"]}


def steps_of(url: str, run_id: str, key: str) -> list[int]:
    series = get(url, f"/api/runs/{run_id}/metrics", keys=key, max_points=10_000)["series"]
    return series[0]["step"] if series else []


def artifacts(url: str, run_id: str) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in get(url, f"/api/runs/{run_id}/artifacts")}


def download(url: str, path: str, dest: Path) -> tuple[Path, httpx.Response]:
    response = httpx.get(f"{url}{path}", timeout=60)
    assert response.status_code == 200, response.text
    dest.write_bytes(response.content)
    return dest, response


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_worker_trains_a_run_end_to_end(live_server, settings, tmp_path):
    teacher_id = create(live_server, TEACHER)
    code, output = run_worker_process(live_server, settings, teacher_id, tmp_path)
    assert code == 0, output
    run = get(live_server, f"/api/runs/{teacher_id}")
    assert (run["status"], run["error"]) == ("succeeded", None), output
    assert run["started_at"] and run["finished_at"]

    stored = artifacts(live_server, teacher_id)
    assert {n: a["kind"] for n, a in stored.items()} == {
        "best.safetensors": "checkpoint",
        "latest.pt": "checkpoint",
        "student.safetensors": "student",
        "metrics.jsonl": "file",
        "metadata.json": "file",
    }
    student, response = download(
        live_server, f"/api/runs/{teacher_id}/student", tmp_path / "teacher-student.safetensors"
    )
    assert response.headers["x-content-sha256"] == sha256(student)
    work = tmp_path / f"work-{teacher_id}"
    assert sha256(work / "student.safetensors") == sha256(student)
    assert stored["student.safetensors"]["sha256"] == sha256(student)

    keys = metric_keys(live_server, teacher_id)
    assert {"train/loss_total", "train/loss_student", "train/lr", "sys/step_time_ms"} <= set(keys)
    assert {"eval/student_acc", "eval/exported_student_acc"} <= set(keys)
    assert steps_of(live_server, teacher_id, "train/loss_total") == [10, 20, 30, 40, 46]
    local = [p for p in read_jsonl(work / "metrics.jsonl") if p["key"] == "eval/student_acc"]
    assert keys["eval/student_acc"]["last_value"] == local[-1]["value"]

    logs = get(live_server, f"/api/runs/{teacher_id}/logs", tail=500)["lines"]
    assert any(line.startswith("metadata {") for line in logs)
    assert any("| eval | " in line for line in logs)
    assert any(line.startswith(f"done: run {teacher_id} succeeded") for line in logs)
    metadata, _ = download(
        live_server, f"/api/runs/{teacher_id}/artifacts/metadata.json", tmp_path / "m.json"
    )
    assert json.loads(metadata.read_text())["total_steps"] == 46


def train_in_process(url: str, settings: Settings, run_id: str, work_dir: Path) -> list[str]:
    """`run_worker` in this process (imports are warm: seconds, not a new interpreter)."""
    lines: list[str] = []
    with ApiClient(url, run_token(settings, run_id), run_id=run_id) as client:
        outcome = run_worker(
            client,
            run_id,
            work_dir,
            heartbeat_seconds=0.2,
            forward_output=False,
            handle_signals=False,
            echo=lines.append,
        )
    assert (outcome.status, outcome.exit_code) == ("succeeded", 0), "\n".join(lines)
    return lines


@pytest.mark.slow
def test_worker_distils_from_a_worker_trained_runs_best_checkpoint(live_server, settings, tmp_path):
    teacher_id = create(live_server, TEACHER)
    train_in_process(live_server, settings, teacher_id, tmp_path / "teacher-work")

    # the distill run reads the teacher run's best.safetensors with its own run token
    kd_config = config(
        DIGITS_KD,
        name="w-kd",
        teacher={
            "name": "mlp",
            "params": {"hidden": [32]},
            "weights": {"run_id": teacher_id, "checkpoint": "best"},
        },
        train=TINY,
    )
    kd_id = create(live_server, kd_config)
    code, output = run_worker_process(live_server, settings, kd_id, tmp_path)
    assert code == 0, output
    assert get(live_server, f"/api/runs/{kd_id}")["status"] == "succeeded"
    keys = metric_keys(live_server, kd_id)
    assert {"train/kd/output~output", "train/kd_weighted/output~output"} <= set(keys)
    assert {"eval/teacher_acc", "eval/agreement", "eval/kl", "eval/student_acc"} <= set(keys)
    assert keys["eval/teacher_acc"]["count"] == 3  # before training (step 0) and each epoch

    best, _ = download(
        live_server, f"/api/runs/{teacher_id}/artifacts/best.safetensors", tmp_path / "b.st"
    )
    spec = RunConfig.model_validate(kd_config)
    assert spec.teacher is not None
    info = catalog.build_dataset(spec.dataset, spec.seed).info
    teacher = kd.restore(catalog.build_model(spec.teacher, info), best)
    assert db_run(settings, kd_id)["teacher_fingerprint"] == kd.fingerprint(teacher)


@pytest.mark.slow
def test_cancel_while_training_saves_uploads_latest_and_ends_cancelled(
    live_server, settings, tmp_path
):
    body = config(TEACHER, name="w-cancel", train={**TINY, "epochs": 300, "batch_size": 16})
    run_id = create(live_server, body)
    process = start_worker(live_server, settings, run_id, tmp_path / "work", tmp_path)
    # the checkpoint watcher uploads latest.pt after each epoch, while the run goes on
    wait_for(
        lambda: "latest.pt" in artifacts(live_server, run_id),
        45,
        "latest.pt",
        interval=0.02,
        process=process,
    )
    assert get(live_server, f"/api/runs/{run_id}")["status"] == "running"
    periodic, _ = download(
        live_server, f"/api/runs/{run_id}/artifacts/latest.pt", tmp_path / "p.pt"
    )
    periodic_step = torch.load(periodic, weights_only=True)["global_step"]
    assert periodic_step % 90 == 0 and periodic_step > 0  # an epoch end: 90 steps per epoch
    assert db_run(settings, run_id)["heartbeat"] is not None

    response = httpx.post(f"{live_server}/api/runs/{run_id}/cancel", timeout=30)
    assert response.json()["cancel_requested"] is True
    output = finish(process, timeout=30)
    assert process.returncode == 0, output

    run = get(live_server, f"/api/runs/{run_id}")
    assert run["status"] == "cancelled", output
    assert run["finished_at"] is not None
    assert "cancel requested: writing latest.pt and stopping" in output
    latest, _ = download(live_server, f"/api/runs/{run_id}/artifacts/latest.pt", tmp_path / "l.pt")
    assert sha256(latest) == sha256(tmp_path / "work" / "latest.pt")
    stopped_at = torch.load(latest, weights_only=True)["global_step"]
    assert periodic_step < stopped_at < 300 * 90
    assert "student.safetensors" not in artifacts(live_server, run_id)
    assert steps_of(live_server, run_id, "train/loss_total")[-1] <= stopped_at


@pytest.mark.slow
def test_sigterm_without_cancel_leaves_the_run_to_resume_exactly(live_server, settings, tmp_path):
    epochs = 40  # 90 steps each
    # long enough (~3 s of steps) that the signal lands mid-training on a busy 2-core machine
    body = config(TEACHER, name="w-resume", train={**TINY, "epochs": epochs, "batch_size": 16})
    run_id = create(live_server, body)
    first_work = tmp_path / "attempt-1"
    process = start_worker(live_server, settings, run_id, first_work, tmp_path)

    def trained_a_little() -> bool:
        path = first_work / "metrics.jsonl"
        return path.exists() and any(
            p["key"] == "train/loss_total" and p["step"] >= 20 for p in read_jsonl(path)
        )

    wait_for(trained_a_little, 45, "20 training steps", interval=0.02, process=process)
    os.kill(process.pid, signal.SIGTERM)  # e.g. the machine shuts down: no cancel was asked
    output = finish(process, timeout=30)
    assert process.returncode == 143, output
    assert "stopped by a signal" in output
    assert get(live_server, f"/api/runs/{run_id}")["status"] == "running"  # left to resume
    saved, _ = download(live_server, f"/api/runs/{run_id}/artifacts/latest.pt", tmp_path / "s.pt")
    stopped_at = torch.load(saved, weights_only=True)["global_step"]
    assert 20 <= stopped_at < epochs * 90

    # the next attempt, on "another machine" (a fresh work dir), resumes from the uploaded latest
    # (run in this process: the same code path as `python -m kdlab.worker.run`, without the start-up)
    lines = train_in_process(live_server, settings, run_id, tmp_path / "attempt-2")
    assert any(line.startswith("resuming from the run's latest.pt") for line in lines)
    assert get(live_server, f"/api/runs/{run_id}")["status"] == "succeeded"
    expected_steps = list(range(10, epochs * 90 + 1, 10))
    assert steps_of(live_server, run_id, "train/loss_total") == expected_steps  # each once
    assert steps_of(live_server, run_id, "eval/student_acc") == list(range(90, epochs * 90 + 1, 90))

    # the same numbers as one uninterrupted run of the same config
    config_file = tmp_path / "w-resume.json"
    config_file.write_text(json.dumps(body))
    reference = run_local(config_file, tmp_path / "reference", device="cpu", echo=lambda _: None)
    final = {k: v["last_value"] for k, v in metric_keys(live_server, run_id).items()}
    for key in ("train/loss_total", "eval/student_acc", "eval/student_loss"):
        assert final[key] == reference.metrics[key], key


@pytest.mark.slow
def test_a_failing_run_reports_the_error_and_its_traceback_tail(live_server, settings, tmp_path):
    body = config(TEACHER, name="w-nan", train={**TINY, "epochs": 1, "optimizer": {"lr": 1e30}})
    run_id = create(live_server, body)
    code, output = run_worker_process(live_server, settings, run_id, tmp_path)
    assert code == 1, output
    run = get(live_server, f"/api/runs/{run_id}")
    assert run["status"] == "failed"
    error = run["error"]
    message, _, tail = error.partition("\n\n")
    assert " in train/loss" in message and "at step 10" in message
    assert tail.startswith("Traceback") or "File " in tail
    assert len(tail.splitlines()) <= 20
    assert tail.splitlines()[-1].startswith("ValueError: ")
    logs = get(live_server, f"/api/runs/{run_id}/logs", tail=1000)["lines"]
    assert tail.splitlines()[-1] in logs  # the traceback went to the log as error lines


@pytest.mark.slow
def test_kdlab_train_server_registers_an_external_run_and_reports(live_server, tmp_path):
    body = config(TEACHER, name="w-external", train={**TINY, "epochs": 1})
    config_file = tmp_path / "external.json"
    config_file.write_text(json.dumps(body))
    command = [*KDLAB, "train", str(config_file), "--server", live_server]
    command += ["--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(
        command,
        cwd=tmp_path,
        env=worker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = get(live_server, "/api/runs", kind="external")["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert (run["name"], run["experiment"], run["status"]) == (
        "w-external",
        "digits-kd",
        "succeeded",
    )
    assert run["config"]["params"]["student"] == body["student"]
    url = f"{live_server}/runs/{run['id']}"
    assert f"registered external run {run['id']} (w-external, experiment digits-kd): {url}" in (
        proc.stdout
    )
    assert f"run {run['id']} succeeded: {url}" in proc.stdout
    assert {"train/loss_total", "eval/student_acc"} <= set(metric_keys(live_server, run["id"]))
    assert "student.safetensors" in artifacts(live_server, run["id"])


# --------------------------------------------------------------------------- teacher weights


def test_teacher_weights_from_an_upload_and_from_a_runs_latest(live_server, tmp_path):
    from safetensors.torch import save_file

    spec = RunConfig.model_validate(
        config(DIGITS_KD, teacher={"name": "mlp", "params": {"hidden": [32]}})
    )
    assert spec.teacher is not None
    info = catalog.build_dataset(spec.dataset, spec.seed).info
    torch.manual_seed(3)
    trained = catalog.build_model(spec.teacher, info)
    expected = trained.state_dict()

    # an upload: a plain safetensors state dict (no KD Lab metadata)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in expected.items()}, str(plain))
    upload = httpx.post(
        f"{live_server}/api/uploads", files={"file": ("t.safetensors", plain.read_bytes())}
    ).json()
    by_upload = spec.model_copy(deep=True)
    assert by_upload.teacher is not None
    by_upload.teacher.weights = TeacherWeights(upload_id=upload["id"])

    # a run's latest.pt: the model entry of a training checkpoint (adapters dropped)
    with ApiClient(live_server) as admin:
        registered = admin.register_external({"name": "holder"})
    latest = tmp_path / "latest.pt"
    state = {**expected, "_kd_adapters.x.weight": torch.zeros(2)}
    torch.save({"format": "kdlab.latest/1", "model": state, "global_step": 7}, latest)
    holder = ApiClient(live_server, registered.token, run_id=registered.run_id)
    holder.put_artifact(latest, "latest.pt", "checkpoint")
    by_latest = spec.model_copy(deep=True)
    assert by_latest.teacher is not None
    by_latest.teacher.weights = TeacherWeights(run_id=registered.run_id, checkpoint="latest")

    with ApiClient(live_server) as client:
        for case in (by_upload, by_latest):
            path = resolve_teacher_weights(case, client, tmp_path / "teacher")
            assert path is not None and path.parent == tmp_path / "teacher"
            loaded = load_teacher_state(case, path, info)
            assert set(loaded) == set(expected)
            assert all(torch.equal(loaded[k], expected[k]) for k in expected)

        missing = spec.model_copy(deep=True)
        assert missing.teacher is not None
        missing.teacher.weights = TeacherWeights(run_id=registered.run_id, checkpoint="best")
        with pytest.raises(FileNotFoundError, match="cannot download its best.safetensors"):
            resolve_teacher_weights(missing, client, tmp_path / "teacher")
    holder.close()
