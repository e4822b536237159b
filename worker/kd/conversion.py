"""`convert` a student into a DistillationModel and `export` it back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kdlab.worker.kd.config import KDLossConfig, parse_mode
from kdlab.worker.kd.distillation_model import DistillationModel, LayerPair, SequentialStudent
from kdlab.worker.kd.loss_balancers import LossBalancer
from kdlab.worker.kd.probe import OUTPUT, probe_outputs, resolve_layer

_CLASS_CACHE: dict[type, type] = {}


def build_teacher(teacher: Any) -> nn.Module:
    """An nn.Module from a module, a callable returning one, or `(factory, args, kwargs)`."""
    if isinstance(teacher, nn.Module):
        return teacher
    if isinstance(teacher, tuple):
        if not 1 <= len(teacher) <= 3:
            raise ValueError(
                f"teacher: a tuple must be (factory,), (factory, args) or (factory, args, kwargs); "
                f"got {len(teacher)} items"
            )
        factory, args, kwargs = teacher[0], (), {}
        if len(teacher) > 1:
            args = teacher[1]
        if len(teacher) > 2:
            kwargs = teacher[2]
        built = factory(*args, **kwargs)
    elif callable(teacher):
        built = teacher()
    else:
        raise TypeError(
            f"teacher: expected an nn.Module, a callable returning one, or a tuple "
            f"(factory, args, kwargs); got {type(teacher).__name__}"
        )
    if not isinstance(built, nn.Module):
        raise TypeError(f"teacher: the factory returned a {type(built).__name__}, not an nn.Module")
    return built


def _normalise_criterion(criterion: Any) -> dict[LayerPair, Callable]:
    if criterion is None:
        raise ValueError(
            "criterion: give a loss (e.g. kd.losses.LogitsKL()) or a dict of layer pairs"
        )
    if not isinstance(criterion, dict):
        criterion = {(OUTPUT, OUTPUT): criterion}
    for pair, loss in criterion.items():
        if not (
            isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        ):
            raise TypeError(
                f"criterion: keys must be (student_layer, teacher_layer) string pairs, got {pair!r}"
            )
        if not callable(loss):
            raise TypeError(
                f"criterion[{pair}]: {type(loss).__name__} is not callable; give a loss"
            )
    if not criterion:
        raise ValueError("criterion: the dict is empty; give at least one layer pair")
    return dict(criterion)


def _check_balancer(balancer: Any, criterion: dict[LayerPair, Callable]) -> None:
    if balancer is None and len(criterion) > 1:
        raise ValueError(
            f"balancer: {len(criterion)} KD pairs need a balancer to combine them; "
            "pass balancer=kd.StaticBalancer(kd_weight=...)"
        )
    if balancer is not None and not callable(balancer):
        raise TypeError(f"balancer: {type(balancer).__name__} is not callable")
    if isinstance(balancer, LossBalancer):
        balancer.pair_weights([str(p) for p in criterion])  # raises on a weight-count mismatch


def _distillation_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        bases: tuple[type, ...] = (DistillationModel, cls)
        if issubclass(cls, nn.Sequential):
            bases = (DistillationModel, SequentialStudent, cls)
        _CLASS_CACHE[cls] = type(f"Distillation{cls.__name__}", bases, {})
    return _CLASS_CACHE[cls]


def _probe_pairs(
    student: nn.Module,
    teacher: nn.Module,
    criterion: dict[LayerPair, Callable],
    example_input: Any,
    adapter: Callable | None,
) -> dict[LayerPair, tuple[Any, Any]]:
    student_out = probe_outputs(student, {s for s, _ in criterion}, example_input)
    teacher_input = example_input
    if adapter is not None:
        teacher_input = (
            adapter(example_input)
            if not isinstance(example_input, tuple)
            else (adapter(example_input[0]), *example_input[1:])
        )
    teacher_out = probe_outputs(teacher, {t for _, t in criterion}, teacher_input)
    return {(s, t): (student_out[s], teacher_out[t]) for s, t in criterion}


def convert(
    student: nn.Module,
    teacher: Any = None,
    criterion: Any = None,
    balancer: Callable | None = None,
    teacher_input_adapter: Callable | None = None,
    example_input: Any = None,
    mode: Any = None,
) -> DistillationModel:
    """Turn `student` (in place) into a DistillationModel, ModelOpt style.

    Either keyword arguments or `mode=[("kd_loss", {"teacher_model": ..., "criterion": ...,
    "loss_balancer": ...})]`. With `example_input`, layer shapes are probed now (meta device
    where possible), so shape errors surface here and learned adapters exist before the
    optimizer is built.
    """
    if not isinstance(student, nn.Module):
        raise TypeError(f"student: expected an nn.Module, got {type(student).__name__}")
    if isinstance(student, DistillationModel):
        raise ValueError("student: this model is already converted; kd.export it first")
    if mode is not None:
        if teacher is not None or criterion is not None or balancer is not None:
            raise ValueError("convert: give either mode=[('kd_loss', {...})] or keyword arguments")
        cfg = parse_mode(mode)
    else:
        cfg = KDLossConfig(teacher, criterion, balancer, teacher_input_adapter, example_input)
    if cfg.teacher_model is None:
        raise ValueError("teacher: missing; give the teacher module, a factory, or a tuple")
    teacher_module = build_teacher(cfg.teacher_model)
    if teacher_module is student:
        raise ValueError("teacher: the teacher is the student itself; pass a separate copy")
    pairs = _normalise_criterion(cfg.criterion)
    for student_layer, teacher_layer in pairs:
        resolve_layer(student, student_layer, "student")
        resolve_layer(teacher_module, teacher_layer, "teacher")
    _check_balancer(cfg.loss_balancer, pairs)
    probed = None
    if cfg.example_input is not None:
        probed = _probe_pairs(
            student, teacher_module, pairs, cfg.example_input, cfg.teacher_input_adapter
        )
    original = type(student)
    student.__class__ = _distillation_class(original)
    dm = student
    assert isinstance(dm, DistillationModel)
    dm._kd_attach(original, teacher_module, pairs, cfg.loss_balancer, cfg.teacher_input_adapter)
    if probed is not None:
        try:
            dm._kd_setup_losses(probed, lazy=False)
        except Exception:
            export(dm)  # leave the caller's student as it was
            raise
    return dm


def export(model: nn.Module) -> nn.Module:
    """The student in its original class: hooks removed, teacher and KD attributes gone."""
    if not isinstance(model, DistillationModel):
        raise TypeError(
            f"kd.export: expected a model returned by kd.convert, got a {type(model).__name__}"
        )
    for handle in model._kd_handles:
        handle.remove()
    original = model.original_class
    del model._kd_criterion
    for name in [n for n in vars(model) if n.startswith(DistillationModel.KD_PREFIX)]:
        delattr(model, name)
    model.__class__ = original
    return model
