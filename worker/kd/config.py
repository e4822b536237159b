"""The ModelOpt-shaped configuration: `mode=[("kd_loss", {...})]`."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

KD_LOSS_MODE = "kd_loss"


@dataclass
class KDLossConfig:
    """Everything `kd.convert` needs besides the student (ModelOpt's key names)."""

    teacher_model: Any = None
    criterion: Any = None
    loss_balancer: Callable | None = None
    teacher_input_adapter: Callable | None = None
    example_input: Any = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> KDLossConfig:
        known = [f.name for f in fields(cls)]
        for key in config:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"kd_loss config: unknown key {key!r}; {hint}known keys: {known}")
        return cls(**config)


def parse_mode(mode: Any) -> KDLossConfig:
    """`[("kd_loss", {...})]` (or the bare `("kd_loss", {...})`) → KDLossConfig."""
    entries = [mode] if isinstance(mode, tuple) else list(mode)
    if len(entries) != 1 or not isinstance(entries[0], tuple) or len(entries[0]) != 2:
        raise ValueError(
            f"mode: expected [('kd_loss', {{...}})], got {mode!r}; "
            "give exactly one ('kd_loss', config_dict) entry"
        )
    name, config = entries[0]
    if name != KD_LOSS_MODE:
        raise ValueError(f"mode: unknown mode {name!r}; the only mode is {KD_LOSS_MODE!r}")
    if not isinstance(config, dict):
        raise TypeError(f"mode: the kd_loss config must be a dict, got {type(config).__name__}")
    return KDLossConfig.from_dict(config)
