"""Output shapes of named layers from one forward pass, on the meta device where possible."""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

OUTPUT = ""  # the layer name that means "the model's own output"


class ProbeLimit(ValueError):
    """A probe refused to go on: the model is too large to probe, or it ran past its deadline."""


@dataclass(frozen=True)
class Deadline:
    """When a probe has to give up (`time.monotonic()` seconds) and the budget it was given."""

    at: float
    limit_s: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def check(self) -> None:
        if time.monotonic() >= self.at:
            raise ProbeLimit(
                f"the dry run took longer than {self.limit_s:g} s; the model is too large or "
                "too slow to probe here (use fewer or smaller layers)"
            )


_DEADLINE: ContextVar[Deadline | None] = ContextVar("kdlab_probe_deadline", default=None)


@contextmanager
def deadline_scope(deadline: Deadline | None) -> Iterator[None]:
    """Within the block, `check_deadline()` (and every hook of `capture_outputs`) raises
    ProbeLimit once `deadline` has passed."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_deadline() -> None:
    """Raise ProbeLimit if the enclosing `deadline_scope` has run out (no-op outside one)."""
    deadline = _DEADLINE.get()
    if deadline is not None:
        deadline.check()


def display_name(layer: str) -> str:
    """How a layer name appears in metric keys and messages (`""` is the model output)."""
    return layer or "output"


def resolve_layer(model: nn.Module, name: str, role: str) -> nn.Module:
    """The submodule called `name`, or a ValueError naming close matches."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"{role}_layer {name!r}: no such module in the {role} ({type(model).__name__}){hint} "
        f"Use a name from {role}.named_modules(), or '' for the model output."
    )


@contextmanager
def capture_outputs(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Within the block, forward passes record the raw outputs of the named layers."""
    captured: dict[str, Any] = {}
    handles = []
    modules = dict(model.named_modules())  # once: a lookup per name made probes quadratic
    for name in set(names):
        module = modules[name] if name in modules else resolve_layer(model, name, "model")

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            check_deadline()  # a forward through many modules stops at the deadline
            captured[name] = out

        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _on_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_on_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_meta(v) for k, v in value.items()}
    return value


def _meta_forward(model: nn.Module, example_input: Any) -> Any:
    state = {
        k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()
    }
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    return functional_call(model, state, _on_meta(args), strict=False)


def _real_forward(model: nn.Module, example_input: Any) -> Any:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    return model(*args)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def probe_outputs(model: nn.Module, names: Iterable[str], example_input: Any) -> dict[str, Any]:
    """Raw outputs (meta tensors where possible) of `names` for `example_input`.

    The meta pass costs no memory or compute; models whose forward cannot run on meta tensors
    (data-dependent control flow, ops without meta kernels) fall back to one real forward.
    """
    names = list(names)
    hooked = [n for n in names if n != OUTPUT]
    with torch.no_grad(), _eval_mode(model), capture_outputs(model, hooked) as seen:
        try:
            out = _meta_forward(model, example_input)
        except ProbeLimit:
            raise
        except Exception:  # any op without a meta kernel: pay for one real forward instead
            check_deadline()
            seen.clear()
            out = _real_forward(model, example_input)
        result = dict(seen)
    if OUTPUT in names:
        result[OUTPUT] = out
    return result


def describe_output(output: Any) -> str:
    """A short description of a non-tensor output, for error messages."""
    if isinstance(output, (tuple, list)):
        inner = ", ".join(describe_output(o) for o in output[:4])
        return (
            f"{type(output).__name__} of {len(output)} ({inner}{', …' if len(output) > 4 else ''})"
        )
    if isinstance(output, dict):
        return f"{type(output).__name__} with keys {list(output)[:6]}"
    if isinstance(output, torch.Tensor):
        return f"Tensor{tuple(output.shape)}"
    return type(output).__name__
