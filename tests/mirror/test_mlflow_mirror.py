"""The MLflow mirror against a real MLflow tracking store (a SQLite file), on SQLite and PostgreSQL
app databases: outbox rows written by the ORM hooks in the transaction that made the change, runs,
params, tags, metric histories, statuses and the student model read back with `MlflowClient`, and
MLflow unreachable → the outbox holds everything and catches up exactly once."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from kdlab.backend.db.models import MlflowOutbox, Run, utcnow
from kdlab.backend.mlflow import MlflowMirror, hooks
from kdlab.backend.mlflow import format as fmt
from kdlab.backend.settings import Settings
from kdlab.worker import catalog, kd
from kdlab.worker.config import ModelSpec, RunConfig
from kdlab.worker.kd import losses
from kdlab.worker.loss_formula import describe_from_config, loss_formula
from tests.conftest import free_port
from tests.factories import DIGITS_KD, DIGITS_TEACHER

# MLflow's own store code, under SQLAlchemy 2.1
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real MLflow store for the module (creating its tables takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def mirrored(settings: Settings, mlflow_uri: str) -> Settings:
    return settings.model_copy(update={"mlflow_tracking_uri": mlflow_uri})


@pytest.fixture
def api(mirrored: Settings) -> Iterator[TestClient]:
    """The app, with any mirror of its own off: the tests drain with mirrors they make; the
    outbox hooks on its sessionmaker, as a mirror's `start()` installs them."""
    from kdlab.backend.main import create_app

    app = create_app(mirrored.model_copy(update={"mlflow_tracking_uri": "none"}))
    hooks.install_outbox_hooks(app.state.session_factory)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as test_client:
            yield test_client
    finally:
        hooks.uninstall_outbox_hooks(app.state.session_factory)
        app.state.engine.dispose()


