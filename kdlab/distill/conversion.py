"""ModelOpt's ``convert`` / ``export`` (and ``mto.save`` / ``mto.restore``) on the engine's."""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Any

from torch import nn

from kdlab.distill.distillation_model import DistillationModel, KDConfigError, distillation_class
from kdlab.worker import kd

__all__ = ["KDConfigError", "convert", "export", "restore", "save"]

KD_LOSS_MODE = "kd_loss"
CONFIG_KEYS = ("teacher_model", "criterion", "loss_balancer", "expose_minimal_state_dict")
_EXAMPLE = (
    'mtd.convert(model, mode=[("kd_loss", {"teacher_model": teacher, '
    '"criterion": mtd.LogitsDistillationLoss()})])'
)


def _mode_config(mode: Any) -> dict[str, Any]:
    """ModelOpt's mode-like (`"kd_loss"`, `[("kd_loss", config)]`, …) → the kd_loss config."""
    entries = [mode] if isinstance(mode, (str, tuple)) else list(mode)
    if isinstance(mode, tuple) and len(mode) == 2 and isinstance(mode[0], str):
        entries = [mode]  # the bare ("kd_loss", config) pair
    if len(entries) != 1:
        raise KDConfigError(
            f"mode: kdlab.distill has one mode, 'kd_loss'; got {mode!r}. Use {_EXAMPLE}"
        )
    entry = entries[0]
    name, config = (entry, None) if isinstance(entry, str) else (entry[0], entry[1])
    if name != KD_LOSS_MODE:
        raise KDConfigError(f"mode: unknown mode {name!r}; the only mode is 'kd_loss'")
    config = dict(config or {})
    for key in config:
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise KDConfigError(
                f"kd_loss config: unknown key {key!r}; {hint}known keys: {list(CONFIG_KEYS)}"
            )
    missing = [k for k in ("teacher_model", "criterion") if config.get(k) is None]
    if missing:
        raise KDConfigError(
            f"kd_loss config: missing {' and '.join(repr(k) for k in missing)} (there is no "
            f"default teacher or loss). Use {_EXAMPLE}"
        )
    return config


def convert(model: nn.Module, mode: Any) -> DistillationModel:
    """Turn `model` (the student, in place) into a `DistillationModel` (``mtd.convert``).

    ``mode=[("kd_loss", {"teacher_model": ..., "criterion": ..., "loss_balancer": None,
    "expose_minimal_state_dict": True})]``: `teacher_model` is a module, a class or callable
    returning one, or a tuple ``(cls_or_callable,)``, ``(…, args)``, ``(…, args, kwargs)``;
    `criterion` a loss (on the outputs) or ``{(student_layer, teacher_layer): loss}``.
    """
    config = _mode_config(mode)
    criterion = config["criterion"]
    balancer = config.get("loss_balancer")
    pairs = criterion if isinstance(criterion, dict) else {("", ""): criterion}
    if balancer is None and len(pairs) > 1:
        raise KDConfigError(
            "Cannot have multiple layer-loss pairs without a `DistillationLossBalancer`; "
            "pass loss_balancer=mtd.StaticLossBalancer([...]) with one weight per pair"
        )
    if isinstance(balancer, nn.Module) and any(True for _ in balancer.parameters()):
        raise KDConfigError("Loss Balancer cannot have parameters.")
    teacher = kd.build_teacher(config["teacher_model"])
    dm = kd.convert(model, teacher=teacher, criterion=pairs, balancer=balancer)
    dm.__class__ = distillation_class(dm.original_class)
    assert isinstance(dm, DistillationModel)
    dm._kd_compat_attach(teacher, config.get("expose_minimal_state_dict", True))
    return dm


def export(model: nn.Module) -> nn.Module:
    """The student in its original class, teacher and losses detached (``mtd.export``).

    A model that is not a DistillationModel is returned as it is, with a warning (ModelOpt's).
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        warnings.warn(
            f"Unwrapping a {type(model).__name__} model for export! The export is in-place; "
            "re-create the wrapper after export.",
            stacklevel=2,
        )
        model = model.module
    if not isinstance(model, kd.DistillationModel):
        warnings.warn("Export of model failed: Model is not a `DistillationModel`", stacklevel=2)
        return model
    if isinstance(model, DistillationModel):
        return model.export()
    return kd.export(model)


def save(model: nn.Module, f: str | os.PathLike) -> None:
    """Write the student's weights to `f` (ModelOpt's ``mto.save``; a safetensors file).

    For a converted model only the student is saved (no teacher, no loss modules), with the
    KD set-up described in the file's metadata.
    """
    if isinstance(model, DistillationModel):
        with model.hide_teacher_model(), model.hide_loss_modules():
            kd.save(model, f)
        return
    kd.save(model, f)


def restore(model: nn.Module, f: str | os.PathLike) -> nn.Module:
    """Load the student weights saved in `f` into `model` and return it (``mto.restore``).

    `model` keeps its class: a checkpoint of a converted model does not re-create the
    distillation wrapper (call `convert` again to distill further).
    """
    try:
        kd.load_metadata(f)
    except Exception as error:  # safetensors' own error type for a file that is none
        raise ValueError(
            f"{f}: not a file written by kdlab.distill.save ({error}). A ModelOpt checkpoint "
            "(mto.save) is a torch pickle: load its weights with model.load_state_dict("
            "torch.load(path, weights_only=False)['model_state_dict'], strict=False)"
        ) from error
    return kd.restore(model, f)
