"""What the trainer would do with a run config, answered without training (the dry run).

One home for every check the API's `POST /api/runs/validate` and layer tree make, each through
the code path the trainer itself runs:

- the dataset's DataInfo, as the catalog entry declares it (`catalog.dataset_info`; no data
  loaded where the entry declares its info, see worker/catalog.py);
- each model built and probed (`probe_model`): on the meta device, then with fake tensors,
  then with one CPU forward, inside a size and time box;
- the teacher input adapter built from its config params (`build_teacher_adapter`, the one
  the trainer builds) and tried on a zero batch;
- each pair's layers (`resolve_layer`), the outputs its loss receives (`kd_loss_inputs`, the
  rule DistillationModel applies) and the loss's `setup` on the probed shapes;
- teacher weights against the teacher (`shape_mismatch` over `kd.serialization.header_shapes`);
- the loss formula the run would optimise (`loss_formula_text`, what the trainer records).

Answers are `Problem`s: a location in the config (`("distill", "pairs", 0, "loss")`) and a
message. The backend only maps them to JSON paths and HTTP errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from kdlab.worker import catalog
from kdlab.worker.config import DatasetSpec, DistillSpec, ModelSpec, RunConfig
from kdlab.worker.kd.adapters import NormalizationAdapter
from kdlab.worker.kd.distillation_model import LayerOutputError, kd_loss_inputs
from kdlab.worker.kd.losses import build_loss
from kdlab.worker.kd.plugins.huggingface import unwrap_model_output
from kdlab.worker.kd.probe import (
    OUTPUT,
    Deadline,
    ProbeLimit,
    capture_outputs,
    check_deadline,
    deadline_scope,
    probe_outputs,
    resolve_layer,
)
from kdlab.worker.loss_formula import describe_from_config, loss_formula

PROBE_BATCH = 2
CPU_PROBE_MAX_PARAMS = 50_000_000  # larger models are probed uninitialised (see probe_model)
# The probe's size and time box (a dry run answers in seconds, whatever the config asks for):
PROBE_MAX_MODULES = 5_000  # named modules of one model (a 64-block gpt2 has under 1,000)
PROBE_MAX_PARAMS = 10_000_000_000  # parameters of one model probed on meta/fake tensors (free)
# a model whose meta and fake probes both fail is run for real on the CPU: at most this many
# parameters (4 GB in fp32), so a dry run cannot exhaust the server's memory
CPU_FORWARD_MAX_PARAMS = 1_000_000_000
PROBE_TIME_LIMIT_S = 30.0  # one dry run: every model built and probed within this

Loc = tuple[str | int, ...]
Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """Why the trainer would refuse a config: where in the config, and what to change."""

    loc: Loc
    msg: str


class ConfigError(ValueError):
    """A ValueError that names the config field at fault (`loc`)."""

    def __init__(self, loc: Loc, message: str):
        super().__init__(message)
        self.loc = loc


def build_error(err: Exception) -> str:
    """A builder's or probe's exception as one message line."""
    message = str(err).strip() or type(err).__name__
    return (
        message if isinstance(err, (ValueError, TypeError)) else f"{type(err).__name__}: {message}"
    )


# --------------------------------------------------------------------------- probes


@dataclass
class Probe:
    """A built model and the raw outputs of its modules for a zero batch of PROBE_BATCH."""

    model: nn.Module
    outputs: dict[str, Any]
    mode: Literal["meta", "fake", "cpu"]  # how the forward ran (see probe_model)

    def tensor(self, name: str) -> torch.Tensor | None:
        out = unwrap_model_output(self.outputs.get(name))
        return out if isinstance(out, torch.Tensor) else None

    def shape(self, name: str) -> list[int] | None:
        out = self.tensor(name)
        return list(out.shape) if out is not None else None


def fake_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, Any]:
    """Like `probe_outputs`, with FakeTensors on the CPU instead of meta tensors.

    Libraries skip their data-dependent checks for fake tensors (transformers treats them as
    tracing), so e.g. GPT-2, whose mask code reads values on meta, probes here for free.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    hooked = [n for n in names if n != OUTPUT]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_outputs(model, hooked) as seen, FakeTensorMode():
            tensors = [*model.named_parameters(), *model.named_buffers()]
            state = {
                k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cpu")
                for k, v in tensors
            }
            fake_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cpu")
            out = functional_call(model, state, (fake_x,), strict=False)
            result = dict(seen)
    finally:
        model.train(was_training)
    if OUTPUT in names:
        result[OUTPUT] = out
    return result


