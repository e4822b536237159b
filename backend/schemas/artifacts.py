"""Artifact JSON shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

ArtifactKind = Literal["student", "checkpoint", "log", "file"]
StudentFormat = Literal["safetensors", "pt"]


class ArtifactOut(BaseModel):
    """One file of a run, as listed; its bytes are at `download_url`."""

    name: str = Field(description="Unique within the run; the last path segment of its URL.")
    kind: ArtifactKind
    sha256: str = Field(
        description="Hex sha256 of the stored bytes (also sent as X-Content-SHA256)."
    )
    size: int = Field(description="Bytes.")
    created_at: datetime = Field(description="When this version of the file was stored.")
    download_url: str = Field(description="GET this path (under the same host) for the bytes.")
