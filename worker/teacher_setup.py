"""The teacher of a distill run: the model with its weights, its input adapter, the check that
it is trained, and attaching it (with the KD losses) to the student via `kd.convert`."""

from __future__ import annotations

import torch
from torch import nn

from kdlab.worker import catalog, dry_run, kd
from kdlab.worker.config import DatasetSpec, DistillSpec, ModelSpec

WEAK_TEACHER_FACTOR = 1.5  # a teacher below 1.5 × chance accuracy looks untrained


def build_teacher(
    spec: ModelSpec,
    state: dict[str, torch.Tensor] | None,
    info: catalog.DataInfo,
    device: torch.device,
) -> nn.Module:
    """The catalog teacher with `state` loaded (None: random init), frozen, in eval mode."""
    teacher = catalog.build_model(spec, info)
    if state is not None:
        try:
            teacher.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"the teacher weights do not fit teacher {spec.name!r} with "
                f"params {spec.params}: {err}"
            ) from None
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def build_teacher_adapter(
    spec: DistillSpec, dataset: DatasetSpec, info: catalog.DataInfo, device: torch.device
) -> nn.Module | None:
    """The teacher input adapter, built and checked as the dry run does (one code path: the
    same ConfigError naming `distill.teacher_input_adapter`), on `device`."""
    adapter = dry_run.build_teacher_adapter(spec, dataset, info)
    return adapter.to(device) if adapter is not None else None


def check_teacher_accuracy(acc: float, num_classes: int, allow_weak: bool) -> None:
    """Refuse a teacher at chance level (unless `distill.allow_weak_teacher`)."""
    chance = 1.0 / num_classes
    if acc < WEAK_TEACHER_FACTOR * chance and not allow_weak:
        raise ValueError(
            f"the teacher weights look untrained: eval/teacher_acc = {acc:.4f} on the val "
            f"split, chance is {chance:.4f} (1/{num_classes} classes). Check teacher.weights "
            "(run_id, checkpoint or path), or set distill.allow_weak_teacher: true to distil "
            "from it anyway"
        )


def attach_teacher(
    student: nn.Module,
    teacher: nn.Module,
    spec: DistillSpec,
    adapter: nn.Module | None,
    info: catalog.DataInfo,
    device: torch.device,
) -> kd.DistillationModel:
    """Attach teacher and losses; the optimizer is built afterwards so adapters train."""
    criterion = {
        (p.student_layer, p.teacher_layer): kd.losses.build_loss(p.loss.name, p.loss.params)
        for p in spec.pairs
    }
    return kd.convert(
        student,
        teacher=teacher,
        criterion=criterion,
        balancer=kd.build_balancer(spec.balancer.name, spec.balancer.params),
        teacher_input_adapter=adapter,
        example_input=catalog.example_input(info).to(device),
    )