def check_probe_size(model: nn.Module) -> None:
    """ProbeLimit when `model` has more modules or parameters than the probe handles."""
    modules = sum(1 for _ in model.modules())
    if modules > PROBE_MAX_MODULES:
        raise ProbeLimit(
            f"{modules} layers (modules); the probe handles at most {PROBE_MAX_MODULES}: "
            "use fewer layers"
        )
    params = sum(p.numel() for p in model.parameters())
    if params > PROBE_MAX_PARAMS:
        raise ProbeLimit(
            f"{params:,} parameters; the probe handles at most {PROBE_MAX_PARAMS:,}: "
            "use a smaller model"
        )


def probe_model(
    spec: ModelSpec,
    info: catalog.DataInfo,
    input_transform: Transform | None = None,
    deadline: Deadline | None = None,
) -> Probe:
    """Build `spec` for `info` and record every named module's output, as cheaply as possible.

    1. built on the meta device, probed with meta tensors (no memory, no compute);
    2. if that forward fails (data-dependent code), probed with fake tensors (also free);
    3. else one real forward on the CPU: the model built for real when it has at most
       CPU_PROBE_MAX_PARAMS parameters, otherwise materialised without initialisation
       (`to_empty`; the probe needs shapes, not values).
    `input_transform` (e.g. a teacher input adapter) is applied to the zero batch first.
    Errors of the builder or the forward pass propagate with their own message.

    Size and time box: a model with more than PROBE_MAX_MODULES modules or PROBE_MAX_PARAMS
    parameters is refused before its forward, and the probe stops at `deadline` (default:
    PROBE_TIME_LIMIT_S from now; checked at every module's forward), both with ProbeLimit.
    """
    with deadline_scope(deadline or Deadline.after(PROBE_TIME_LIMIT_S)):
        return _probe_model(spec, info, input_transform)


def _probe_model(
    spec: ModelSpec, info: catalog.DataInfo, input_transform: Transform | None
) -> Probe:
    x = catalog.example_input(info, PROBE_BATCH)
    if input_transform is not None:
        x = input_transform(x)
    meta_model: nn.Module | None = None
    try:
        with torch.device("meta"):
            meta_model = catalog.build_model(spec, info)
    except Exception:  # a builder that needs real tensors: straight to the CPU
        meta_model = None
    if meta_model is not None:
        check_probe_size(meta_model)
        check_deadline()
        names = [name for name, _ in meta_model.named_modules()]
        for mode, probe in (("meta", probe_outputs), ("fake", fake_outputs)):
            try:
                return Probe(meta_model, probe(meta_model, names, x), mode)  # type: ignore[arg-type]
            except ProbeLimit:
                raise
            except Exception:
                check_deadline()
                continue
    size = sum(p.numel() for p in meta_model.parameters()) if meta_model is not None else 0
    if size > CPU_FORWARD_MAX_PARAMS:
        raise ProbeLimit(
            f"{size:,} parameters, and the model does not run on meta or fake tensors: a real "
            f"forward on the server's CPU handles at most {CPU_FORWARD_MAX_PARAMS:,}"
        )
    if meta_model is not None and size > CPU_PROBE_MAX_PARAMS:
        model = meta_model.to_empty(device="cpu")
    else:
        model = catalog.build_model(spec, info)  # raises the builder's own error
        check_probe_size(model)
    check_deadline()
    names = [name for name, _ in model.named_modules()]
    return Probe(model, probe_outputs(model, names, x), "cpu")


