"""The catalog: named models and datasets that a run config (and the web form) may pick.

Built-ins live in `kdlab.worker.models` and `kdlab.worker.datasets`. Plug-ins come from the entry-point groups
`kdlab.models` (a callable `(params: dict, info: DataInfo) -> nn.Module`) and `kdlab.datasets`
(a callable `(params: dict, seed: int, val_fraction: float, data_root: Path | None) -> DataBundle`);
a plug-in is only imported when it is built. A plug-in may not shadow a built-in name.

A dataset states its DataInfo from its params without loading its data through `dataset_info`:
a built-in declares an `info` callable `(params: dict, data_root: Path | None) -> DataInfo` in its
CatalogEntry; a plug-in's builder may carry the same callable as its `info` attribute
(`my_builder.info = my_info`). A dataset without one is built (its data loaded) to learn it.

Nothing here takes an import path or a file path from a request: only catalog names and params.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from kdlab.worker.params import Params, unknown_name

if TYPE_CHECKING:
    from kdlab.worker.config import DatasetSpec, ModelSpec

__all__ = [
    "CatalogEntry",
    "DataBundle",
    "DataInfo",
    "build_dataset",
    "build_model",
    "dataset_info",
    "example_input",
    "list_datasets",
    "list_models",
    "params_model",
]

Group = Literal["models", "datasets"]
_BUILTIN_MODULES: dict[Group, str] = {
    "models": "kdlab.worker.models",
    "datasets": "kdlab.worker.datasets",
}
_SINGULAR: dict[Group, str] = {"models": "model", "datasets": "dataset"}


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data. `input_shape` excludes the batch dim."""

    task: Literal["classification", "lm"]
    num_classes: int  # classes, or the vocabulary size of an LM
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype


@dataclass
class DataBundle:
    """Train and validation splits; items are `(x, y)` tensors (LM: y = next tokens, -100 ignored)."""

    train: Dataset
    val: Dataset
    info: DataInfo


@dataclass(frozen=True)
class CatalogEntry:
    """A buildable catalog item: its builder, one-line description and typed params (if known).

    `info` (datasets only): `(params, data_root) -> DataInfo` without loading the data; the
    dry run (`kdlab.worker.dry_run`) uses it, and `dataset_info` falls back to building without it.
    """

    builder: Callable[..., Any]
    description: str
    params: type[Params] | None = None
    info: Callable[[dict[str, Any], Path | None], DataInfo] | None = None

    @classmethod
    def of(
        cls,
        builder: Callable[..., Any],
        params: type[Params],
        info: Callable[[dict[str, Any], Path | None], DataInfo] | None = None,
    ) -> CatalogEntry:
        """A built-in entry, described by the first line of the builder's docstring."""
        description = (builder.__doc__ or builder.__name__).strip().splitlines()[0]
        return cls(builder, description, params, info)


def _call_plugin(entry_point: EntryPoint, *args: Any) -> Any:
    return entry_point.load()(*args)


def _plugins(group: Group, builtins: dict[str, CatalogEntry]) -> dict[str, CatalogEntry]:
    found: dict[str, CatalogEntry] = {}
    for ep in entry_points(group=f"kdlab.{group}"):
        if ep.name in builtins:
            raise ValueError(
                f"plug-in {_SINGULAR[group]} {ep.name!r} ({ep.value}) shadows the built-in of that "
                f"name; rename it in its kdlab.{group} entry point"
            )
        if ep.name in found:
            raise ValueError(f"two kdlab.{group} plug-ins are named {ep.name!r}; rename one")
        found[ep.name] = CatalogEntry(functools.partial(_call_plugin, ep), f"plug-in {ep.value}")
    return found


@functools.lru_cache(maxsize=16)
def _scan(group: Group, search_path: tuple[str, ...]) -> dict[str, CatalogEntry]:
    builtins: dict[str, CatalogEntry] = import_module(_BUILTIN_MODULES[group]).BUILTINS
    return {**builtins, **_plugins(group, builtins)}


def _registry(group: Group) -> dict[str, CatalogEntry]:
    """Built-ins + plug-ins; rescanned when sys.path changes (a process sees later installs
    into an existing path entry after a restart)."""
    return _scan(group, tuple(sys.path))


def _entry(group: Group, name: str) -> CatalogEntry:
    registry = _registry(group)
    if name not in registry:
        raise ValueError(unknown_name(_SINGULAR[group], name, registry))
    return registry[name]


def list_models() -> dict[str, str]:
    """Model name → one-line description, built-ins first, then plug-ins."""
    return {name: entry.description for name, entry in _registry("models").items()}


def list_datasets() -> dict[str, str]:
    """Dataset name → one-line description, built-ins first, then plug-ins."""
    return {name: entry.description for name, entry in _registry("datasets").items()}


def params_model(group: Group, name: str) -> type[Params] | None:
    """The typed params of a catalog entry (its JSON Schema feeds the form); None for plug-ins."""
    return _entry(group, name).params


def build_model(spec: ModelSpec, info: DataInfo) -> nn.Module:
    """A fresh, randomly initialised model whose `forward(x)` returns a logits tensor."""
    model = _entry("models", spec.name).builder(dict(spec.params), info)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec.name!r} built a {type(model).__name__}, not an nn.Module")
    return model


def build_dataset(spec: DatasetSpec, seed: int, data_root: Path | None = None) -> DataBundle:
    """The dataset's train/val split (deterministic in `seed` and `spec.val_fraction`)."""
    builder = _entry("datasets", spec.name).builder
    bundle = builder(dict(spec.params), seed, spec.val_fraction, data_root)
    if not isinstance(bundle, DataBundle):
        raise TypeError(f"dataset {spec.name!r} built a {type(bundle).__name__}, not a DataBundle")
    return bundle


def _declared_info(entry: CatalogEntry) -> Callable[..., DataInfo] | None:
    if entry.info is not None:
        return entry.info
    if isinstance(entry.builder, functools.partial) and entry.builder.func is _call_plugin:
        declared = getattr(entry.builder.args[0].load(), "info", None)  # a plug-in's `info`
        return declared if callable(declared) else None
    return None


def dataset_info(spec: DatasetSpec, seed: int, data_root: Path | None = None) -> DataInfo:
    """The dataset's DataInfo: from the info it declares (its data not loaded), else built.

    Raises the dataset's own error (ValueError for bad params, OSError for missing files).
    """
    declared = _declared_info(_entry("datasets", spec.name))
    if declared is None:
        return build_dataset(spec, seed, data_root).info
    info = declared(dict(spec.params), data_root)
    if not isinstance(info, DataInfo):
        raise TypeError(f"dataset {spec.name!r} declared a {type(info).__name__}, not a DataInfo")
    return info


def example_input(info: DataInfo, batch_size: int = 2) -> torch.Tensor:
    """A zero batch of the data's input shape and dtype (for probes; draws no random numbers)."""
    return torch.zeros((batch_size, *info.input_shape), dtype=info.input_dtype)