def factory(api: TestClient) -> sessionmaker[Session]:
    return api.app.state.session_factory  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- helpers


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create(api: TestClient, base: dict[str, Any], **changes: Any) -> str:
    body = copy.deepcopy(base)
    body.update(changes)
    response = api.post("/api/runs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def outbox_rows(api: TestClient, run_id: str | None = None) -> list[MlflowOutbox]:
    with factory(api)() as session:
        query = select(MlflowOutbox).order_by(MlflowOutbox.id)
        if run_id is not None:
            query = query.where(MlflowOutbox.run_id == run_id)
        rows = list(session.scalars(query))
        session.expunge_all()  # keep the loaded values; the rollback ends the read
        session.rollback()
    return rows


def post_metrics(api: TestClient, run_id: str, points: list[dict[str, Any]]) -> None:
    """POST a batch; queue it for MLflow ourselves if the metrics service does not (yet)."""
    before = len([r for r in outbox_rows(api, run_id) if r.kind == hooks.METRICS])
    response = api.post(f"/api/runs/{run_id}/metrics", json={"points": points})
    assert response.status_code == 200, response.text
    after = len([r for r in outbox_rows(api, run_id) if r.kind == hooks.METRICS])
    if after == before:  # the service's enqueue_metrics call is not wired in yet
        with factory(api)() as session:
            hooks.enqueue_metrics(session, run_id, points)
            session.commit()


def log_loss_metadata(api: TestClient, run_id: str, config: dict[str, Any]) -> None:
    """The `metadata {...}` log line a distill run's trainer posts (`kdlab.worker.http_sink`), with the
    loss formula it writes (`kdlab.worker.loss_formula`)."""
    spec = RunConfig.model_validate(config)
    meta = {"loss": loss_formula(spec, describe_from_config(spec))}
    line = "metadata " + json.dumps(meta, ensure_ascii=False, sort_keys=True)
    response = api.post(f"/api/runs/{run_id}/logs", json={"lines": [line]})
    assert response.status_code == 200, response.text


def curve(key: str, steps: range, offset: float = 0.0) -> list[dict[str, Any]]:
    return [
        {"key": key, "step": s, "value": 1.0 / (s + 1) + offset, "time": 1_763_900_000.0 + s}
        for s in steps
    ]


def set_run(api: TestClient, run_id: str, **values: Any) -> None:
    """Change a run through the ORM, as the executors and the worker routes do."""
    with factory(api)() as session:
        run = session.get(Run, run_id)
        assert run is not None
        for name, value in values.items():
            setattr(run, name, value)
        session.commit()


def upload_student(api: TestClient, run_id: str, tmp_path: Path, hidden: list[int]) -> bytes:
    info = catalog.DataInfo("classification", 10, (64,), torch.float32)
    model = catalog.build_model(ModelSpec(name="mlp", params={"hidden": hidden}), info)
    path = kd.save(model, tmp_path / f"{uuid.uuid4().hex}.safetensors")
    data = path.read_bytes()
    response = api.put(
        f"/api/runs/{run_id}/artifacts/student.safetensors",
        params={"kind": "student"},
        content=data,
        headers={"X-Content-SHA256": hashlib.sha256(data).hexdigest()},
    )
    assert response.status_code in (200, 201), response.text
    return data


def mlflow_run(mlflow: MlflowClient, api: TestClient, run_id: str) -> Any:
    with factory(api)() as session:
        run = session.get(Run, run_id)
        assert run is not None and run.mlflow_run_id, f"run {run_id} has no MLflow run"
        mlflow_run_id = run.mlflow_run_id
        session.rollback()
    return mlflow.get_run(mlflow_run_id)


def history(mlflow: MlflowClient, mlflow_run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.get_metric_history(mlflow_run_id, key))


def expected(points: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return sorted((p["step"], p["value"]) for p in points)


# --------------------------------------------------------------------------- pure helpers


def test_params_are_the_flattened_config_cut_to_mlflows_limit() -> None:
    params = fmt.flatten_params(
        {**DIGITS_KD, "notes": "x" * 2000, "empty": {}, "flags": [True, None]}
    )
    assert params["train.optimizer.lr"] == "0.003"
    assert params["distill.pairs.0.loss.params.temperature"] == "4.0"
    assert params["distill.pairs.0.student_layer"] == ""
    assert params["student.params.hidden"] == "[16]"
    assert params["dataset.params"] == "{}"
    assert params["flags"] == "[true, null]"
    assert len(params["notes"]) == fmt.PARAM_VALUE_MAX
    assert params["notes"].endswith(fmt.TRUNCATED)
    assert all(len(v) <= fmt.PARAM_VALUE_MAX for v in params.values())


def test_metric_keys_become_names_mlflow_accepts() -> None:
    assert fmt.mlflow_key("train/kd/output~output") == "train/kd/output-to-output"
    assert fmt.mlflow_key("train/loss_total") == "train/loss_total"
    assert fmt.mlflow_key("a//b/./c/") == "a/b/c"
    assert fmt.mlflow_key("weird key!") == "weird key_"
    long = fmt.mlflow_key("k" * 400)
    assert len(long) == fmt.KEY_MAX and long != fmt.mlflow_key("k" * 399)


def test_kd_tags_name_the_conventions() -> None:
    config = copy.deepcopy(DIGITS_KD)
    config["distill"]["pairs"].append(
        {"student_layer": "net.0", "teacher_layer": "net.0", "loss": {"name": "feature_mse"}}
    )
    config["distill"]["balancer"]["params"]["kd_weight"] = [0.5, 0.2]
    tags = fmt.kd_tags(config)
    assert tags["kd.losses"] == "logits_kl,feature_mse"
    assert tags["kd.pairs"] == "output~output,net.0~net.0"
    assert tags["kd.temperatures"] == "4.0"
    assert tags["kd.t2_convention"] == "pair 0: LogitsKL multiplies by T² (T=4.0, factor 16.0)"
    assert tags["kd.balancer"] == "static"
    assert tags["kd.balancer.kd_weight"] == "[0.5, 0.2]"
    no_t2 = copy.deepcopy(DIGITS_KD)
    no_t2["distill"]["pairs"][0]["loss"]["params"]["scale_by_t2"] = False
    assert "does not multiply by T²" in fmt.kd_tags(no_t2)["kd.t2_convention"]
    assert fmt.kd_tags(DIGITS_TEACHER) == {"kd.student": "mlp"}


def test_each_loss_declares_its_t2_convention_and_the_tags_follow_it() -> None:
    for name, cls in losses.LOSSES.items():
        assert "t2_scaling" in vars(cls), f"{name}: {cls.__name__} declares no t2_scaling"
        switch = "scale_by_t2" in inspect.signature(cls.__init__).parameters
        assert (cls.t2_scaling == "switchable") == switch, name

    def convention(name: str, **params: Any) -> str | None:
        config = copy.deepcopy(DIGITS_KD)
        config["distill"]["pairs"][0]["loss"] = {"name": name, "params": params}
        return fmt.kd_tags(config).get("kd.t2_convention")

    assert convention("dkd") == "DKDLoss multiplies by T² (T=4.0)"
    assert convention("generalized_jsd", temperature=2.0) == (
        "GeneralizedJSD has no T² factor (T=2.0)"
    )
    assert convention("mft", temperature=2.0) == "MFTLoss multiplies by T² (T=2.0, factor 4.0)"
    assert convention("mft", scale_by_t2=False) == (
        "MFTLoss does not multiply by T² (scale_by_t2=false, T=1.0)"
    )
    assert convention("feature_mse") is None  # no temperature, no convention to name
    assert convention("someone_elses_loss", temperature=2.0) is None


# --------------------------------------------------------------------------- the hooks


def test_hooks_enqueue_in_the_transaction_that_made_the_change(api: TestClient) -> None:
    experiment = unique("hooks")
    run_id = create(api, DIGITS_KD, experiment=experiment, name="kd")
    [created] = outbox_rows(api, run_id)
    assert created.kind == hooks.RUN_CREATED and created.done_at is None
    assert created.payload["experiment"] == experiment and created.payload["name"] == "kd"
    assert created.payload["params"]["distill.balancer.params.kd_weight"] == "0.7"
    assert created.payload["tags"]["kdlab.kind"] == "distill"
    assert created.payload["tags"]["kd.temperatures"] == "4.0"

    # a rolled-back change leaves nothing; setting an equal value is no change
    with factory(api)() as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.status = "running"
        session.flush()
        session.rollback()
    set_run(api, run_id, status="queued", name="renamed")
    assert len(outbox_rows(api, run_id)) == 1

    set_run(api, run_id, status="running", teacher_fingerprint="f" * 64)
    # a bulk UPDATE (how an executor may claim or requeue runs) is seen too
    with factory(api)() as session:
        session.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=utcnow()))
        session.execute(update(Run).where(Run.id == run_id).values(status="failed", error="boom"))
        session.commit()
    with factory(api)() as session:  # ORM bulk UPDATE by primary key
        session.execute(update(Run), [{"id": run_id, "error": "boom"}])  # unchanged
        session.execute(update(Run), [{"id": run_id, "status": "cancelled"}])
        session.commit()
    rows = outbox_rows(api, run_id)
    assert [r.kind for r in rows] == [hooks.RUN_CREATED] + [hooks.RUN_UPDATED] * 3
    assert rows[3].payload["status"] == "cancelled" and rows[3].payload["changed"] == ["status"]
    assert rows[1].payload["status"] == "running"
    assert rows[1].payload["changed"] == ["status", "teacher_fingerprint"]
    assert rows[2].payload["status"] == "failed" and rows[2].payload["error"] == "boom"
    assert rows[2].payload["teacher_fingerprint"] == "f" * 64