def _probe_role(
    problems: list[Problem],
    role: str,
    spec: ModelSpec,
    dataset: DatasetSpec,
    info: catalog.DataInfo,
    adapter: nn.Module | None,
    deadline: Deadline | None,
) -> Probe | None:
    try:
        return probe_model(spec, info, adapter, deadline)
    except ProbeLimit as err:  # too large or too slow to probe: no params dump, just the limit
        problems.append(Problem((role,), f"{role} {spec.name!r}: {err}"))
    except Exception as err:
        problems.append(
            Problem(
                (role,),
                f"cannot build {role} {spec.name!r} with params {spec.params} for dataset "
                f"{dataset.name!r}: {build_error(err)}",
            )
        )
    return None


# --------------------------------------------------------------------------- teacher adapter

ADAPTER_LOC: Loc = ("distill", "teacher_input_adapter")


def build_teacher_adapter(
    spec: DistillSpec, dataset: DatasetSpec, info: catalog.DataInfo
) -> nn.Module | None:
    """The teacher input adapter of `spec` (None without one), tried on a zero batch of `info`.

    The trainer's adapter: move it to the run's device (`.to(device)`). ConfigError (a
    ValueError) naming `distill.teacher_input_adapter` or its `params` when it cannot serve
    this dataset's inputs.
    """
    adapter_spec = spec.teacher_input_adapter
    if adapter_spec is None:
        return None
    if not info.input_dtype.is_floating_point:
        raise ConfigError(
            ADAPTER_LOC,
            f"the normalization adapter rescales float inputs, but dataset {dataset.name!r} "
            f"gives {info.input_dtype} inputs (token ids); remove teacher_input_adapter",
        )
    params = {  # "normalization", the one kind there is: scalars mean one channel
        k: v if isinstance(v, list) else [v] for k, v in adapter_spec.params.items()
    }
    try:
        adapter = NormalizationAdapter(**params)
        adapter(catalog.example_input(info, PROBE_BATCH))
    except (ValueError, TypeError) as err:
        raise ConfigError(
            (*ADAPTER_LOC, "params"),
            f"{err} (dataset {dataset.name!r} gives inputs of shape [B, "
            f"{', '.join(map(str, info.input_shape))}]; the adapter's channel dim is dim 1)",
        ) from None
    return adapter


# --------------------------------------------------------------------------- pairs


@dataclass
class CheckedPair:
    """A pair whose loss accepted the probed outputs (its learned parts built on meta)."""

    student_layer: str
    teacher_layer: str
    student_out: Any  # what the loss receives (unwrapped)
    teacher_out: Any
    loss: nn.Module


def _layer_output(
    problems: list[Problem], loc: Loc, probe: Probe, layer: str, role: str
) -> tuple[bool, Any]:
    """(found, raw output) of `layer`; a problem when it does not exist or did not run."""
    try:
        resolve_layer(probe.model, layer, role)  # what kd.convert checks first
    except ValueError as err:
        problems.append(Problem((*loc, f"{role}_layer"), str(err)))
        return False, None
    if layer not in probe.outputs:
        problems.append(
            Problem(
                (*loc, f"{role}_layer"),
                f"{role}_layer {layer!r} did not run in the {role}'s forward pass; pick a "
                "module that does",
            )
        )
        return False, None
    return True, probe.outputs[layer]


