"""Run-config validation shared by `POST /api/runs`, `POST /api/runs/validate` and clone.

Two stages, both answering FastAPI's 422 list (`loc` = where the error is, under `body`):

1. the pydantic schema (`kdlab.worker.config.RunConfig`): types, bounds, catalog/loss names;
2. deep checks that need the models: the worker's dry run (`kdlab.worker.dry_run`: the dataset's
   DataInfo, student and teacher probed, the teacher input adapter, every pair through the
   engine's own checks), then the teacher weights (a succeeded run with a matching model and
   checkpoint, or an upload whose tensors fit the teacher), which need the database.
   This module only maps the dry run's answers to JSON paths.

Nothing here writes to the database. The model probes run before any query, so no database
transaction (SQLite takes its write lock at BEGIN) is open while they run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from kdlab.backend.db.models import Artifact, Run, Upload
from kdlab.backend.errors import Invalid
from kdlab.backend.schemas.runs import MemoryEstimate, PairReport
from kdlab.backend.services.catalog import pydantic_errors
from kdlab.backend.settings import Settings
from kdlab.worker import catalog
from kdlab.worker.config import DatasetSpec, RunConfig, TeacherSpec
from kdlab.worker.dry_run import (
    PROBE_BATCH,
    PROBE_TIME_LIMIT_S,
    CheckedPair,
    Probe,
    build_error,
    dry_run,
    shape_mismatch,
    state_shapes,
)
from kdlab.worker.kd.plugins.huggingface import unwrap_model_output
from kdlab.worker.kd.serialization import header_shapes
from kdlab.worker.names import ACTIVE_STATUSES, CHECKPOINT_ARTIFACTS, DATASETS_DIR

Loc = list[str | int]

PATH_REFUSED = (
    "teacher.weights.path is only for `kdlab train` on the command line; upload the file with "
    "POST /api/uploads and use upload_id"
)


def data_root(settings: Settings) -> Path:
    """Where file-backed datasets (image_folder, text_file, cifar10) live on the server."""
    return settings.data_path / DATASETS_DIR


@dataclass
class _Errors:
    prefix: list[str | int]
    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, loc: Loc, msg: str) -> None:
        self.items.append({"type": "value_error", "loc": [*self.prefix, *loc], "msg": msg})

    def raise_if_any(self) -> None:
        if self.items:
            raise Invalid(self.items)


@dataclass
class CheckedConfig:
    """A config that passed every check, with what the checks learned."""

    config: RunConfig
    pairs: list[PairReport]
    memory: MemoryEstimate
    teacher_run_id: str | None


def parse_config(data: Any, prefix: Iterable[str | int] = ("body",)) -> RunConfig:
    """Stage 1: the schema. Invalid with one entry per pydantic error."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise Invalid(pydantic_errors(err, prefix)) from None


def check_config(
    session: Session,
    settings: Settings,
    data: Any,
    prefix: Iterable[str | int] = ("body",),
) -> CheckedConfig:
    """Both stages; Invalid listing every error found (the schema's first, alone)."""
    config = parse_config(data, prefix)
    errors = _Errors(list(prefix))
    checked = dry_run(config, data_root(settings), PROBE_TIME_LIMIT_S)  # one box for the probes
    for problem in checked.problems:
        errors.add(list(problem.loc), problem.msg)
    if checked.info is None:  # the dataset itself: nothing else was checked
        errors.raise_if_any()
    assert checked.info is not None
    student, teacher = checked.student, checked.teacher
    teacher_run_id = None
    if config.kind == "distill":
        assert config.teacher is not None
        teacher_run_id = _check_weights(
            session, settings, errors, config.teacher, teacher, checked.info, config.dataset
        )
    errors.raise_if_any()
    assert student is not None
    learned = [p for pair in checked.pairs for p in pair.loss.parameters()]
    memory = estimate_memory(config, student, teacher, learned)
    return CheckedConfig(config, [_pair_report(p) for p in checked.pairs], memory, teacher_run_id)


# --------------------------------------------------------------------------- pairs


def describe_adapter(loss: nn.Module) -> str | None:
    """The learned projection a loss built in setup: 'Linear(16→64)', 'Conv2d(16→64, 1×1)'."""
    module = getattr(loss, "adapter", None) or getattr(loss, "align", None)
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}→{module.out_features})"
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"Conv2d({module.in_channels}→{module.out_channels}, {kh}×{kw})"
    return type(module).__name__ if isinstance(module, nn.Module) else None


