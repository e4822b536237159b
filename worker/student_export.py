"""The end of a run: save the exported student, and check the saved file evaluates exactly like
the student did in training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kdlab.worker import kd

EXPORT_TOLERANCE = 1e-6  # |exported − in-training| student accuracy allowed after export


def save_student(model: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """Save the plain student of `model` (a `DistillationModel` is exported first)."""
    student = kd.export(model) if isinstance(model, kd.DistillationModel) else model
    kd.save(student, path, metadata=metadata)


def check_export(exported: float, in_training: float, path: Path) -> None:
    """Refuse an export whose accuracy differs from the in-training one (same weights)."""
    if abs(exported - in_training) > EXPORT_TOLERANCE:
        raise RuntimeError(
            f"the exported student evaluates to accuracy {exported:.6f} but the student "
            f"reached {in_training:.6f} in training (same weights); export lost or changed "
            f"weights: {path}"
        )
