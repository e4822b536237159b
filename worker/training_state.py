"""What `latest.pt` holds for an exact resume, and how a trainer gets it back.

Everything that moves during training: the weights, optimizer, scheduler, grad scaler and EMA
states, the RNG states, the position (step, epoch, batch index), the best value and last
evaluation so far, and the logging interval in progress; with the config hash and the teacher
fingerprint that `checkpoint.load_latest` checks before a resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kdlab.worker.checkpoint import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from kdlab.worker.trainer import Trainer


def capture_training_state(trainer: Trainer) -> dict[str, Any]:
    t = trainer
    return {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None,
        "ema": t.ema.state_dict() if t.ema is not None else None,
        "rng": capture_rng_state(),
        "global_step": t.global_step,
        "epoch": t.epoch,
        "batch_index": t.batch_index,
        "config_hash": t.config_hash,
        "teacher_fingerprint": t.teacher_fingerprint,
        "best_value": t.best_value,
        "final_student_acc": t.final_student_acc,
        "eval_step": t.eval_step,
        "interval": {k: float(v) for k, v in t._acc.items()},
        "interval_steps": t._acc_steps,
        "lr": t._lr,
    }


def restore_training_state(trainer: Trainer, state: dict[str, Any]) -> None:
    """Put `state` (from `capture_training_state`) back into a set-up trainer."""
    t = trainer
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] is not None:
        t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None and state["ema"] is not None:
        t.ema.load_state_dict(state["ema"])
    t.global_step = state["global_step"]
    t.epoch = state["epoch"]
    t.batch_index = state["batch_index"]
    t.best_value = state["best_value"]
    t.final_student_acc = state["final_student_acc"]
    t.eval_step = state["eval_step"]
    t._acc = {k: torch.tensor(v, device=t.device) for k, v in state["interval"].items()}
    t._acc_steps = state["interval_steps"]
    t._lr = state["lr"]
    restore_rng_state(state["rng"])
