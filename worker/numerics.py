"""How a run's arithmetic is set up: TF32 matmuls, deterministic kernels, the AMP dtype, and the
frozen teacher cast once to that dtype.

`numerics(train, device)` applies a run's choices for the length of `Trainer.fit` and restores the
process's previous settings afterwards, so a library user's own settings survive a run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# cuBLAS reads this when it creates a handle: deterministic GEMMs need a fixed workspace
# (https://docs.nvidia.com/cuda/cublas/#results-reproducibility). A worker process sets it before
# its first CUDA matmul; a process that already ran one must set it itself before starting.
CUBLAS_WORKSPACE = ":4096:8"

# Modules whose weights autocast re-casts to the AMP dtype on every forward (its lower-precision
# op list): casting them once gives bitwise the same outputs at half the memory.
_AUTOCAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of `train.amp` (None for "none")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def _settings() -> dict[str, Any]:
    return {
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def _apply(settings: dict[str, Any]) -> None:
    torch.set_float32_matmul_precision(settings["matmul_precision"])
    torch.backends.cudnn.allow_tf32 = settings["cudnn_allow_tf32"]
    torch.use_deterministic_algorithms(
        settings["deterministic"], warn_only=settings["deterministic_warn_only"]
    )
    torch.backends.cudnn.deterministic = settings["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]


def run_settings(train: Any, device: torch.device) -> dict[str, Any]:
    """The process settings a run with `train` (a `TrainSpec`) on `device` trains under."""
    settings = _settings()
    if device.type == "cuda":  # TF32 is a CUDA (Ampere and newer) matter only
        settings["matmul_precision"] = "high" if train.tf32 else "highest"
        settings["cudnn_allow_tf32"] = bool(train.tf32)
    if train.deterministic:
        settings.update(
            deterministic=True,
            deterministic_warn_only=False,
            cudnn_deterministic=True,
            cudnn_benchmark=False,
        )
    return settings


@contextlib.contextmanager
def numerics(train: Any, device: torch.device) -> Iterator[None]:
    """Within the block, the process computes as `train` asks (TF32, determinism)."""
    previous = _settings()
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    _apply(run_settings(train, device))
    try:
        yield
    finally:
        _apply(previous)


def cast_for_autocast(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the weights autocast would re-cast every forward (Linear and Conv) to `dtype`, once.

    Parameters those modules share with any other module (a tied embedding, say) stay as they
    are: autocast would not cast them for the other module. Returns the number of bytes saved.
    """
    castable: dict[int, nn.Parameter] = {}
    kept: set[int] = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, _AUTOCAST_MODULES):
            castable.update((id(p), p) for p in own)
        else:
            kept.update(id(p) for p in own)
    saved = 0
    for key, param in castable.items():
        if key in kept or not param.is_floating_point() or param.dtype == dtype:
            continue
        before = param.numel() * param.element_size()
        param.data = param.data.to(dtype)
        saved += before - param.numel() * param.element_size()
    return saved