def test_hooks_watch_only_the_apps_own_sessions(api: TestClient) -> None:
    """Another sessionmaker on the same database (a CLI command's, a script's) queues nothing:
    the hooks are on the app's sessionmaker, not on every `Session` in the process."""
    run_id = create(api, DIGITS_TEACHER, experiment=unique("scoped"))
    app_factory = factory(api)
    other = sessionmaker(app_factory.kw["bind"], expire_on_commit=False)
    assert hooks.hooks_installed(app_factory) and not hooks.hooks_installed(other)
    for session in (other(), Session(app_factory.kw["bind"])):
        with session:
            assert not hooks.hooks_installed(session)
            run = session.get(Run, run_id)
            assert run is not None
            run.status = "cancelled" if run.status != "cancelled" else "queued"
            session.commit()
            session.execute(update(Run).where(Run.id == run_id).values(error="elsewhere"))
            hooks.enqueue_metrics(session, run_id, curve("train/loss_total", range(3)))
            session.commit()
    assert [r.kind for r in outbox_rows(api, run_id)] == [hooks.RUN_CREATED]
    set_run(api, run_id, status="running")  # the app's own sessions are still watched
    assert [r.kind for r in outbox_rows(api, run_id)] == [hooks.RUN_CREATED, hooks.RUN_UPDATED]


