"""What a run records about itself (`metadata.json`): its shape, then what it optimises."""

from __future__ import annotations

from typing import Any

from torch import nn

from kdlab.worker import kd
from kdlab.worker.config import RunConfig
from kdlab.worker.loss_formula import loss_formula


def loss_metadata(
    config: RunConfig,
    model: nn.Module,
    dm: kd.DistillationModel | None,
    teacher: nn.Module | None,
    teacher_fingerprint: str | None,
) -> dict[str, Any]:
    """The exact loss formula, the model sizes, the teacher's fingerprint."""
    meta: dict[str, Any] = {
        "student_params": sum(
            p.numel()
            for name, p in model.named_parameters()
            if not name.startswith(kd.DistillationModel.KD_PREFIX)
        ),
    }
    if dm is None:
        meta["loss"] = loss_formula(config, None)
    else:
        assert teacher is not None
        meta["loss"] = loss_formula(config, dm.describe_kd_loss())
        meta["teacher_fingerprint"] = teacher_fingerprint
        meta["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    return meta
