"""The optimizer side of training: building the optimizer, the LR schedule, the gradient norm."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def build_optimizer(
    params: list[nn.Parameter], spec: Any, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """The optimizer of `spec`. On CUDA, Adam(W) is the fused kernel: one launch for every
    parameter, and with a GradScaler it skips an overflowed step without a host sync."""
    fused = True if device is not None and device.type == "cuda" else None  # None: torch's default
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    raise ValueError(f"train.optimizer.name: unknown optimizer {spec.name!r}")


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, on their device (no host sync). Written out
    because `torch.nn.utils.get_total_norm` only exists from torch 2.6."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def lr_factor(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier at step s: linear warm-up to 1 over `warmup_steps`, then cosine/linear decay
    to 0 at `total_steps` (or constant)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def clip_and_measure_grads(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clip: float | None,
    measure: bool,
) -> torch.Tensor | None:
    """Clip the (unscaled) gradients to norm `clip` when set; their total norm when `measure`
    (detached, on the device), else None. Neither: the gradients are left as they are."""
    if clip is None and not measure:
        return None
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = total_grad_norm([p.grad for p in params if p.grad is not None])
    return norm.detach() if measure else None