def check_pairs(
    spec: DistillSpec, student: Probe, teacher: Probe
) -> tuple[list[CheckedPair], list[Problem]]:
    """Each pair as `kd.convert` takes it: layers resolved, the loss's inputs through
    `kd_loss_inputs`, then the loss's `setup` on their shapes (learned adapters on meta)."""
    checked: list[CheckedPair] = []
    problems: list[Problem] = []
    for i, pair in enumerate(spec.pairs):
        loc: Loc = ("distill", "pairs", i)
        s_found, s_raw = _layer_output(problems, loc, student, pair.student_layer, "student")
        t_found, t_raw = _layer_output(problems, loc, teacher, pair.teacher_layer, "teacher")
        if not (s_found and t_found):
            continue
        loss = build_loss(pair.loss.name, pair.loss.params)
        layers = (pair.student_layer, pair.teacher_layer)
        try:
            s_out, t_out = kd_loss_inputs(layers, loss, s_raw, t_raw)
        except LayerOutputError as err:
            problems.append(Problem((*loc, f"{err.role}_layer"), str(err)))
            continue
        setup = getattr(loss, "setup", None)
        if setup is not None:
            try:
                with torch.device("meta"):  # learned adapters cost nothing here
                    setup(s_out.shape, t_out.shape)
            except ValueError as err:
                problems.append(Problem((*loc, "loss"), str(err)))
                continue
        checked.append(CheckedPair(pair.student_layer, pair.teacher_layer, s_out, t_out, loss))
    return checked, problems


# --------------------------------------------------------------------------- weights


def state_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def shape_mismatch(expected: dict[str, list[int]], found: dict[str, list[int]]) -> str | None:
    """What keeps `found` tensors from loading (strictly) into a model with `expected` ones;
    None if they load."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    differ = [
        f"{k} {found[k]} vs {expected[k]}"
        for k in sorted(set(expected) & set(found))
        if expected[k] != found[k]
    ]
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    if differ:
        parts.append(f"shapes differ (weights vs teacher): {'; '.join(differ[:5])}")
    return ", ".join(parts) or None


# --------------------------------------------------------------------------- the whole config


@dataclass
class DryRun:
    """What `dry_run` learned; `problems` empty when the trainer would accept the config
    (teacher weights aside: where they come from is the caller's to check)."""

    info: catalog.DataInfo | None = None
    student: Probe | None = None
    teacher: Probe | None = None
    adapter: nn.Module | None = None
    pairs: list[CheckedPair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def dry_run(
    config: RunConfig, data_root: Path | None, time_limit_s: float = PROBE_TIME_LIMIT_S
) -> DryRun:
    """Everything the trainer's set-up checks, up to its first step, on meta/fake tensors.

    A dataset that cannot be resolved ends the run with that one problem (at `dataset`).
    `time_limit_s` boxes the models' build and probes, counted once the data info is known (a
    dataset built to learn its info does not eat the probes' time).
    """
    result = DryRun()
    try:
        result.info = info = catalog.dataset_info(config.dataset, config.seed, data_root)
    except Exception as err:
        message = f"dataset {config.dataset.name!r}: {build_error(err)}"
        result.problems.append(Problem(("dataset",), message))
        return result
    deadline = Deadline.after(time_limit_s)
    problems = result.problems
    result.student = _probe_role(
        problems, "student", config.student, config.dataset, info, None, deadline
    )
    if config.kind != "distill":
        return result
    assert config.teacher is not None and config.distill is not None
    try:
        result.adapter = build_teacher_adapter(config.distill, config.dataset, info)
    except ConfigError as err:
        problems.append(Problem(err.loc, str(err)))
    result.teacher = _probe_role(
        problems, "teacher", config.teacher, config.dataset, info, result.adapter, deadline
    )
    if result.student is not None and result.teacher is not None:
        result.pairs, pair_problems = check_pairs(config.distill, result.student, result.teacher)
        problems += pair_problems
    return result


def loss_formula_text(config: RunConfig, pair_formulas: list[str]) -> str:
    """The loss formula a run of `config` optimises (the trainer records the same one), from
    each checked pair's loss formula (its `describe()`)."""
    described = describe_from_config(config, pair_formulas) if config.kind == "distill" else None
    return str(loss_formula(config, described)["formula"])