def _shape(value: Any) -> list[int] | None:
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def _pair_report(pair: CheckedPair) -> PairReport:
    describe = getattr(pair.loss, "describe", None)
    return PairReport(
        student_layer=pair.student_layer,
        teacher_layer=pair.teacher_layer,
        student_shape=_shape(pair.student_out),
        teacher_shape=_shape(pair.teacher_out),
        adapter=describe_adapter(pair.loss),
        formula=describe() if describe is not None else type(pair.loss).__name__,
    )


# --------------------------------------------------------------------------- teacher weights


def _normal_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Params with the model's defaults filled in, so {} and {"hidden": [128]} compare equal."""
    try:
        model = catalog.params_model("models", name)
        return model.model_validate(params).model_dump(mode="json") if model else dict(params)
    except (ValueError, ValidationError):
        return dict(params)


def _check_weights(
    session: Session,
    settings: Settings,
    errors: _Errors,
    spec: TeacherSpec,
    teacher: Probe | None,
    info: catalog.DataInfo,
    dataset: DatasetSpec,
) -> str | None:
    """Check teacher.weights; the teacher run id when the weights come from a run."""
    weights = spec.weights
    loc: Loc = ["teacher", "weights"]
    if weights is None:
        return None
    if weights.path is not None:
        errors.add([*loc, "path"], PATH_REFUSED)
        return None
    if weights.upload_id is not None:
        _check_upload(session, settings, errors, spec, weights.upload_id, teacher)
        return None
    assert weights.run_id is not None
    _check_teacher_run(
        session, settings, errors, spec, weights.run_id, weights.checkpoint, teacher, info, dataset
    )
    return weights.run_id


def _check_teacher_run(
    session: Session,
    settings: Settings,
    errors: _Errors,
    spec: TeacherSpec,
    run_id: str,
    checkpoint: str,
    teacher: Probe | None,
    info: catalog.DataInfo,
    dataset: DatasetSpec,
) -> None:
    loc: Loc = ["teacher", "weights", "run_id"]
    run = session.get(Run, run_id)
    if run is None:
        errors.add(loc, f"teacher run {run_id!r} does not exist")
        return
    if run.kind == "external":
        errors.add(
            loc,
            f"teacher run {run_id} is an external run; its weights are not stored here: upload "
            "them with POST /api/uploads and use upload_id",
        )
        return
    if run.status != "succeeded":
        advice = (
            "wait until it succeeds"
            if run.status in ACTIVE_STATUSES
            else "only a run that succeeded can be a teacher"
        )
        errors.add(loc, f"teacher run {run_id} is {run.status}; {advice}")
        return
    trained = run.config.get("student") or {}
    name, params = trained.get("name"), dict(trained.get("params") or {})
    if name != spec.name or _normal_params(name, params) != _normal_params(spec.name, spec.params):
        errors.add(
            loc,
            f"teacher run {run_id} trained model {name!r} with params {params}, but this "
            f"config's teacher is {spec.name!r} with params {spec.params}; set teacher.name "
            "and teacher.params to the run's student",
        )
        return
    try:
        run_dataset = DatasetSpec.model_validate(run.config.get("dataset"))
        run_info = catalog.dataset_info(
            run_dataset, int(run.config.get("seed", 0)), data_root(settings)
        )
    except Exception:  # the run's dataset is gone (a file removed): nothing to compare
        run_info = None
    if run_info is not None:
        if (run_info.task, run_info.num_classes) != (info.task, info.num_classes):
            errors.add(
                loc,
                f"teacher run {run_id} was trained on dataset {run_dataset.name!r} "
                f"({run_info.task}, {run_info.num_classes} classes) but this run's dataset "
                f"{dataset.name!r} is {info.task} with {info.num_classes} classes",
            )
            return
        if teacher is not None and run_info.input_shape != info.input_shape:
            try:
                with torch.device("meta"):
                    trained_model = catalog.build_model(spec, run_info)
                mismatch = shape_mismatch(state_shapes(teacher.model), state_shapes(trained_model))
            except Exception:
                mismatch = None
            if mismatch:
                errors.add(
                    loc,
                    f"teacher run {run_id}'s weights (input shape {list(run_info.input_shape)}) "
                    f"do not fit the teacher built for input shape {list(info.input_shape)}: "
                    f"{mismatch}",
                )
                return
    artifact = CHECKPOINT_ARTIFACTS[checkpoint]
    found = session.scalar(
        select(Artifact.id).where(Artifact.run_id == run_id, Artifact.name == artifact)
    )
    if found is None:
        other = "latest" if checkpoint == "best" else "best"
        errors.add(
            ["teacher", "weights", "checkpoint"],
            f"teacher run {run_id} has no {checkpoint} checkpoint (artifact {artifact!r}); "
            f"try checkpoint: {other}",
        )


