"""Student checkpoints: safetensors weights with KD Lab's JSON metadata in the header."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kdlab.worker.kd.distillation_model import DistillationModel

FORMAT = "kdlab.student/1"
METADATA_KEY = "kdlab"


def student_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's own weights: a converted model's KD-only entries (loss adapters) dropped."""
    state = model.state_dict()
    if isinstance(model, DistillationModel):
        return {k: v for k, v in state.items() if not k.startswith(DistillationModel.KD_PREFIX)}
    return state


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def fingerprint(model: nn.Module) -> str:
    """sha256 over every state entry (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(student_state_dict(model).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def original_class(model: nn.Module) -> type:
    """The class the student had before `kd.convert`."""
    if isinstance(model, DistillationModel):
        return model.original_class
    return type(model)


def _storage_safe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors that share no storage (safetensors' rule), plus tied-name aliases."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        view = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view in by_view and ptr != 0:
            aliases[name] = by_view[view]
            continue
        by_view[view] = name
        out = tensor.detach().to("cpu").contiguous()
        tensors[name] = out.clone() if ptr in storages and ptr != 0 else out
        storages.add(ptr)
    return tensors, aliases


def save(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the student's weights (no teacher, no loss adapters) and metadata to `path`.

    A converted model's teacher is fingerprinted unless `metadata` already holds
    `teacher_fingerprint` (a trainer computes it once, not at every save).
    """
    metadata = metadata or {}
    tensors, aliases = _storage_safe(student_state_dict(model))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "student_class": _class_path(original_class(model)),
        "torch_version": torch.__version__,
        "aliases": aliases,
    }
    if isinstance(model, DistillationModel):
        meta["kd_loss"] = model.describe_kd_loss()
        if "teacher_fingerprint" not in metadata:
            meta["teacher_fingerprint"] = fingerprint(model.teacher_model)
    meta.update(metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata `kd.save` wrote into the file's header."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if METADATA_KEY not in header:
        raise ValueError(f"{path}: not a KD Lab student file (no {METADATA_KEY!r} metadata)")
    return json.loads(header[METADATA_KEY])


def _aliases(header: dict[str, str]) -> dict[str, str]:
    """Tied names `kd.save` stored once (alias → stored name); {} for a file it did not write."""
    try:
        aliases = json.loads(header[METADATA_KEY]).get("aliases", {})
    except (KeyError, ValueError, AttributeError):
        return {}
    return dict(aliases) if isinstance(aliases, dict) else {}


def _entries(path: str | os.PathLike, read: Callable[[Any, str], Any]) -> dict[str, Any]:
    """`read(file, name)` for every stored tensor, tied names re-attached to their target."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        entries = {key: read(f, key) for key in f.keys()}  # noqa: SIM118 - not a mapping
    for alias, target in _aliases(header).items():
        if target in entries:
            entries[alias] = entries[target]
    return entries


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The saved tensors, tied names re-attached."""
    load_metadata(path)  # refuses a file kd.save did not write
    return _entries(path, lambda f, key: f.get_tensor(key))


def header_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Every name `load_state_dict` would return, with its shape, from the header alone.

    No tensor is read. Works for any safetensors file (one without KD Lab metadata has no
    tied names), so the dry run can check an uploaded teacher without loading it.
    """
    return _entries(path, lambda f, key: list(f.get_slice(key).get_shape()))


def restore(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a `kd.save` file into a fresh instance of the student's original class."""
    meta = load_metadata(path)
    expected = meta.get("student_class")
    actual = _class_path(original_class(model))
    if expected != actual:
        raise TypeError(
            f"{path} holds a {expected} student but got a {actual}; "
            f"build a fresh {expected.rsplit('.', 1)[-1] if expected else 'student'} and restore into it"
        )
    target = model
    state = load_state_dict(path)
    missing, unexpected = target.load_state_dict(state, strict=False)
    if isinstance(model, DistillationModel):
        missing = [k for k in missing if not k.startswith(DistillationModel.KD_PREFIX)]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not fit this {type(model).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}; build the student with the same config it was saved from"
        )
    return model
