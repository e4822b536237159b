"""HTTP client a worker uses to talk to the KD Lab server (docs/contracts.md, "Worker ↔ backend").

`ApiClient` wraps one `httpx.Client` (safe to share between the worker's threads). Every call
retries transient failures - connection errors, timeouts, 5xx and 429 - with exponential backoff
(honouring `Retry-After`), then raises:

- `ApiClientError` for a 4xx answer (not retried: the request itself is wrong, or the run is
  finished); its message carries the method, path, status and the server's `detail`;
- `ApiServerError` when the server kept answering 5xx / 429;
- `ApiUnreachable` when no answer came (refused, reset, timed out).

`ApiServerError` and `ApiUnreachable` are `TransientApiError`s: trying again later may work.
Requests that are not idempotent (registering an external run) are only retried when they surely
did not reach the server (a refused connection, 429 or 503).

This module must not import `backend`: the worker runs on machines without the server's code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from kdlab.worker.names import RUN_FINISHED_DETAIL

log = logging.getLogger("kdlab.worker.client")

CHUNK = 1024 * 1024
DEFAULT_TIMEOUT = 30.0
DEFAULT_ATTEMPTS = 6  # 1 + 5 retries: ~0.5 + 1 + 2 + 4 + 8 s of backoff
BACKOFF_BASE = 0.5
BACKOFF_MAX = 15.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
UNSENT_STATUSES = frozenset({429, 503})  # the server did not act on the request


class ApiError(Exception):
    """A call to the KD Lab server failed."""

    def __init__(self, message: str, *, method: str = "", url: str = "") -> None:
        super().__init__(message)
        self.method = method
        self.url = url


class ApiClientError(ApiError):
    """The server refused the request with a 4xx status (retrying would not help)."""

    def __init__(self, message: str, *, status_code: int, detail: Any, method: str, url: str):
        super().__init__(message, method=method, url=url)
        self.status_code = status_code
        self.detail = detail

    @property
    def run_ended(self) -> bool:
        """The run is already over on the server: 409, or 401 because the run's token was
        revoked when it finished (e.g. the supervisor ended it)."""
        return self.status_code == 409 or (
            self.status_code == 401 and self.detail == RUN_FINISHED_DETAIL
        )


class TransientApiError(ApiError):
    """The server could not be reached, or kept failing; a later try may work."""


class ApiServerError(TransientApiError):
    """5xx (or 429) on every attempt."""

    def __init__(self, message: str, *, status_code: int, detail: Any, method: str, url: str):
        super().__init__(message, method=method, url=url)
        self.status_code = status_code
        self.detail = detail


class ApiUnreachable(TransientApiError):
    """No HTTP answer at all (connection refused or reset, timeout) on every attempt."""


class Registered(NamedTuple):
    """An external run just registered: its id and its run-scoped token (shown only once)."""

    run_id: str
    token: str


def format_detail(detail: Any) -> str:
    """FastAPI's `detail`: a string, or a list of `{"loc": [...], "msg": ...}` errors."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = ".".join(str(p) for p in item.get("loc", []))
                parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, str):
        return detail
    return json.dumps(detail, default=str)