def test_student_uploads_and_metric_batches_are_queued(api: TestClient, tmp_path: Path) -> None:
    run_id = create(api, DIGITS_TEACHER, experiment=unique("queue"))
    set_run(api, run_id, status="running")
    response = api.put(
        f"/api/runs/{run_id}/artifacts/latest.pt",
        params={"kind": "checkpoint"},
        content=b"x",
        headers={"X-Content-SHA256": hashlib.sha256(b"x").hexdigest()},
    )
    assert response.status_code == 201, response.text
    upload_student(api, run_id, tmp_path, [8])
    upload_student(api, run_id, tmp_path, [9])  # replaced: queued again
    with factory(api)() as session:
        hooks.enqueue_metrics(session, run_id, curve("train/loss_total", range(3)))
        hooks.enqueue_metrics(session, run_id, [])
        session.commit()
    rows = outbox_rows(api, run_id)
    kinds = [r.kind for r in rows]
    assert kinds == [
        hooks.RUN_CREATED,
        hooks.RUN_UPDATED,
        hooks.STUDENT,
        hooks.STUDENT,
        hooks.METRICS,
    ]
    first, second = rows[2].payload, rows[3].payload
    assert first["artifact_id"] == second["artifact_id"] and first["sha256"] != second["sha256"]
    assert rows[4].payload == {"ranges": {"train/loss_total": [0, 2]}, "points": 3}


# --------------------------------------------------------------------------- end to end


