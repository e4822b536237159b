"""The worker's HTTP client (retries, error messages), the metric spool and `HttpMetricSink`
(server down → spooled on disk → server back → every point exactly once)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from kdlab.backend.main import create_app
from kdlab.backend.settings import Settings
from kdlab.worker.client import (
    ApiClient,
    ApiClientError,
    ApiServerError,
    ApiUnreachable,
    TransientApiError,
)
from kdlab.worker.http_sink import HttpMetricSink
from kdlab.worker.spool import Spool
from tests.conftest import free_port
from tests.helpers import wait_for

EXTERNAL = {"name": "ext", "experiment": "worker-tests", "kind": "train"}


# --------------------------------------------------------------------------- helpers


def mock_client(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> ApiClient:
    return ApiClient(
        "http://kdlab.test",
        "tok",
        run_id="r1",
        backoff_base=0.001,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


def scripted(*answers: Any) -> tuple[Callable[[httpx.Request], httpx.Response], list]:
    """A handler giving `answers` in order (an exception instance is raised); the calls seen."""
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler, calls


class Server:
    """The app on a real uvicorn that can be stopped and started again on the same port."""

    def __init__(self, settings: Settings, port: int | None = None):
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._app: Any = None

    def start(self) -> Server:
        self._app = create_app(self.settings)
        config = uvicorn.Config(self._app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start within 30 s")

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "server did not stop"
        self._app.state.engine.dispose()


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    running = Server(settings).start()
    yield running
    if running._thread is not None and running._thread.is_alive():
        running.stop()


def external_run(url: str, name: str = "ext") -> ApiClient:
    """Register an external run; a client holding its run-scoped token."""
    with ApiClient(url) as admin:
        registered = admin.register_external({**EXTERNAL, "name": name})
        return admin.for_run(registered.run_id, registered.token)


def series(url: str, run_id: str, key: str) -> tuple[list[int], list[float]]:
    response = httpx.get(
        f"{url}/api/runs/{run_id}/metrics", params={"keys": key, "max_points": 10_000}, timeout=30
    )
    response.raise_for_status()
    found = response.json()["series"]
    if not found:
        return [], []
    return found[0]["step"], found[0]["value"]


def value_a(step: int) -> float:
    return ((step * 7919) % 1000) / 7.0


def value_b(step: int) -> float:
    return -(((step * 104729) % 997) / 3.0)


def log_steps(sink: HttpMetricSink, steps: range) -> None:
    for step in steps:
        sink.log_metrics(step, {"a": value_a(step), "b": value_b(step)})


# --------------------------------------------------------------------------- retries and errors


def test_transient_answers_are_retried_until_one_succeeds():
    handler, calls = scripted(
        httpx.Response(503, json={"detail": "busy"}),
        httpx.ConnectError("refused"),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(200, json={"id": "r1", "status": "running"}),
    )
    with mock_client(handler) as client:
        assert client.get_run()["status"] == "running"
    assert len(calls) == 4
    assert calls[0].headers["authorization"] == "Bearer tok"


def test_429_waits_for_retry_after():
    handler, calls = scripted(
        httpx.Response(429, headers={"Retry-After": "0.3"}, json={"detail": "slow down"}),
        httpx.Response(200, json={"accepted": 2}),
    )
    with mock_client(handler) as client:
        started = time.monotonic()
        assert client.post_metrics([{"key": "a", "step": 0, "value": 1.0}] * 2) == 2
        assert time.monotonic() - started >= 0.3
    assert len(calls) == 2


def test_a_server_that_keeps_failing_raises_with_its_detail():
    handler, calls = scripted(httpx.Response(500, json={"detail": "database unavailable"}))
    with mock_client(handler, attempts=3) as client, pytest.raises(ApiServerError) as caught:
        client.heartbeat()
    assert len(calls) == 3
    assert isinstance(caught.value, TransientApiError)
    assert caught.value.status_code == 500
    assert "POST /api/runs/r1/heartbeat → 500" in str(caught.value)
    assert "database unavailable" in str(caught.value)


def test_4xx_is_not_retried_and_names_the_servers_detail():
    handler, calls = scripted(httpx.Response(409, json={"detail": "run r1 already succeeded"}))
    with mock_client(handler) as client, pytest.raises(ApiClientError) as caught:
        client.post_metrics([{"key": "a", "step": 1, "value": 1.0}])
    assert len(calls) == 1
    assert caught.value.status_code == 409
    assert str(caught.value) == (
        "POST /api/runs/r1/metrics → 409 Conflict: run r1 already succeeded"
    )

    errors = [{"loc": ["body", "points", 0, "value"], "msg": "points[0].value for a is NaN"}]
    handler, _ = scripted(httpx.Response(422, json={"detail": errors}))
    with mock_client(handler) as client, pytest.raises(ApiClientError) as caught:
        client.post_metrics([{"key": "a", "step": 1, "value": 1.0}])
    assert caught.value.detail == errors
    assert str(caught.value).endswith("body.points.0.value: points[0].value for a is NaN")


def test_registering_is_only_retried_when_the_request_surely_did_not_arrive():
    created = httpx.Response(201, json={"id": "x1", "token": "kdl_t"})
    handler, calls = scripted(httpx.ConnectError("refused"), created)
    with mock_client(handler) as client:
        assert client.register_external({"name": "n"}) == ("x1", "kdl_t")
    assert len(calls) == 2
    assert json.loads(calls[-1].content) == {
        "kind": "external",
        "name": "n",
        "experiment": "default",
        "params": {"name": "n"},
    }

    handler, calls = scripted(httpx.ReadTimeout("no answer"), created)  # it may have arrived
    with mock_client(handler) as client, pytest.raises(ApiUnreachable, match="ReadTimeout"):
        client.register_external({"name": "n"})
    assert len(calls) == 1


def test_nobody_listening_is_unreachable():
    client = ApiClient(f"http://127.0.0.1:{free_port()}", attempts=2, backoff_base=0.01)
    with client, pytest.raises(ApiUnreachable, match="no answer from the server after 2 attempt"):
        client.get_run("r1")


def test_an_upload_is_re_sent_whole_on_a_retry(tmp_path):
    data = bytes(range(256)) * 5000
    path = tmp_path / "latest.pt"
    path.write_bytes(data)
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        if len(bodies) == 1:
            return httpx.Response(503)
        assert request.headers["x-content-sha256"] == hashlib.sha256(data).hexdigest()
        assert request.url.params["kind"] == "checkpoint"
        return httpx.Response(201, json={"name": "latest.pt"})

    with mock_client(handler) as client:
        assert client.put_artifact(path, kind="checkpoint") == {"name": "latest.pt"}
    assert bodies == [data, data]


def test_a_download_whose_sha256_does_not_match_is_refused(tmp_path):
    handler, calls = scripted(
        httpx.Response(200, content=b"abc", headers={"X-Content-SHA256": "0" * 64})
    )
    dest = tmp_path / "w.safetensors"
    with mock_client(handler, attempts=2) as client, pytest.raises(ApiUnreachable, match="sha256"):
        client.download_artifact("t1", "best.safetensors", dest)
    assert len(calls) == 2
    assert not dest.exists() and not list(tmp_path.iterdir())  # no partial file is left


# --------------------------------------------------------------------------- against the server


def test_every_call_against_a_real_server(live_server, tmp_path):
    client = external_run(live_server, "calls")
    run = client.get_run()
    assert (run["kind"], run["status"]) == ("external", "running")
    assert client.heartbeat() == {"cancel_requested": False, "status": "running"}
    points = [{"key": "train/loss_total", "step": s, "value": 1.0 / (s + 1)} for s in range(5)]
    assert client.post_metrics(points) == 5
    assert client.post_metrics(points) == 5  # idempotent
    assert client.post_logs(["hello", "world"]) == 2
    assert httpx.get(f"{live_server}/api/runs/{client.run_id}/logs").json()["lines"][-2:] == [
        "hello",
        "world",
    ]

    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"\x00\x01" * 300_000)
    stored = client.put_artifact(blob, "latest.pt", "checkpoint")
    assert stored["sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert (stored["kind"], stored["size"]) == ("checkpoint", blob.stat().st_size)
    run_id = client.run_id or ""
    copy = client.download_artifact(run_id, "latest.pt", tmp_path / "copy.bin")
    assert copy.read_bytes() == blob.read_bytes()

    with pytest.raises(ApiClientError) as caught:
        client.download_artifact(run_id, "best.safetensors", tmp_path / "x")
    assert caught.value.status_code == 404
    assert f"run {client.run_id} has no artifact named 'best.safetensors'" in str(caught.value)

    other = external_run(live_server, "other")
    with pytest.raises(ApiClientError) as caught:
        client.get_run(other.run_id)
    assert caught.value.status_code == 403
    assert f"not run {other.run_id}" in str(caught.value)

    assert client.set_status("succeeded")["status"] == "succeeded"
    # a finished run is read-only: its token was revoked with the final status
    with pytest.raises(ApiClientError, match="401 Unauthorized: this run's token was revoked"):
        client.post_metrics(points)
    with ApiClient(live_server, run_id=client.run_id) as admin:  # open server: the admin
        with pytest.raises(ApiClientError, match="409 Conflict: run .* is succeeded"):
            admin.post_metrics(points)
        with pytest.raises(ApiClientError, match="cannot go from succeeded to running"):
            admin.set_status("running")


def test_download_upload(live_server, tmp_path):
    from safetensors.torch import save

    data = save({"w": __import__("torch").ones(3, 2)})
    response = httpx.post(
        f"{live_server}/api/uploads", files={"file": ("t.safetensors", data)}, timeout=30
    )
    assert response.status_code == 201, response.text
    upload = response.json()
    with ApiClient(live_server) as client:
        path = client.download_upload(upload["id"], tmp_path / "t.safetensors")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == upload["sha256"]


# --------------------------------------------------------------------------- the spool


def test_spool_keeps_batches_in_order_across_reopening(tmp_path):
    spool = Spool(tmp_path)
    assert not spool.pending() and spool.peek() is None
    for n in range(3):
        spool.append([{"key": "a", "step": n, "value": float(n)}])
    head = spool.peek()
    assert head is not None and head[0][0]["step"] == 0
    spool.pop(head[1])

    reopened = Spool(tmp_path)  # a new process: the delivered offset survives
    assert reopened.pending_points() == 2
    steps = []
    while (head := reopened.peek()) is not None:
        steps.append(head[0][0]["step"])
        reopened.pop(head[1])
    assert steps == [1, 2]
    assert not (tmp_path / "metrics.spool.jsonl").exists()  # drained: the files are gone
    assert not (tmp_path / "metrics.spool.offset").exists()


def test_spool_cuts_a_torn_line_and_sets_aside_garbage(tmp_path):
    spool = Spool(tmp_path)
    spool.append([{"key": "a", "step": 1, "value": 1.0}])
    with open(spool.path, "a") as handle:
        handle.write("not json\n")
    spool.append([{"key": "a", "step": 2, "value": 2.0}])
    with open(spool.path, "a") as handle:
        handle.write('{"points": [{"key": "a", "st')  # the process died mid-append

    reopened = Spool(tmp_path)
    assert reopened.pending_points() == 2
    seen = []
    while (head := reopened.peek()) is not None:
        seen.append(head[0][0]["step"])
        reopened.pop(head[1])
    assert seen == [1, 2]
    rejected = (tmp_path / "metrics.rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1 and "unreadable spool line" in rejected[0]


# --------------------------------------------------------------------------- HttpMetricSink


def test_server_down_mid_run_spools_and_every_point_arrives_exactly_once(settings, tmp_path):
    first = Server(settings).start()
    client = external_run(first.url, "restart")
    run_id = client.run_id
    assert run_id is not None
    spool_dir = tmp_path / "spool"
    sink = HttpMetricSink(client, spool_dir, interval=0.1, backoff_max=0.3, close_timeout=30)
    try:
        log_steps(sink, range(0, 100))
        wait_for(lambda: sink.sent_points == 200, 10, "the first 200 points to be sent")

        first.stop()  # the server goes away mid-run
        log_steps(sink, range(100, 300))
        wait_for(lambda: sink.spool.pending_points() == 400, 10, "400 points spooled on disk")
        on_disk = [json.loads(line) for line in sink.spool.path.read_text().splitlines()]
        assert sum(len(batch["points"]) for batch in on_disk) == 400
        assert all(len(batch["points"]) <= 1000 for batch in on_disk)

        second = Server(settings, port=first.port).start()  # same database, same address
        try:
            log_steps(sink, range(300, 400))
            sink.close()
            assert sink.flushed and sink.unsent_points == 0
            assert not sink.spool.path.exists()
            for key, value in (("a", value_a), ("b", value_b)):
                steps, values = series(second.url, run_id, key)
                assert steps == list(range(400))  # each step once, none missing
                assert sum(values) == pytest.approx(sum(value(s) for s in range(400)), rel=1e-12)
        finally:
            second.stop()
    finally:
        sink.close()
        client.close()


def test_close_gives_up_after_its_timeout_and_the_next_attempt_sends_the_spool(
    live_server, tmp_path
):
    client = external_run(live_server, "later")
    run_id = client.run_id
    assert run_id is not None
    spool_dir = tmp_path / "spool"
    nowhere = ApiClient(f"http://127.0.0.1:{free_port()}", run_id=run_id, timeout=2)
    lines: list[str] = []
    sink = HttpMetricSink(
        nowhere, spool_dir, interval=0.05, backoff_max=0.2, close_timeout=1, echo=lines.append
    )
    log_steps(sink, range(50))
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 10
    assert (sink.flushed, sink.unsent_points) == (False, 100)
    assert any("100 points could not be sent within 1 s" in line for line in lines)
    assert any(str(spool_dir) in line for line in lines)

    lines.clear()
    again = HttpMetricSink(client, spool_dir, interval=0.05, echo=lines.append)  # the next attempt
    assert any("100 points from an earlier attempt" in line for line in lines)
    log_steps(again, range(50, 60))
    again.close()
    assert again.flushed
    steps, values = series(live_server, run_id, "a")
    assert steps == list(range(60))
    assert values == pytest.approx([value_a(s) for s in range(60)])


def test_refused_batches_are_kept_aside_not_retried(live_server, tmp_path):
    client = external_run(live_server, "done")
    client.set_status("succeeded")
    lines: list[str] = []
    sink = HttpMetricSink(client, tmp_path / "spool", interval=0.05, echo=lines.append)
    log_steps(sink, range(10))
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 10
    assert (sink.rejected_points, sink.unsent_points, sink.sent_points) == (20, 0, 0)
    rejected = (tmp_path / "spool" / "metrics.rejected.jsonl").read_text().splitlines()
    assert "401 Unauthorized: this run's token was revoked" in json.loads(rejected[0])["reason"]
    assert any("refused a batch of 20 points" in line for line in lines)


def test_non_finite_values_are_dropped_and_metadata_is_logged_and_uploaded(live_server, tmp_path):
    client = external_run(live_server, "meta")
    lines: list[str] = []
    sink = HttpMetricSink(client, tmp_path / "spool", interval=0.05, echo=lines.append)
    sink.log_metadata({"run": "meta", "total_steps": 3})
    sink.log_metadata({"loss": {"formula": "total = CE"}})
    sink.log_metrics(1, {"train/loss_total": 1.5, "train/grad_norm": float("inf")})
    sink.log_metrics(2, {"train/loss_total": 1.25, "bad key!": 1.0})
    sink.close()
    assert (sink.sent_points, sink.dropped_points) == (2, 2)
    assert any("train/grad_norm at step 1: it is inf" in line for line in lines)
    steps, values = series(live_server, client.run_id or "", "train/loss_total")
    assert (steps, values) == ([1, 2], [1.5, 1.25])

    logs = httpx.get(f"{live_server}/api/runs/{client.run_id}/logs").json()["lines"]
    assert logs == [
        'metadata {"run": "meta", "total_steps": 3}',
        'metadata {"loss": {"formula": "total = CE"}}',
    ]
    meta = client.download_artifact(client.run_id or "", "metadata.json", tmp_path / "m.json")
    assert json.loads(Path(meta).read_text()) == {
        "run": "meta",
        "total_steps": 3,
        "loss": {"formula": "total = CE"},
    }
