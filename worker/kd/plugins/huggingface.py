"""Hugging Face transformers: losses see `output.logits`, not the `ModelOutput` wrapper."""

from __future__ import annotations

from typing import Any

import torch


def unwrap_model_output(output: Any) -> Any:
    """`ModelOutput(logits=...)` → the logits tensor; anything else unchanged.

    Duck-typed (no transformers import): a mapping with a tensor `logits` attribute.
    """
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor) and hasattr(output, "keys"):
        return logits
    return output
