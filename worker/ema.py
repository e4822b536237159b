"""An exponential moving average of a model's weights (`train.ema_decay`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's state: floating entries averaged, others copied.

    The decay warms up as min(decay, (1 + t) / (10 + t)) after t updates (TensorFlow's
    `num_updates` rule), so short runs are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        live = model.state_dict()  # detached views of the parameters: in-place updates show
        self.shadow = {k: v.detach().clone() for k, v in live.items()}
        floating = {k for k, v in live.items() if v.is_floating_point()}
        self._float_live = [live[k] for k in live if k in floating]
        self._float_shadow = [self.shadow[k] for k in live if k in floating]
        self._other = [(live[k], self.shadow[k]) for k in live if k not in floating]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._float_live:
            torch._foreach_lerp_(self._float_shadow, self._float_live, 1.0 - decay)
        for live, shadow in self._other:
            shadow.copy_(live)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block, `model` holds the averaged weights."""
        backup = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(backup)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
