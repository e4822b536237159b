"""The catalog as the API serves it, and model probes (layer trees, output shapes).

Models are built on the meta device (no memory, no compute) and probed with a zero batch of 2;
a forward that cannot run on meta tensors is tried with fake tensors (also free), and only then
run for real on the CPU (see `probe_model`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn
from torch.func import functional_call

from backend.errors import Invalid, NotFound
from backend.json_depth import too_deep, too_deep_error
from backend.schemas.catalog import Catalog, CatalogItem, Layer, LossItem, LossParam
from worker import catalog
from worker.config import DatasetSpec, ModelSpec, run_config_json_schema, unknown_name
from worker.kd.loss_balancers import BALANCERS
from worker.kd.losses import LOSSES, KDLoss, loss_parameters
from worker.kd.plugins.huggingface import unwrap_model_output
from worker.kd.probe import (
    OUTPUT,
    Deadline,
    ProbeLimit,
    capture_outputs,
    check_deadline,
    deadline_scope,
    probe_outputs,
)

PROBE_BATCH = 2
CPU_PROBE_MAX_PARAMS = 50_000_000  # larger models are probed uninitialised (see probe_model)
# The probe's size and time box (a dry run answers in seconds, whatever the config asks for):
PROBE_MAX_MODULES = 5_000  # named modules of one model (a 64-block gpt2 has under 1,000)
PROBE_MAX_PARAMS = 10_000_000_000  # parameters of one model probed on meta/fake tensors (free)
# a model whose meta and fake probes both fail is run for real on the CPU: at most this many
# parameters (4 GB in fp32), so a dry run cannot exhaust the server's memory
CPU_FORWARD_MAX_PARAMS = 1_000_000_000
PROBE_TIME_LIMIT_S = 30.0  # one dry run: every model built and probed within this

Loc = list[str | int]


def pydantic_errors(err: ValidationError, prefix: Iterable[str | int]) -> list[dict[str, Any]]:
    """A ValidationError as FastAPI's 422 list, each `loc` under `prefix` (e.g. "body")."""
    errors = []
    for e in err.errors(include_url=False, include_input=False, include_context=False):
        msg = e["msg"].removeprefix("Value error, ") if e["type"] == "value_error" else e["msg"]
        errors.append({"type": e["type"], "loc": [*prefix, *e["loc"]], "msg": msg})
    return errors


# --------------------------------------------------------------------------- GET /api/catalog


def _first_line(text: str | None, fallback: str) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0].strip() if lines else fallback


def _items(group: catalog.Group, names: dict[str, str]) -> dict[str, CatalogItem]:
    items = {}
    for name, description in names.items():
        params = catalog.params_model(group, name)
        schema = params.model_json_schema() if params is not None else None
        items[name] = CatalogItem(description=description, params_schema=schema)
    return items


def _loss_params(cls: type[KDLoss]) -> list[LossParam]:
    params = []
    for p in loss_parameters(cls):
        if p.default is p.empty:
            params.append(LossParam(name=p.name, required=True))
        elif p.default is None or isinstance(p.default, (bool, int, float, str)):
            params.append(LossParam(name=p.name, default=p.default, required=False))
        else:  # a default that is no JSON value (a module, say): show its type
            params.append(LossParam(name=p.name, default=repr(p.default), required=False))
    return params


def catalog_listing() -> Catalog:
    """Models, datasets, losses and balancers a run config may name, and its JSON Schema."""
    losses = {
        name: LossItem(description=_first_line(cls.__doc__, cls.__name__), params=_loss_params(cls))
        for name, cls in LOSSES.items()
    }
    return Catalog(
        models=_items("models", catalog.list_models()),
        datasets=_items("datasets", catalog.list_datasets()),
        losses=losses,
        balancers=list(BALANCERS),
        run_config_schema=run_config_json_schema(),
    )


# --------------------------------------------------------------------------- data info


