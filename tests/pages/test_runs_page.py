"""The runs page: live cells from the stored points, filters and sort in the URL, paging that
costs the same few queries at 10,000 runs as at 10."""

from __future__ import annotations

import re
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Experiment, Metric, Run, RunEvent, utcnow
from kdlab.backend.services import run_views
from kdlab.backend.services.runs import run_out
from tests.factories import DIGITS_TEACHER, config, create_run


def _points(session: Session, run: Run, key: str, rows: list[tuple[int, float, float]]) -> None:
    for step, value, wall in rows:
        session.add(Metric(run_id=run.id, key=key, step=step, value=value, wall_time=wall))
    session.commit()


def test_progress_and_eta_come_from_the_measured_rate(db_session: Session) -> None:
    run = create_run(db_session, name="moving", status="running")
    run.started_at = utcnow() - timedelta(seconds=90)
    db_session.add(
        RunEvent(
            run_id=run.id, kind="log", message='metadata {"config_hash": "x", "total_steps": 100}'
        )
    )
    # 2 s per step between step 10 (t=100) and step 50 (t=180): 50 steps left → 100 s
    _points(
        db_session, run, "train/loss_total", [(10, 2.0, 100.0), (30, 1.0, 140.0), (50, 0.5, 180.0)]
    )
    _points(db_session, run, "eval/student_acc", [(25, 0.61, 150.0), (50, 0.74, 181.0)])
    [row] = run_views.summarize(db_session, [run_out(run)])
    assert row.progress == run_views.Progress(step=50, total=100, eta_seconds=100.0)
    assert row.progress.fraction == 0.5
    assert row.best_acc == 0.74
    assert row.duration_seconds is not None and 89 <= row.duration_seconds <= 120


def test_the_table_shows_live_cells_and_filters_stay_in_the_url(
    client: TestClient, db_session: Session
) -> None:
    teacher = create_run(db_session, name="t-alpha", experiment="e1", status="succeeded")
    create_run(db_session, name="t-beta", experiment="e2", status="failed")
    _points(db_session, teacher, "eval/student_acc", [(1, 0.5, 1.0), (2, 0.93, 2.0)])
    page = client.get("/")
    assert page.status_code == 200
    assert f'id="run-{teacher.id}-status"' in page.text
    assert re.search(rf'id="run-{teacher.id}-acc">0\.93<', page.text)
    filtered = client.get("/?experiment=e2&status=failed&q=beta&sort=name")
    assert "t-beta" in filtered.text and "t-alpha" not in filtered.text
    assert 'value="e2" selected' in filtered.text and 'value="failed" checked' in filtered.text
    fragment = client.get("/?q=alpha", headers={"HX-Request": "true"})
    assert fragment.text.lstrip().startswith('<div id="runs-table">')  # just the swapped part
    assert "<html" not in fragment.text and fragment.headers["vary"] == "HX-Request"
    nothing = client.get("/?q=zzz")
    assert "No runs match these filters" in nothing.text


def test_an_empty_server_says_what_to_do(client: TestClient) -> None:
    page = client.get("/")
    assert "No runs yet" in page.text and "kdlab serve --demo" in page.text
    assert 'href="/runs/new"' in page.text


def test_a_bad_filter_is_an_error_page_in_words(client: TestClient) -> None:
    page = client.get("/?status=sleeping")
    assert page.status_code == 422 and page.headers["content-type"].startswith("text/html")
    assert "status" in page.text


def test_paging_10000_runs_costs_the_same_queries_as_10(
    client: TestClient, db_session: Session
) -> None:
    experiment = Experiment(name="many")
    db_session.add(experiment)
    db_session.flush()
    now = utcnow()
    body = config(DIGITS_TEACHER, experiment="many")

    def add(count: int, start: int) -> None:
        db_session.execute(
            insert(Run),
            [
                {
                    "id": f"r{i:08d}",
                    "experiment_id": experiment.id,
                    "name": f"run-{i:05d}",
                    "kind": "train",
                    "status": "succeeded",
                    "config": body,
                    "created_at": now + timedelta(seconds=i),
                    "updated_at": now,
                }
                for i in range(start, start + count)
            ],
        )
        db_session.commit()

    def queries_for(url: str) -> tuple[int, str]:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        seen: list[str] = []
        listener = lambda *args: seen.append(args[2])  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            text = client.get(url).text
        finally:
            event.remove(engine, "before_cursor_execute", listener)
        return len(seen), text

    add(10, 0)
    few, _ = queries_for("/")
    add(9_990, 10)
    assert db_session.scalar(select(Run.id).where(Run.name == "run-09999")) is not None
    db_session.commit()
    many, text = queries_for("/?page=200")
    assert many == few
    assert "Page 200 of 200" in text and "9951–10000 of 10000 runs" in text
    assert "run-00049" in text and "run-00000" in text  # newest first: page 200 holds the oldest


def test_compare_by_experiment_lists_its_runs(client: TestClient, db_session: Session) -> None:
    first = create_run(db_session, name="first", experiment="demo", status="succeeded")
    second = create_run(db_session, name="second", experiment="demo", status="running")
    create_run(db_session, name="elsewhere", experiment="other")
    page = client.get("/compare?experiment=demo")
    assert page.status_code == 200
    ids = re.findall(r'<li data-run-id="([^"]+)"', page.text)
    assert ids == [first.id, second.id]  # oldest first, nothing from another experiment
    assert "Compare the runs of demo" in page.text
    assert client.get("/compare?experiment=nothing-here").status_code == 404


def test_the_run_page_stream_renders_a_run_with_files(
    client: TestClient, db_session: Session
) -> None:
    """The live head is rendered while its rows are loaded (a finished run with artifacts)."""
    from kdlab.backend.db.models import Artifact
    from kdlab.backend.pages.run import _live_state

    run = create_run(db_session, name="with-files", status="succeeded")
    db_session.add(Artifact(run_id=run.id, name="student.safetensors", kind="student",
                            sha256="ab" * 32, size=123, path="x"))  # fmt: skip
    db_session.add(RunEvent(run_id=run.id, kind="log", message="epoch 1 done"))
    db_session.commit()
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    head, lines, finished = _live_state(factory, run.id, 0, {"mlflow_ui_url": None})
    assert finished and [line for _, line in lines] == ["epoch 1 done"]
    assert 'id="run-head" class="run-head"' in head and 'hx-swap-oob="true"' in head
    assert "student.safetensors" in head and "ab" * 32 in head
    assert f"/api/runs/{run.id}/student" in head
