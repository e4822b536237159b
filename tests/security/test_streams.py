"""Issue 9, row 2: idle server-sent event streams cost no thread, and each token has a cap.

The attack: 40+ idle `GET /api/runs/{id}/events` streams (one run token suffices) each held a
threadpool worker, so `/api/health` took seconds and metric posts and heartbeats timed out.
Now every stream is an async generator woken by one shared watcher: 200 idle streams later,
health, a heartbeat and a metric post still answer in under a second, the streams still deliver
what is posted afterwards, and one token (or browser session) may keep at most
`KDLAB_MAX_STREAMS_PER_TOKEN` streams open.
"""

from __future__ import annotations

import json
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from kdlab.backend.services.sessions import COOKIE_NAME

RUNS = 10
STREAMS_PER_RUN = 20  # 200 in all
CAP = 32  # the default of max_streams_per_token
BOUND = 1.0  # seconds: "health and a metric post still answer in < 1 s"


@pytest.fixture(autouse=True)
def _enough_file_descriptors() -> None:
    """Room for 200+ sockets on each side (client and server share this process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Stream:
    """An SSE request on a raw socket, read as bytes (the chunked framing left in: each event
    arrives whole in one chunk)."""

    def __init__(self, base: str, path: str, headers: dict[str, str]) -> None:
        url = urlsplit(base)
        assert url.hostname is not None and url.port is not None
        self.sock = socket.create_connection((url.hostname, url.port), timeout=10)
        lines = [f"GET {path} HTTP/1.1", f"Host: {url.netloc}", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.data = b""

    def read_until(self, needle: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not received; got {self.data[-500:]!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed before {needle!r}; got {self.data[-500:]!r}")
            self.data += chunk
        return self.data

    def _head(self) -> tuple[str, int]:
        data = self.read_until(b"\r\n\r\n")
        head = data.split(b"\r\n\r\n", 1)[0]
        return head.decode(), len(head) + 4

    def status(self) -> int:
        return int(self._head()[0].split(" ", 2)[1])

    def header(self, name: str) -> str | None:
        for line in self._head()[0].split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def body(self) -> bytes:
        """The whole body of a short response (one that says its length)."""
        start = self._head()[1]
        end = start + int(self.header("content-length") or 0)
        while len(self.data) < end:
            chunk = self.sock.recv(65536)
            assert chunk, "closed mid-body"
            self.data += chunk
        return self.data[start:end]

    def close(self, abruptly: bool = False) -> None:
        if abruptly:  # RST, not FIN: the client vanished
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@pytest.fixture
def streams() -> Iterator[list[Stream]]:
    opened: list[Stream] = []
    yield opened
    for stream in opened:
        stream.close()


def _external_runs(http: httpx.Client, count: int) -> list[tuple[str, str]]:
    runs = []
    for i in range(count):
        response = http.post(
            "/api/runs",
            json={"kind": "external", "name": f"idle-{i}", "experiment": "streams", "params": {}},
        )
        assert response.status_code == 201, response.text
        runs.append((response.json()["id"], response.json()["token"]))
    return runs


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = call()
    return response, time.monotonic() - start


def test_idle_streams_hold_no_thread_and_each_token_has_a_cap(
    live_server: str, streams: list[Stream]
) -> None:
    http = httpx.Client(base_url=live_server, timeout=10)
    runs = _external_runs(http, RUNS)

    def open_stream(run_id: str, token: str) -> Stream:
        stream = Stream(
            live_server, f"/api/runs/{run_id}/events", {"Authorization": f"Bearer {token}"}
        )
        streams.append(stream)
        return stream

    # warm-up, streams not yet open: the first metric post of an app compiles its statements
    warm_id, warm_token = runs[-1]
    warm = {"Authorization": f"Bearer {warm_token}"}
    first_point = {"points": [{"key": "train/loss", "step": 0, "value": 1.0}]}
    http.post(f"/api/runs/{warm_id}/metrics", json=first_point, headers=warm).raise_for_status()
    http.post(f"/api/runs/{warm_id}/heartbeat", json={}, headers=warm).raise_for_status()

    by_run = {
        run_id: [open_stream(run_id, token) for _ in range(STREAMS_PER_RUN)]
        for run_id, token in runs
    }
    for opened in by_run.values():
        for stream in opened:
            assert stream.status() == 200
            stream.read_until(b"event: status")
    assert len(streams) == RUNS * STREAMS_PER_RUN

    # 200 idle streams: the threadpool is free for everything else
    health, took = _timed(lambda: http.get("/api/health"))
    assert health.status_code == 200 and took < BOUND, took
    first_id, first_token = runs[0]
    auth = {"Authorization": f"Bearer {first_token}"}
    point = {"points": [{"key": "train/loss", "step": 1, "value": 0.5}]}
    posted, took = _timed(
        lambda: http.post(f"/api/runs/{first_id}/metrics", json=point, headers=auth)
    )
    assert posted.status_code == 200, posted.text
    assert took < BOUND, took
    beat, took = _timed(lambda: http.post(f"/api/runs/{first_id}/heartbeat", json={}, headers=auth))
    assert beat.status_code == 200 and took < BOUND, (beat.text, took)

    # the watcher wakes the streams of the run that changed, and only they read
    logged = http.post(
        f"/api/runs/{first_id}/logs", json={"lines": ["hello streams"]}, headers=auth
    )
    assert logged.status_code == 200, logged.text
    for stream in by_run[first_id]:
        stream.read_until(b"data: hello streams\n", timeout=5)
    second_id, second_token = runs[1]
    done = http.post(
        f"/api/runs/{second_id}/status",
        json={"status": "succeeded"},
        headers={"Authorization": f"Bearer {second_token}"},
    )
    assert done.status_code == 200, done.text
    for stream in by_run[second_id]:
        stream.read_until(b'event: end\ndata: {"status": "succeeded"}', timeout=5)
        assert b'"status":"succeeded"' in stream.data  # its status event came first

    # the cap: the first token has 20 open; 12 more fit, the 33rd is refused
    more = [open_stream(first_id, first_token) for _ in range(CAP - STREAMS_PER_RUN)]
    for stream in more:
        assert stream.status() == 200
        stream.read_until(b"data: hello streams\n")
    refused = open_stream(first_id, first_token)
    assert refused.status() == 429
    assert refused.header("retry-after") is not None
    detail = json.loads(refused.body())["detail"]
    assert str(CAP) in detail and "KDLAB_MAX_STREAMS_PER_TOKEN" in detail
    # other tokens keep their own slots
    third_id, third_token = runs[2]
    other = open_stream(third_id, third_token)
    assert other.status() == 200

    # a client that vanishes frees its slot (the server notices the reset connection)
    more[0].close(abruptly=True)
    streams.remove(more[0])
    deadline = time.monotonic() + 5
    while True:
        retry = open_stream(first_id, first_token)
        if retry.status() == 200:
            break
        assert time.monotonic() < deadline, "the closed stream's slot was not freed"
        time.sleep(0.1)
    retry.read_until(b"data: hello streams\n")

    # still nothing blocked with 200+ streams open
    health, took = _timed(lambda: http.get("/api/health"))
    assert health.status_code == 200 and took < BOUND, took
    http.close()


def test_page_streams_count_against_the_browser_session(
    live_server: str, streams: list[Stream]
) -> None:
    """A browser session's page streams and its cookie-authenticated API streams share one cap."""
    http = httpx.Client(base_url=live_server, timeout=10)
    ((run_id, _),) = _external_runs(http, 1)
    assert http.get("/").status_code == 200  # open access: the first visit opens a session
    cookie = {"Cookie": f"{COOKIE_NAME}={http.cookies[COOKIE_NAME]}"}

    def open_stream(path: str) -> Stream:
        stream = Stream(live_server, path, cookie)
        streams.append(stream)
        return stream

    paths = [f"/live/runs?ids={run_id}", f"/runs/{run_id}/live", f"/api/runs/{run_id}/events"]
    for i in range(CAP):
        stream = open_stream(paths[i % len(paths)])
        assert stream.status() == 200
        stream.read_until(b"event: ")
    refused = open_stream(paths[0])
    assert refused.status() == 429 and refused.header("retry-after")
    # a new browser session has its own slots
    fresh = Stream(live_server, paths[1], {})
    streams.append(fresh)
    assert fresh.status() == 200
    http.close()
