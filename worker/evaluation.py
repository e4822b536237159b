"""Evaluating a student and/or a teacher on the val split, and which eval metric is better.

Accuracy is top-1 over labels != -100 (samples, or tokens for LMs); with a teacher also its
accuracy, top-1 agreement and KL(teacher‖student) at T=1 (summed over classes, mean over
labelled positions). Sums stay on the device: one host read for the whole split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.worker import kd
from kdlab.worker.batches import BatchSource
from kdlab.worker.kd.losses import IGNORE_INDEX
from kdlab.worker.teacher_outputs import TeacherOutputs


def best_is_max(metric: str) -> bool:
    return not ("loss" in metric or metric.endswith("/kl"))


def check_best_metric(name: str, distill: bool) -> None:
    """Refuse a `train.best_metric` that is not an eval metric the run logs."""
    available = ["eval/student_acc", "eval/student_loss"]
    if distill:
        available += ["eval/teacher_acc", "eval/agreement", "eval/kl"]
    if name not in available:
        raise ValueError(
            f"train.best_metric: {name!r} is not an eval metric of this run; choose one of "
            f"{available}"
        )


def student_forward(student: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The student's logits alone (a `DistillationModel` skips its teacher)."""
    if isinstance(student, kd.DistillationModel):
        with student.only_student_forward():
            return student(x)
    return student(x)


@torch.no_grad()
def evaluate(
    batches: BatchSource,
    student: nn.Module | None,
    teacher_forward: Callable[[torch.Tensor], torch.Tensor] | None,
    teacher_outputs: TeacherOutputs,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, float]:
    """The `eval/*` metrics of `student` and/or the teacher (`teacher_forward`, its outputs
    cached per batch index in `teacher_outputs`) over `batches`."""
    was_training = student.training if student is not None else False
    if student is not None:
        student.eval()
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    for index, batch in enumerate(batches.batches()):
        x, y = batch.x, batch.y.flatten()
        labelled = y != IGNORE_INDEX
        add("count", labelled.sum())
        s_logits = t_logits = None
        with autocast():
            if student is not None:
                s_logits = student_forward(student, x).float().flatten(0, -2)
            if teacher_forward is not None:
                t_out = teacher_outputs.get(index, partial(teacher_forward, x))
                t_logits = t_out.float().flatten(0, -2)
        if s_logits is not None:
            ce = F.cross_entropy(s_logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
            add("student_loss", ce)
            add("student_acc", ((s_logits.argmax(-1) == y) & labelled).sum())
        if t_logits is not None:
            add("teacher_acc", ((t_logits.argmax(-1) == y) & labelled).sum())
        if s_logits is not None and t_logits is not None:
            agree = s_logits.argmax(-1) == t_logits.argmax(-1)
            add("agreement", (agree & labelled).sum())
            kl = F.kl_div(
                F.log_softmax(s_logits, -1),
                F.log_softmax(t_logits, -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
            add("kl", (kl * labelled).sum())
    if teacher_forward is not None:
        teacher_outputs.end_pass()
    if student is not None and was_training:
        student.train()
    keys = list(sums)
    values = torch.stack([sums[k].double() for k in keys]).tolist() if keys else []
    totals = dict(zip(keys, values, strict=True))  # one host read for the whole split
    count = totals.pop("count", 0.0)
    if count == 0:
        raise ValueError("the val split has no labelled samples or tokens (all labels -100)")
    return {f"eval/{k}": v / count for k, v in totals.items()}