def data_info(spec: DatasetSpec, seed: int, data_root: Path | None) -> catalog.DataInfo:
    """The dataset's DataInfo without loading its data where the built-in makes that possible.

    digits, the synthetic sets, text_file and cifar10 know their shapes from their params;
    image_folder lists its class folders (no image is decoded); plug-ins are built.
    Raises ValueError/OSError with the dataset's own message.
    """
    from worker import datasets as ds

    owner = f"dataset {spec.name!r}"
    params = dict(spec.params)
    if spec.name == "digits":
        shape = (1, 8, 8) if ds.DigitsParams.parse(params, owner).as_image else (64,)
        return catalog.DataInfo("classification", 10, shape, torch.float32)
    if spec.name == "synthetic_classification":
        sc = ds.SyntheticClassificationParams.parse(params, owner)
        return catalog.DataInfo("classification", sc.n_classes, (sc.n_features,), torch.float32)
    if spec.name == "synthetic_lm":
        lm = ds.SyntheticLMParams.parse(params, owner)
        return catalog.DataInfo("lm", lm.vocab_size, (lm.seq_len,), torch.long)
    if spec.name == "text_file":
        return catalog.DataInfo(
            "lm", 256, (ds.TextFileParams.parse(params, owner).seq_len,), torch.long
        )
    if spec.name == "cifar10":
        ds.Cifar10Params.parse(params, owner)
        return catalog.DataInfo("classification", 10, (3, 32, 32), torch.float32)
    return catalog.build_dataset(spec, seed, data_root).info


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


Transform = Callable[[torch.Tensor], torch.Tensor]


def _fake_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, Any]:
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
        for mode, probe in (("meta", probe_outputs), ("fake", _fake_outputs)):
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


def build_error(err: Exception) -> str:
    """A builder's or probe's exception as one message line."""
    message = str(err).strip() or type(err).__name__
    return (
        message if isinstance(err, (ValueError, TypeError)) else f"{type(err).__name__}: {message}"
    )


# --------------------------------------------------------------------------- layer tree


def _json_object(text: str | None, loc: Loc) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    deep = too_deep(text)  # before json.loads recurses into it
    if deep is not None:
        raise Invalid([too_deep_error(deep, loc)])
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise Invalid.at(loc, f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise Invalid.at(loc, f"must be a JSON object, got {type(value).__name__}")
    return value


def model_layers(
    name: str,
    params: str | None,
    dataset: str,
    dataset_params: str | None,
    data_root: Path | None,
) -> list[Layer]:
    """Every named module of catalog model `name` built for `dataset`, with its output shape.

    `params` and `dataset_params` are JSON objects (query strings). 404 for an unknown model
    name (with close matches); 422 for an unknown dataset, bad params or a model that cannot be
    built for this dataset.
    """
    models = catalog.list_models()
    if name not in models:
        raise NotFound(unknown_name("model", name, models))
    model_params = _json_object(params, ["query", "params"])
    data_params = _json_object(dataset_params, ["query", "dataset_params"])
    errors: list[dict[str, Any]] = []
    try:
        spec = ModelSpec(name=name, params=model_params)
    except ValidationError as err:
        errors += pydantic_errors(err, ["query"])  # ["query", "params", ...]
    try:
        data_spec = DatasetSpec(name=dataset, params=data_params)
    except ValidationError as err:
        for e in pydantic_errors(err, []):
            field, *rest = e["loc"]
            where = ["dataset"] if field == "name" else ["dataset_params", *rest]
            errors.append({**e, "loc": ["query", *where]})
    if errors:
        raise Invalid(errors)
    try:
        info = data_info(data_spec, 0, data_root)
    except (ValueError, OSError, TypeError) as err:
        raise Invalid.at(["query", "dataset_params"], build_error(err)) from None
    try:
        probe = probe_model(spec, info)
    except Exception as err:
        raise Invalid.at(["query", "params"], build_error(err)) from None
    return [
        Layer(
            name=module_name,
            type=type(module).__name__,
            output_shape=probe.shape(module_name),
            params=sum(p.numel() for p in module.parameters()),
        )
        for module_name, module in probe.model.named_modules()
    ]
