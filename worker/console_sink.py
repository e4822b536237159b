"""The metric sink of the console: one progress line per logging interval and per evaluation."""

from __future__ import annotations

import math
from typing import Any

from kdlab.worker.echo import Echo, print_line


class ConsoleSink:
    """Prints one progress line per logging interval and per evaluation."""

    def __init__(self, echo: Echo = print_line):
        self.echo = echo
        self.steps_per_epoch = 0
        self.total_steps = 0

    def log_metadata(self, meta: dict[str, Any]) -> None:
        self.steps_per_epoch = int(meta.get("steps_per_epoch", self.steps_per_epoch))
        self.total_steps = int(meta.get("total_steps", self.total_steps))
        if "loss" in meta:
            self.echo(f"loss: {meta['loss']['formula']}")

    def _where(self, step: int) -> str:
        if step == 0:
            return "before training"
        epoch = math.ceil(step / self.steps_per_epoch) if self.steps_per_epoch else 0
        return f"epoch {epoch} step {step}/{self.total_steps}"

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train/loss_total" in metrics:
            parts = [
                f"{k.removeprefix('train/')} {v:.4f}"
                for k, v in metrics.items()
                if k.startswith("train/") and k not in ("train/lr", "train/grad_norm")
            ]
            parts.append(f"lr {metrics['train/lr']:.2e}")
            if "train/grad_norm" in metrics:
                parts.append(f"grad_norm {metrics['train/grad_norm']:.3f}")
            parts.append(f"{metrics.get('sys/step_time_ms', 0.0):.2f} ms/step")
            self.echo(f"{self._where(step)} | " + " | ".join(parts))
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evals:
            parts = [f"{k.removeprefix('eval/')} {v:.4f}" for k, v in evals.items()]
            self.echo(f"{self._where(step)} | eval | " + " | ".join(parts))

    def close(self) -> None:
        pass
