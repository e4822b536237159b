"""The catalog as the API serves it, and layer trees (output shapes).

The probes themselves are the worker's dry run (`kdlab.worker.dry_run.probe_model`: meta device, then
fake tensors, then one CPU forward); this module maps its answers to JSON and HTTP errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdlab.backend.errors import Invalid, NotFound
from kdlab.backend.json_depth import too_deep, too_deep_error
from kdlab.backend.schemas.catalog import Catalog, CatalogItem, Layer, LossItem, LossParam
from kdlab.worker import catalog
from kdlab.worker.config import DatasetSpec, ModelSpec, run_config_json_schema, unknown_name
from kdlab.worker.dry_run import PROBE_TIME_LIMIT_S, build_error, probe_model
from kdlab.worker.kd.loss_balancers import BALANCERS
from kdlab.worker.kd.losses import LOSSES, KDLoss, loss_parameters
from kdlab.worker.kd.probe import Deadline

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
        info = catalog.dataset_info(data_spec, 0, data_root)
    except (ValueError, OSError, TypeError) as err:
        raise Invalid.at(["query", "dataset_params"], build_error(err)) from None
    try:
        probe = probe_model(spec, info, deadline=Deadline.after(PROBE_TIME_LIMIT_S))
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