def _detail_of(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return body["detail"]
    return body


def _retry_after(response: httpx.Response | None) -> float | None:
    if response is None:
        return None
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ApiClient:
    """The worker's view of the server API.

    `base_url`: the server, e.g. `http://127.0.0.1:8000` (a trailing `/api` is accepted).
    `token`: a bearer token (run-scoped or admin); None on an open loopback server.
    `run_id`: the run the per-run calls (`get_run`, `set_status`, ...) default to.
    `attempts`: tries per call for transient failures (1 = no retry); each call may override it.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        run_id: str | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_base: float = BACKOFF_BASE,
        backoff_max: float = BACKOFF_MAX,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        self.base_url = base.removesuffix("/api")
        self.token = token
        self.timeout = timeout
        self.run_id = run_id
        self.attempts = max(1, attempts)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        headers = {"User-Agent": "kdlab-worker"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

    # ------------------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def for_run(self, run_id: str, token: str | None) -> ApiClient:
        """A client for `run_id` with its own token, same server and retry settings."""
        return ApiClient(
            self.base_url,
            token,
            self.timeout,
            run_id=run_id,
            attempts=self.attempts,
            backoff_base=self.backoff_base,
            backoff_max=self.backoff_max,
        )

    def _run(self, run_id: str | None) -> str:
        chosen = run_id or self.run_id
        if not chosen:
            raise ValueError("no run id: pass run_id= or create the client with run_id")
        return chosen

    def _delay(self, attempt: int, hint: float | None) -> float:
        base = min(self.backoff_max, self.backoff_base * 2**attempt)
        delay = base * (0.75 + random.random() / 2)  # jitter: workers do not retry in lockstep
        if hint is not None:
            delay = max(delay, min(hint, self.backoff_max))
        return delay

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content_factory: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        attempts: int | None = None,
        idempotent: bool = True,
        stream_to: Path | None = None,
    ) -> httpx.Response:
        """One API call with retries. `content_factory()` makes a fresh body per try (a
        streamed file); `stream_to` writes a 2xx answer's body to that path as it arrives."""
        tries = self.attempts if attempts is None else max(1, attempts)
        url = f"{self.base_url}{path}"
        for attempt in range(tries):
            last = attempt == tries - 1
            response: httpx.Response | None = None
            try:
                request = self._http.build_request(
                    method,
                    path,
                    json=json_body,
                    content=content_factory() if content_factory is not None else None,
                    headers=headers,
                    params=params,
                )
                response = self._http.send(request, stream=stream_to is not None)
                try:
                    if response.status_code < 400:
                        if stream_to is not None:
                            self._save_body(response, stream_to)
                        return response
                    if stream_to is not None:
                        response.read()
                finally:
                    if stream_to is not None:
                        response.close()
                retryable = response.status_code in RETRY_STATUSES and (
                    idempotent or response.status_code in UNSENT_STATUSES
                )
                if not retryable or last:
                    raise self._http_error(method, path, url, response)
                why = f"HTTP {response.status_code}"
            except httpx.TransportError as err:
                surely_unsent = isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout))
                if last or not (idempotent or surely_unsent):
                    raise ApiUnreachable(
                        f"{method} {url}: no answer from the server after {attempt + 1} "
                        f"attempt(s): {type(err).__name__}: {err}",
                        method=method,
                        url=url,
                    ) from err
                why = f"{type(err).__name__}: {err}"
            delay = self._delay(attempt, _retry_after(response))
            log.warning(
                "%s %s failed (%s); retry %d/%d in %.1f s",
                method,
                path,
                why,
                attempt + 1,
                tries - 1,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _save_body(response: httpx.Response, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as handle:
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)
            expected = response.headers.get("x-content-sha256")
            if expected and expected.lower() != digest.hexdigest():
                raise httpx.RemoteProtocolError(
                    f"downloaded {dest.name} has sha256 {digest.hexdigest()}, the server said "
                    f"{expected}"
                )
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def _http_error(method: str, path: str, url: str, response: httpx.Response) -> ApiError:
        detail = _detail_of(response)
        message = (
            f"{method} {path} → {response.status_code} {response.reason_phrase}: "
            f"{format_detail(detail)}"
        )
        cls = ApiClientError if response.status_code < 500 and response.status_code != 429 else None
        if cls is not None:
            return ApiClientError(
                message, status_code=response.status_code, detail=detail, method=method, url=url
            )
        return ApiServerError(
            message, status_code=response.status_code, detail=detail, method=method, url=url
        )

    # ---------------------------------------------------------------------------- run state
    def get_run(self, run_id: str | None = None) -> dict[str, Any]:
        """The run JSON (`config`, `status`, `attempt`, `cancel_requested`, ...)."""
        return self.request("GET", f"/api/runs/{self._run(run_id)}").json()

    def set_status(
        self,
        status: str,
        error: str | None = None,
        teacher_fingerprint: str | None = None,
        *,
        run_id: str | None = None,
        attempts: int | None = None,
    ) -> dict[str, Any]:
        """Report a state change (running / succeeded / failed / cancelled); the run JSON.
        Repeating the current status is accepted (so a retry is safe)."""
        body: dict[str, Any] = {"status": status}
        if error is not None:
            body["error"] = error
        if teacher_fingerprint is not None:
            body["teacher_fingerprint"] = teacher_fingerprint
        path = f"/api/runs/{self._run(run_id)}/status"
        return self.request("POST", path, json_body=body, attempts=attempts).json()

    def heartbeat(
        self, *, run_id: str | None = None, attempts: int | None = None
    ) -> dict[str, Any]:
        """`{"cancel_requested": bool, "status": ...}`; `ApiClientError` 409 once finished."""
        return self.request(
            "POST", f"/api/runs/{self._run(run_id)}/heartbeat", json_body={}, attempts=attempts
        ).json()

    # ------------------------------------------------------------------------ metrics, logs
    def post_metrics(
        self,
        points: Sequence[Mapping[str, Any]],
        *,
        run_id: str | None = None,
        attempts: int | None = None,
    ) -> int:
        """Post `{"key", "step", "value", "time"?}` points; how many the server stored.
        Idempotent per (run, key, step), so a retry never doubles a point."""
        body = {"points": list(points)}
        response = self.request(
            "POST", f"/api/runs/{self._run(run_id)}/metrics", json_body=body, attempts=attempts
        )
        return int(response.json().get("accepted", len(points)))

    def post_logs(
        self,
        lines: Sequence[str],
        kind: str = "log",
        *,
        run_id: str | None = None,
        attempts: int | None = None,
    ) -> int:
        """Append log lines (`kind` "log" or "error") to the run's log."""
        body = {"lines": list(lines), "kind": kind}
        response = self.request(
            "POST", f"/api/runs/{self._run(run_id)}/logs", json_body=body, attempts=attempts
        )
        return int(response.json().get("accepted", len(lines)))

    # ---------------------------------------------------------------------------- artifacts
    def put_artifact(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        kind: str = "file",
        *,
        run_id: str | None = None,
        attempts: int | None = None,
    ) -> dict[str, Any]:
        """Upload the file at `path` as artifact `name` (default: its file name), streamed,
        with its sha256 in `X-Content-SHA256`. The file is opened once and every try reads that
        same open file, so a writer replacing `path` (`os.replace`) mid-upload cannot mix two
        versions."""
        path = Path(path)
        name = name or path.name
        with open(path, "rb") as handle:
            digest = hashlib.sha256()
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                digest.update(chunk)
            size = handle.tell()

            def body() -> Iterator[bytes]:
                handle.seek(0)
                while chunk := handle.read(CHUNK):
                    yield chunk

            response = self.request(
                "PUT",
                f"/api/runs/{self._run(run_id)}/artifacts/{name}",
                content_factory=body,
                headers={
                    "X-Content-SHA256": digest.hexdigest(),
                    "Content-Length": str(size),
                    "Content-Type": "application/octet-stream",
                },
                params={"kind": kind},
                attempts=attempts,
            )
        return response.json()

    def download_artifact(
        self, run_id: str, name: str, dest: str | os.PathLike, *, attempts: int | None = None
    ) -> Path:
        """Save artifact `name` of `run_id` to `dest` (written whole or not at all; the sha256
        the server sends is checked). `ApiClientError` 404 when there is no such artifact."""
        dest = Path(dest)
        self.request(
            "GET", f"/api/runs/{run_id}/artifacts/{name}", stream_to=dest, attempts=attempts
        )
        return dest

    def download_upload(
        self, upload_id: str, dest: str | os.PathLike, *, attempts: int | None = None
    ) -> Path:
        """Save the uploaded weights file `upload_id` (safetensors) to `dest`."""
        dest = Path(dest)
        self.request("GET", f"/api/uploads/{upload_id}/file", stream_to=dest, attempts=attempts)
        return dest

    # ------------------------------------------------------------------------ external runs
    def register_external(self, config: Mapping[str, Any]) -> Registered:
        """Register a run trained elsewhere (needs an admin token, or an open server): the
        run config's `name` and `experiment`, and the whole config as its params."""
        body = {
            "kind": "external",
            "name": config["name"],
            "experiment": config.get("experiment") or "default",
            "params": dict(config),
        }
        created = self.request("POST", "/api/runs", json_body=body, idempotent=False).json()
        return Registered(created["id"], created["token"])
