"""Refusals during training, each naming what went wrong and what to try: a batch without a
single label, a non-finite train metric."""

from __future__ import annotations

import math

from kdlab.worker.kd.losses import IGNORE_INDEX


def check_labels(labelled: bool, batch_index: int, epoch: int, step: int) -> None:
    """Refuse a batch without a single label (`BatchSource` checked it on the host); `step` is
    the 1-based step it would have been."""
    if not labelled:
        raise ValueError(
            f"batch {batch_index} of epoch {epoch} (step {step}) has "
            f"no labelled samples or tokens: every label is {IGNORE_INDEX} (ignored), so the "
            "student loss is undefined. Check the dataset's labels, or use longer sequences / "
            "larger batches"
        )


def check_finite(metrics: dict[str, float], step: int, interval_steps: int, amp: str) -> None:
    """Name the first non-finite term, KD terms first (a NaN there spreads to the totals)."""
    for key in sorted(metrics, key=lambda k: not k.startswith("train/kd/")):
        value = metrics[key]
        if math.isfinite(value):
            continue
        kind = "NaN" if math.isnan(value) else "Inf"
        amp_hint = ", or use amp 'bf16' instead of 'fp16'" if amp == "fp16" else ""
        raise ValueError(
            f"{kind} in {key} at step {step} (the mean of the "
            f"{interval_steps} steps since the last log); "
            "lower the learning rate, clip gradients (train.grad_clip), or check the data and "
            f"the teacher{amp_hint}"
        )
