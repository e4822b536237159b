"""Upload JSON shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

UploadFormat = Literal["safetensors", "pt"]


class UploadOut(BaseModel):
    """An uploaded weights file. Whatever came in, the stored file is safetensors."""

    id: str
    filename: str = Field(
        description="The client's file name, reduced to its base name (display only)."
    )
    format: UploadFormat = Field(
        description="What was uploaded: safetensors, or pt (.pt/.pth, converted)."
    )
    sha256: str = Field(description="Hex sha256 of the stored safetensors file.")
    size: int = Field(description="Bytes of the stored safetensors file.")
    tensor_count: int
    created_at: datetime
