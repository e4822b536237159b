"""ModelOpt's ``DistillationModel`` on top of the engine's (`kdlab.worker.kd.DistillationModel`).

The engine keeps the teacher outside the module tree and captured outputs off the user's
modules; ModelOpt users rely on the teacher and the loss modules being children of the model
(`parameters()`, `.to()`, `state_dict(expose_minimal_state_dict=False)`), on its loss-dict keys
and on its context managers. This subclass adds exactly that; hooks, capture, the teacher's
no-grad forward and the per-pair loss call stay the engine's.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from kdlab.worker import kd
from kdlab.worker.kd.distillation_model import SequentialStudent
from kdlab.worker.kd.loss_balancers import STUDENT_LOSS_KEY
from kdlab.worker.kd.probe import OUTPUT

__all__ = ["DistillationModel"]

TEACHER_ATTR = "_teacher_model"  # ModelOpt's child names (its state-dict prefixes)
LOSSES_ATTR = "_loss_modules"


class KDConfigError(ValueError, AssertionError):
    """A ModelOpt-style configuration or call error (ModelOpt raises AssertionError there)."""


class DistillationModel(kd.DistillationModel):
    """The student with ModelOpt's distillation API (``mtd.DistillationModel``).

    Placed in front of the student's class by `kdlab.distill.convert`, so
    ``isinstance(model, original_cls)`` holds and the class's ``forward`` has the student's
    signature.
    """

    _kd_expose_minimal: bool
    _kd_only_teacher: bool
    _kd_loss_names: list[str]

    def _kd_compat_attach(self, teacher: nn.Module, expose_minimal_state_dict: bool) -> None:
        set_plain = object.__setattr__
        set_plain(self, "_kd_expose_minimal", bool(expose_minimal_state_dict))
        set_plain(self, "_kd_only_teacher", False)
        losses = [self._kd_losses[self._kd_keys[pair]] for pair in self._kd_pairs]
        set_plain(self, "_kd_loss_names", [_loss_name(loss) for loss in losses])
        # the engine registers every loss as `_kd_criterion`; ModelOpt registers the losses
        # that have parameters as `_loss_modules` and the teacher as `_teacher_model`
        criterion = self._modules.pop("_kd_criterion")
        set_plain(self, "_kd_criterion", criterion)  # kd.export deletes it
        with_params = {id(m): m for m in losses if any(True for _ in m.parameters())}  # once each
        self._loss_modules = nn.ModuleList(with_params.values())
        self._teacher_model = teacher

    # -------------------------------------------------------------------- ModelOpt properties
    @property
    def original_cls(self) -> type:
        """The student's class before `convert`."""
        return self.original_class

    @property
    def loss_modules(self) -> nn.ModuleList:
        """The loss modules that have parameters (they train with the student)."""
        modules = self._modules[LOSSES_ATTR]
        assert isinstance(modules, nn.ModuleList)
        return modules

    @contextmanager
    def hide_teacher_model(self, enable: bool = True) -> Iterator[None]:
        """Within the block, the teacher is no child of the model (state_dict, parameters)."""
        teacher = self._modules[TEACHER_ATTR]
        if enable:
            self._modules[TEACHER_ATTR] = nn.Module()
        try:
            yield
        finally:
            self._modules[TEACHER_ATTR] = teacher

    @contextmanager
    def hide_loss_modules(self, enable: bool = True) -> Iterator[None]:
        """Within the block, the loss modules are no children of the model."""
        losses = self._modules[LOSSES_ATTR]
        if enable:
            self._modules[LOSSES_ATTR] = nn.ModuleList()
        try:
            yield
        finally:
            self._modules[LOSSES_ATTR] = losses

    @contextmanager
    def only_teacher_forward(self, enable: bool = True) -> Iterator[None]:
        """Within the block, calls run the teacher alone and return its output."""
        if enable:
            object.__setattr__(self, "_kd_only_teacher", True)
        try:
            yield
        finally:
            object.__setattr__(self, "_kd_only_teacher", False)

    @contextmanager
    def only_student_forward(self, enable: bool = True) -> Iterator[None]:
        """Within the block, calls run the student alone (its outputs are still captured)."""
        if not enable:
            yield
            return
        with super().only_student_forward():
            yield

    def export(self) -> nn.Module:
        """The student in its original class, teacher and losses detached (`mtd.export`)."""
        for name in (TEACHER_ATTR, LOSSES_ATTR):
            self._modules.pop(name, None)
        return kd.export(self)

    # ----------------------------------------------------------------------- nn.Module hooks
    def train(self, mode: bool = True) -> DistillationModel:
        if self.training != mode:  # ModelOpt: switching train/eval drops captured outputs
            self._kd_student_out.clear()
            self._kd_teacher_out.clear()
        super().train(mode)
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> DistillationModel:
        # the teacher is a child here, so nn.Module's _apply reaches it (the engine's would twice)
        super(kd.DistillationModel, self)._apply(fn, recurse)
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The state without the teacher's when `expose_minimal_state_dict` (the default)."""
        with self.hide_teacher_model(enable=self._kd_expose_minimal):
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        """Load a full, minimal or student-only state dict (as ModelOpt)."""
        hide_teacher = self._kd_expose_minimal or not any(
            k.startswith(TEACHER_ATTR) for k in state_dict
        )
        hide_losses = len(self.loss_modules) > 0 and not any(
            k.startswith(LOSSES_ATTR) for k in state_dict
        )
        with self.hide_teacher_model(hide_teacher), self.hide_loss_modules(hide_losses):
            return super().load_state_dict(state_dict, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._kd_only_teacher:
            self._kd_warn_stored(student=False)
            with torch.no_grad():
                output = self._kd_teacher(*self._kd_teacher_args(args), **kwargs)
            self._kd_teacher_out[OUTPUT] = output
            return output
        if self._kd_only_student:
            self._kd_warn_stored(teacher=False)
            output = super().forward(*args, **kwargs)
            self._kd_student_out[OUTPUT] = output  # ModelOpt captures in student-only mode too
            return output
        self._kd_warn_stored()
        return super().forward(*args, **kwargs)

    def _kd_warn_stored(self, student: bool = True, teacher: bool = True) -> None:
        """ModelOpt's warnings when a forward finds outputs no compute_kd_loss consumed."""
        if student and self.training and self._kd_student_out:
            warnings.warn(
                f"Student's Module `{self.original_class.__name__}` already has an intermediate "
                "output stored. This is undesired behavior unless Activation Checkpointing is in use.",
                stacklevel=3,
            )
        if teacher and self._kd_teacher_out:
            warnings.warn(
                f"Teacher's Module `{type(self._kd_teacher).__name__}` already has an intermediate "
                "output stored. This is expected when `DistillationModel.compute_kd_loss` is not "
                "called in eval mode.",
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------ KD loss
    def compute_kd_loss(  # type: ignore[override]
        self,
        student_loss: torch.Tensor | None = None,
        loss_reduction_fn: Callable | None = None,
        skip_balancer: bool = False,
        **loss_fn_kwargs: Any,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The total distillation loss of the last forward (ModelOpt's signature and loss dict).

        `loss_reduction_fn` is applied to each KD loss before balancing; `skip_balancer`
        returns ModelOpt's loss dict ``{"student_loss"?, "<LossClass>_<i>": ...}``;
        `loss_fn_kwargs` (e.g. ``labels=``) reach each loss that accepts them.
        """
        if self.loss_balancer is None and student_loss is not None:
            raise KDConfigError(
                "Cannot pass in student loss without using Loss Balancer: convert with "
                "loss_balancer=mtd.StaticLossBalancer(...) or call compute_kd_loss() without it"
            )
        terms = super().compute_kd_loss(skip_balancer=True, **loss_fn_kwargs)
        assert isinstance(terms, dict)
        loss_dict: dict[str, torch.Tensor] = {}
        if student_loss is not None:
            loss_dict[STUDENT_LOSS_KEY] = student_loss
        for i, (name, loss) in enumerate(zip(self._kd_loss_names, terms.values(), strict=True)):
            if loss_reduction_fn is not None:
                loss = loss_reduction_fn(loss)
            loss_dict[f"{name}_{i}"] = loss
        if skip_balancer:
            return loss_dict
        balancer = self.loss_balancer
        if balancer is None:
            (total,) = loss_dict.values()
            return total
        result: torch.Tensor = balancer(loss_dict)
        return result


def _loss_name(loss: nn.Module) -> str:
    """ModelOpt's key stem: the loss's class name (a wrapped plain function: `function`)."""
    fn = getattr(loss, "fn", None)
    if fn is not None and type(loss).__name__ == "_FunctionLoss":
        return type(fn).__name__
    return type(loss).__name__


class _SequentialStudent(SequentialStudent):
    """The engine's Sequential view, also without ModelOpt's `_teacher_model`/`_loss_modules`."""

    def _student_items(self) -> list[tuple[str, nn.Module]]:
        return [(k, m) for k, m in super()._student_items() if k not in (TEACHER_ATTR, LOSSES_ATTR)]


_CLASS_CACHE: dict[type, type] = {}


def distillation_class(cls: type) -> type:
    """`Distill<cls>` (ModelOpt's class name): the compat DistillationModel in front of `cls`, with its forward's
    signature (ModelOpt keeps it for `transformers.utils.find_labels`)."""
    if cls not in _CLASS_CACHE:
        bases: tuple[type, ...] = (DistillationModel, cls)
        if issubclass(cls, nn.Sequential):
            bases = (DistillationModel, _SequentialStudent, cls)

        def forward(self: DistillationModel, *args: Any, **kwargs: Any) -> Any:
            return DistillationModel.forward(self, *args, **kwargs)

        with contextlib.suppress(TypeError, ValueError):
            forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
        forward.__doc__ = DistillationModel.forward.__doc__
        forward.__qualname__ = f"Distill{cls.__name__}.forward"
        _CLASS_CACHE[cls] = type(f"Distill{cls.__name__}", bases, {"forward": forward})
    return _CLASS_CACHE[cls]
