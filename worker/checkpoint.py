"""Resumable training state (`latest.pt`) and the RNG / config helpers around it.

`latest.pt` holds everything an exact resume needs: model (student + loss adapters), optimizer,
scheduler, grad scaler, EMA, the RNG states of python/numpy/torch/cuda, and the data position
(epoch, batch index within the epoch). Every value in it is a tensor, a number, a string or a
container of those (the numpy RNG state is stored as a tensor), so it loads with
`torch.load(weights_only=True)`: no pickled code runs when a checkpoint is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "kdlab.latest/1"


def config_hash(config_json: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON (sorted keys)."""
    canonical = json.dumps(config_json, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def capture_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        restore_cuda_rng(state["cuda"], torch.cuda.device_count(), torch.cuda.set_rng_state)


def restore_cuda_rng(
    saved: list[torch.Tensor], visible: int, set_state: Callable[[torch.Tensor, int], None]
) -> int:
    """Give each visible CUDA device the state saved for the device of the same index.

    A resume may see fewer GPUs than the save did (`get_rng_state_all` saved one state per GPU
    then): the devices it has get theirs, the missing ones' states are not needed. A device
    with no saved state keeps its seed. Returns how many devices were restored.
    """
    restored = min(len(saved), visible)
    for index in range(restored):
        set_state(saved[index], index)
    return restored


def save_latest(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` atomically: a crash mid-write leaves the previous `latest.pt` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_latest(
    path: str | os.PathLike,
    teacher_fingerprint: str | None,
    config_digest: str | None = None,
) -> dict[str, Any]:
    """Read `latest.pt` onto the CPU, refusing one written against another teacher or config."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a KD Lab training checkpoint ({FORMAT})")
    saved_fp = state.get("teacher_fingerprint")
    if saved_fp != teacher_fingerprint:
        raise ValueError(
            f"{path}: checkpoint was trained against teacher {saved_fp}, this run's teacher is "
            f"{teacher_fingerprint}; resume with the same teacher weights or start a new run"
        )
    if config_digest is not None and state.get("config_hash") != config_digest:
        raise ValueError(
            f"{path}: checkpoint was written for config {state.get('config_hash')}, this run's "
            f"config is {config_digest}; an exact resume needs the same config (start a new run "
            "to change it)"
        )
    return state