def _check_upload(
    session: Session,
    settings: Settings,
    errors: _Errors,
    spec: TeacherSpec,
    upload_id: str,
    teacher: Probe | None,
) -> None:
    loc: Loc = ["teacher", "weights", "upload_id"]
    upload = session.get(Upload, upload_id)
    if upload is None:
        errors.add(loc, f"upload {upload_id!r} does not exist; POST the file to /api/uploads")
        return
    try:
        shapes = header_shapes(settings.uploads_dir / upload.path)
    except Exception as err:
        errors.add(
            loc,
            f"upload {upload_id} ({upload.filename}) cannot be read as safetensors: "
            f"{build_error(err)}",
        )
        return
    if teacher is None:
        return
    mismatch = shape_mismatch(state_shapes(teacher.model), shapes)
    if mismatch:
        errors.add(
            loc,
            f"upload {upload_id} ({upload.filename}) does not fit teacher {spec.name!r} with "
            f"params {spec.params}: {mismatch}",
        )


# --------------------------------------------------------------------------- memory estimate


def _bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) module output."""
    value = unwrap_model_output(value)
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    return 0


def _leaf_outputs(probe: Probe) -> Iterator[int]:
    for name, module in probe.model.named_modules():
        if next(module.children(), None) is None and name in probe.outputs:
            yield _bytes(probe.outputs[name])


def _param_bytes(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def estimate_memory(
    config: RunConfig,
    student: Probe,
    teacher: Probe | None,
    learned: list[nn.Parameter],
) -> MemoryEstimate:
    """Bytes one GPU needs for a training step, from parameter counts and probed output sizes.

    With B = train.batch_size (per GPU) and P = PROBE_BATCH (2), N = trained elements:

    - parameters = Σ numel · element_size over the student's parameters plus the KD losses'
      learned adapters (everything the optimizer trains; fp32 = 4 bytes each);
    - gradients = the same bytes (one gradient per trained element);
    - optimizer_state = adam/adamw: two fp32 states (exp_avg, exp_avg_sq) = 8 · N bytes;
      sgd: 4 · N with momentum > 0, else 0;
    - activations = Σ over the student's leaf modules of their output bytes in the probe,
      × B / P (what autograd keeps for backward: an upper bound, in-place ops and AMP shrink it);
    - logits = bytes of the model output at batch B, × 3 for distill runs (the teacher's logits
      and the two softened log-probabilities of the KD loss), × 1 for train runs (the
      cross-entropy's log-probabilities);
    - teacher = the teacher's parameter bytes (frozen: no gradients, no optimizer state) + its
      largest leaf output × B / P (it runs under no_grad, so about one activation is alive at a
      time) + the teacher outputs the pairs hook (other than the model output) × B / P;
    - per_gpu_bytes = the sum.

    Not included: the CUDA context, allocator fragmentation and library workspaces.
    """
    batch = config.train.batch_size
    scale = batch / PROBE_BATCH
    trained = [p for p in student.model.parameters() if p.requires_grad] + learned
    parameters = _param_bytes(trained)
    elements = sum(p.numel() for p in trained)
    optimizer = config.train.optimizer
    if optimizer.name in ("adam", "adamw"):
        optimizer_state = 2 * 4 * elements
    else:
        optimizer_state = 4 * elements if optimizer.momentum > 0 else 0
    activations = int(sum(_leaf_outputs(student)) * scale)
    logits = int(_bytes(student.outputs.get("")) * scale) * (3 if config.kind == "distill" else 1)
    teacher_bytes = 0
    if teacher is not None:
        hooked = {p.teacher_layer for p in config.distill.pairs} - {""} if config.distill else set()
        teacher_bytes = _param_bytes(teacher.model.parameters())
        teacher_bytes += int(max(_leaf_outputs(teacher), default=0) * scale)
        teacher_bytes += int(sum(_bytes(teacher.outputs.get(n)) for n in hooked) * scale)
    total = parameters * 2 + optimizer_state + activations + logits + teacher_bytes
    return MemoryEstimate(
        per_gpu_bytes=total,
        parameters=parameters,
        gradients=parameters,
        optimizer_state=optimizer_state,
        activations=activations,
        logits=logits,
        teacher=teacher_bytes,
    )
