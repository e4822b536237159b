"""Service settings, read from `KDLAB_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kdlab.backend.db.engine import LOCK_TIMEOUT_SECONDS
from kdlab.worker.names import DEFAULT_DATA_DIR, WORK_DIR


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDLAB_", extra="ignore")

    data_dir: Path = Field(
        default=Path(DEFAULT_DATA_DIR), description="Runs, uploads and SQLite files."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/kdlab.db"
    )
    token: str | None = Field(
        default=None, description="Admin bearer token; required off loopback."
    )
    executor: Literal["local", "ray", "none"] = "local"
    ray_address: str | None = None
    mlflow_tracking_uri: str | None = Field(
        default=None, description="default sqlite:///<data_dir>/mlflow.db"
    )
    mlflow_mirror: Literal["process", "thread"] = Field(
        default="process",
        description="Where the MLflow mirror drains the outbox: `process` (its own process at "
        "lower priority, started and stopped by the server) or `thread` (in the API process).",
    )
    mlflow_mirror_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="The mirror process's niceness increment (os.nice): it yields the CPU to "
        "the API's requests and catches up when they pause.",
    )
    mlflow_ui_url: str | None = Field(
        default=None, description="Base URL of the MLflow UI; run pages link each run there."
    )
    session_secret: str | None = Field(
        default=None,
        description="Signs browser sessions; default: a random key in <data_dir>/session.key.",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = Field(default=16 * 1024 * 1024, description="Largest JSON request body.")
    max_upload_bytes: int = Field(default=2 * 1024**3, description="Largest uploaded file.")
    max_points_per_query: int = Field(default=10_000, description="Cap on max_points per series.")
    max_metric_batch: int = Field(default=50_000, description="Most points in one metrics POST.")
    db_lock_timeout_seconds: float = Field(
        default=LOCK_TIMEOUT_SECONDS,
        gt=0,
        description="SQLite: how long a write waits for the lock before the API answers 503.",
    )
    series_readers: int = Field(
        default=1, ge=1, description="Series/compare reads computed at once (the rest queue)."
    )
    max_streams_per_token: int = Field(
        default=32,
        ge=1,
        description="Event streams (SSE) open at once per bearer token or browser session; "
        "one more gets 429.",
    )
    # local dispatch (the supervisor of `kdlab serve`, KDLAB_EXECUTOR=local)
    cpu_slots: int = Field(default=1, ge=1, description="CPU-only runs trained at once.")
    lease_seconds: float = Field(
        default=30.0, gt=0, description="A run with no heartbeat for this long has lost its worker."
    )
    sweep_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often the supervisor claims, sweeps and cancels."
    )
    cancel_grace_seconds: float = Field(
        default=20.0, ge=0, description="SIGTERM to SIGKILL delay when a run is cancelled."
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Worker attempts per run before a lost worker fails it."
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL workers use to reach the API; default http://127.0.0.1:<port>.",
    )
    allowed_hosts: str | None = Field(
        default=None,
        description="Comma-separated host names the server answers to (`*`: any); checked in "
        "open mode and whenever set. Loopback names, the bind host and public_url's host are "
        "always allowed.",
    )

    @cached_property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'kdlab.db'}"

    @property
    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.data_path / 'mlflow.db'}"

    @property
    def resolved_public_url(self) -> str:
        """Where workers reach the API: `public_url`, else this machine's address and port."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host
        if host in ("", "0.0.0.0", "localhost"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def logs_dir(self) -> Path:
        """Captured stdout/stderr of local workers: `<logs_dir>/<run>/<attempt>.log`."""
        return self.data_path / "logs"

    @property
    def work_dir(self) -> Path:
        """Scratch directories of local workers: `<work_dir>/<run>/`."""
        return self.data_path / WORK_DIR

    @property
    def uploads_dir(self) -> Path:
        return self.data_path / "uploads"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_path / "artifacts"

    @property
    def open_access(self) -> bool:
        """No token configured and bound to loopback: one local user, no auth."""
        return self.token is None and is_loopback(self.host)

    def check_bind(self) -> None:
        """Refuse to serve beyond this machine without a token, or with a short one."""
        if is_loopback(self.host):
            return
        if self.token is None:
            raise ValueError(
                f"KDLAB_TOKEN is not set but the server would listen on {self.host}; set "
                f"KDLAB_TOKEN=<a long random secret> ({MAKE_TOKEN}) or bind to 127.0.0.1"
            )
        if len(self.token) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"KDLAB_TOKEN has {len(self.token)} characters but the server would listen on "
                f"{self.host}, where it needs at least {MIN_TOKEN_CHARS}; make one with "
                f"{MAKE_TOKEN}"
            )

    def host_allow_list(self) -> frozenset[str] | None:
        """The host names requests may name in `Host:` (lower case, no port, IPv6 without
        brackets; any loopback address is allowed besides), or None: no check. Checked in open
        mode (a page the user visits could otherwise reach this API through DNS rebinding) and
        whenever KDLAB_ALLOWED_HOSTS is set; `*` in it allows any host."""
        listed = [h.strip().lower() for h in (self.allowed_hosts or "").split(",") if h.strip()]
        if "*" in listed or (not listed and not self.open_access):
            return None
        names = {"localhost", *(host_name(h) for h in listed)}
        if self.host not in ("", "0.0.0.0", "::"):
            names.add(host_name(self.host))
        public = urlsplit(self.resolved_public_url).hostname
        if public:
            names.add(public.lower())
        return frozenset(names)


MIN_TOKEN_CHARS = 32
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


def host_name(host: str) -> str:
    """`Host:` header or setting → its name: lower case, no port, IPv6 without brackets, no
    trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