def test_runs_metrics_statuses_and_student_arrive_in_mlflow(
    api: TestClient, mirrored: Settings, mlflow_uri: str, tmp_path: Path
) -> None:
    experiment = unique("digits-kd")
    teacher = create(api, DIGITS_TEACHER, experiment=experiment, name="teacher")
    student = create(api, DIGITS_KD, experiment=experiment, name="kd-student")
    cancelled = create(api, DIGITS_TEACHER, experiment=experiment, name="never-ran")

    set_run(api, teacher, status="running", started_at=utcnow())
    log_loss_metadata(api, student, DIGITS_KD)  # the trainer's metadata, once it started
    set_run(api, student, status="running", teacher_fingerprint="ab" * 32)
    teacher_points = curve("train/loss_total", range(0, 1500)) + curve(
        "eval/acc", range(0, 1500, 500)
    )
    kd_points = curve("train/kd/output~output", range(0, 30, 10)) + curve(
        "train/loss_total", range(0, 30, 10)
    )
    post_metrics(api, teacher, teacher_points[:700])
    post_metrics(api, teacher, teacher_points[700:])
    post_metrics(api, student, kd_points)
    upload_student(api, student, tmp_path, [16])
    set_run(api, teacher, status="succeeded", finished_at=utcnow())
    with factory(api)() as session:  # the bulk path, as a sweeper might write it
        session.execute(
            update(Run)
            .where(Run.id == student)
            .values(
                status="failed", error="Traceback ...\nValueError: NaN in train/kd/output~output"
            )
        )
        session.commit()
    assert api.post(f"/api/runs/{cancelled}/cancel").status_code == 200

    mirror = MlflowMirror(mirrored, factory(api))
    total = len(outbox_rows(api))
    assert mirror.drain_once(limit=1000) == total
    assert mirror.drain_once() == 0 and mirror.pending() == 0

    mlflow = MlflowClient(mlflow_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    assert exp is not None
    runs = mlflow.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["kd-student", "never-ran", "teacher"]

    t = mlflow_run(mlflow, api, teacher)
    assert t.info.status == "FINISHED" and t.info.end_time is not None
    assert t.data.params["train.optimizer.lr"] == "0.003"
    assert t.data.params["student.params.hidden"] == "[64]"
    assert t.data.tags["kdlab.kind"] == "train" and t.data.tags["kdlab.status"] == "succeeded"
    assert t.data.tags["kdlab.run_id"] == teacher
    assert not [k for k in t.data.tags if k.endswith(".formula")]  # a train run has no KD terms
    assert history(mlflow, t.info.run_id, "train/loss_total") == expected(teacher_points[:1500])
    assert history(mlflow, t.info.run_id, "eval/acc") == expected(teacher_points[1500:])
    first = min(mlflow.get_metric_history(t.info.run_id, "eval/acc"), key=lambda m: m.step)
    assert first.timestamp == 1_763_900_000_000  # the point's wall time, in ms

    s = mlflow_run(mlflow, api, student)
    assert s.info.status == "FAILED"
    assert s.data.params["distill.pairs.0.loss.params.temperature"] == "4.0"
    assert s.data.tags["kd.losses"] == "logits_kl"
    assert s.data.tags["kd.temperatures"] == "4.0"
    assert s.data.tags["kd.t2_convention"].startswith("LogitsKL multiplies by T²")
    assert s.data.tags["kd.balancer.kd_weight"] == "0.7"
    assert "16 · KL" in s.data.tags["kd.pair.0.formula"]
    assert s.data.tags["kdlab.teacher_fingerprint"] == "ab" * 32
    assert s.data.tags["kdlab.error"].endswith("NaN in train/kd/output~output")
    assert history(mlflow, s.info.run_id, "train/kd/output-to-output") == expected(kd_points[:3])
    files = {f.path for f in mlflow.list_artifacts(s.info.run_id, "student")}
    assert files == {"student/MLmodel", "student/student.safetensors"}
    local = Path(mlflow.download_artifacts(s.info.run_id, "student/MLmodel", str(tmp_path)))
    mlmodel = yaml.safe_load(local.read_text())
    signature = mlmodel["signature"]
    assert '"shape": [-1, 64]' in signature["inputs"] and "float32" in signature["inputs"]
    assert '"shape": [-1, 10]' in signature["outputs"]
    assert mlmodel["flavors"]["kdlab"]["weights"] == "student.safetensors"
    assert s.data.tags["kdlab.student_sha256"] == mlmodel["flavors"]["kdlab"]["sha256"]

    assert mlflow_run(mlflow, api, cancelled).info.status == "KILLED"
    body = api.get(f"/api/runs/{student}").json()
    assert body["mlflow_run_id"] == s.info.run_id

    # a re-sent batch and a resumed run re-logging steps add nothing; new steps are added
    set_run(api, teacher, status="running")  # (a finished run takes no points)
    post_metrics(api, teacher, teacher_points[600:800])
    post_metrics(api, teacher, curve("train/loss_total", range(1400, 1600), offset=1.0))
    assert mirror.drain_once() == len(outbox_rows(api)) - total
    got = history(mlflow, t.info.run_id, "train/loss_total")
    assert [step for step, _ in got] == list(range(1600))
    assert got[1499] == (1499, 1.0 / 1500) and got[1500] == (1500, 1.0 / 1501 + 1.0)


# --------------------------------------------------------------------------- MLflow down


def test_mlflow_unreachable_outbox_waits_then_catches_up_exactly_once(
    api: TestClient, mirrored: Settings, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in MLFLOW_HTTP_ENV.items():
        monkeypatch.setenv(name, value)
    down = MlflowMirror(
        mirrored.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}"}),
        factory(api),
    )
    down.start(interval=0.05)  # keeps failing in the background while the API is used
    try:
        experiment = unique("offline")
        run_id = create(api, DIGITS_TEACHER, experiment=experiment, name="offline")
        set_run(api, run_id, status="running")
        points = curve("train/loss_total", range(0, 2500))
        started = time.monotonic()
        for start in range(0, 2500, 500):
            post_metrics(api, run_id, points[start : start + 500])
        assert api.get("/api/health").status_code == 200
        assert time.monotonic() - started < 20  # nothing waited on MLflow
        set_run(api, run_id, status="succeeded", finished_at=utcnow())
        deadline = time.monotonic() + 10
        while down.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert down.failures >= 2
    finally:
        down.stop()
    assert down.drain_once() == 0
    rows = outbox_rows(api, run_id)
    assert len(rows) == 8 and all(r.done_at is None for r in rows)
    first = outbox_rows(api)[0]
    assert first.attempts >= 3
    assert first.last_error and "Connection" in first.last_error
    with factory(api)() as session:
        run = session.get(Run, run_id)
        assert run is not None and run.mlflow_run_id is None
        session.rollback()

    up = MlflowMirror(mirrored, factory(api))
    assert up.drain_once(limit=1000) == len(outbox_rows(api))
    mlflow = MlflowClient(mlflow_uri)
    remote = mlflow_run(mlflow, api, run_id)
    assert remote.info.status == "FINISHED"
    assert history(mlflow, remote.info.run_id, "train/loss_total") == expected(points)
    exp = mlflow.get_experiment_by_name(experiment)
    assert exp is not None and len(mlflow.search_runs([exp.experiment_id])) == 1

    # a crash after MLflow took a batch but before done_at was written: sent again, not doubled
    with factory(api)() as session:
        session.execute(
            update(MlflowOutbox)
            .where(MlflowOutbox.run_id == run_id, MlflowOutbox.kind != hooks.RUN_CREATED)
            .values(done_at=None)
        )
        session.commit()
    again = MlflowMirror(mirrored, factory(api))  # a restarted process: nothing cached
    assert again.drain_once() == 7
    assert len(mlflow.get_metric_history(remote.info.run_id, "train/loss_total")) == 2500
    assert len(mlflow.search_runs([exp.experiment_id])) == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_formulas_come_from_the_workers_metadata_once_it_logged_them(
    api: TestClient, mirrored: Settings, mlflow_uri: str
) -> None:
    """A run's `kd.pair.<i>.formula` is what its trainer logged; before the trainer logged it
    the MLflow run has the config's tags but no formula, and gets it with the next status change
    mirrored after the metadata arrived."""
    run_id = create(api, DIGITS_KD, experiment=unique("formula"))
    mirror = MlflowMirror(mirrored, factory(api))
    mlflow = MlflowClient(mlflow_uri)
    assert mirror.drain_once() == 1
    tags = mlflow_run(mlflow, api, run_id).data.tags
    assert tags["kd.losses"] == "logits_kl" and "kd.pair.0.formula" not in tags
    set_run(api, run_id, status="starting")
    assert mirror.drain_once() == 1
    assert "kd.pair.0.formula" not in mlflow_run(mlflow, api, run_id).data.tags
    log_loss_metadata(api, run_id, DIGITS_KD)
    assert mirror.drain_once() == 0  # a log line queues nothing by itself
    set_run(api, run_id, status="running")
    assert mirror.drain_once() == 1
    formula = mlflow_run(mlflow, api, run_id).data.tags["kd.pair.0.formula"]
    assert formula == losses.LogitsKL(temperature=4.0).describe() and "16 · KL" in formula


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_row_mlflow_refuses_is_given_up_and_the_queue_moves_on(
    api: TestClient, mirrored: Settings, mlflow_uri: str
) -> None:
    run_id = create(api, DIGITS_TEACHER, experiment=unique("refused"))
    with factory(api)() as session:
        hooks.enqueue(session, run_id, "no-such-kind", {})
        session.commit()
    post_metrics(api, run_id, curve("ok", range(3)))
    mirror = MlflowMirror(mirrored, factory(api))
    assert mirror.drain_once() == 1  # run_created; then the bad row stops the round
    assert mirror.drain_once() == 0
    assert mirror.drain_once() == 2  # third refusal: given up, and the metrics go through
    bad = next(r for r in outbox_rows(api, run_id) if r.kind == "no-such-kind")
    assert bad.done_at is not None and bad.attempts == 3
    assert bad.last_error and bad.last_error.startswith("gave up after 3 attempts")
    remote = mlflow_run(MlflowClient(mlflow_uri), api, run_id)
    assert len(MlflowClient(mlflow_uri).get_metric_history(remote.info.run_id, "ok")) == 3
    with factory(api)() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(MlflowOutbox).where(MlflowOutbox.done_at.is_(None))
            )
            == 0
        )
        session.rollback()


def test_one_mirror_drains_at_a_time_and_off_means_off(api: TestClient, mirrored: Settings) -> None:
    run_id = create(api, DIGITS_TEACHER, experiment=unique("turns"))
    first = MlflowMirror(mirrored, factory(api))
    second = MlflowMirror(mirrored, factory(api))
    with first._exclusive() as mine:  # another process's round (advisory lock / flock)
        assert mine
        assert second.drain_once() == 0
    assert second.pending() == 1
    off = MlflowMirror(mirrored.model_copy(update={"mlflow_tracking_uri": "none"}), factory(api))
    assert not off.enabled and off.drain_once() == 0 and not off.start().running
    assert second.drain_once() == 1
    assert outbox_rows(api, run_id)[0].done_at is not None
