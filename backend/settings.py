"""Service settings, read from `KDLAB_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDLAB_", extra="ignore")

    data_dir: Path = Field(default=Path("~/.kdlab"), description="Runs, uploads and SQLite files.")
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
        return self.data_path / "work"

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
        """Refuse to serve beyond this machine without a token."""
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"KDLAB_TOKEN is not set but the server would listen on {self.host}; set "
                "KDLAB_TOKEN=<a long random secret> or bind to 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
