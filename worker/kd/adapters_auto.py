"""Learned projections that map a student feature to the teacher's shape (FitNets-style regressors).

`build_auto_adapter` is what `adapter="auto"` means for the feature losses: a bias-free 1x1 conv for
4-D ``[N, C, H, W]`` maps whose channel counts differ, a bias-free ``Linear`` for 2-D/3-D features
whose last dim differs, and an error naming both shapes for anything a projection cannot fix.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def _build(student: tuple[int, ...], teacher: tuple[int, ...], owner: str) -> nn.Module:
    rank = len(student)
    if rank == len(teacher) == 4 and student[0] == teacher[0] and student[2:] == teacher[2:]:
        return nn.Conv2d(student[1], teacher[1], kernel_size=1, bias=False)
    if rank == len(teacher) and rank in (2, 3) and student[:-1] == teacher[:-1]:
        return nn.Linear(student[-1], teacher[-1], bias=False)
    raise ValueError(
        f"{owner}: cannot build an automatic adapter from student shape {list(student)} to "
        f"teacher shape {list(teacher)}: 'auto' only projects channels (4-D [N, C, H, W] with the "
        "same H, W) or the last dim (2-D/3-D features with equal leading dims). Pick layers whose "
        "other dims agree, or pass your own nn.Module as adapter= that maps student to teacher shape."
    )


def _same_kind(existing: nn.Module, new: nn.Module) -> bool:
    weight_a = getattr(existing, "weight", None)
    weight_b = getattr(new, "weight", None)
    return (
        type(existing) is type(new)
        and weight_a is not None
        and weight_b is not None
        and weight_a.shape == weight_b.shape
    )


def build_auto_adapter(
    student_shape: Sequence[int],
    teacher_shape: Sequence[int],
    *,
    owner: str = "adapter",
    existing: nn.Module | None = None,
) -> nn.Module | None:
    """Projection from student to teacher shape; None when the shapes already match.

    `existing` (an adapter built by an earlier call) is returned unchanged when it already fits, so
    calling setup twice keeps trained weights. `owner` names the loss in error messages.
    """
    student, teacher = _shape(student_shape), _shape(teacher_shape)
    if student == teacher:
        return None
    new = _build(student, teacher, owner)
    if existing is not None and _same_kind(existing, new):
        return existing
    return new
