"""DistillationModel: the student, with a frozen teacher and KD losses attached through hooks."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdlab.worker.kd.loss_balancers import STUDENT_LOSS_KEY, LossBalancer
from kdlab.worker.kd.plugins.huggingface import unwrap_model_output
from kdlab.worker.kd.probe import OUTPUT, describe_output, display_name, resolve_layer

LayerPair = tuple[str, str]


def pair_key(pair: LayerPair) -> str:
    """Metric-safe name of a layer pair: `<student_layer>~<teacher_layer>`, `""` as `output`."""
    return f"{display_name(pair[0])}~{display_name(pair[1])}"


def _accepted_kwargs(loss: Callable) -> set[str] | None:
    """Keyword names `loss` accepts, or None when it takes `**kwargs`."""
    fn = loss.forward if isinstance(loss, nn.Module) else loss
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


class LayerOutputError(TypeError):
    """A paired layer's output is no tensor but its loss needs one; `role` and `layer` say which."""

    def __init__(self, message: str, role: str, layer: str):
        super().__init__(message)
        self.role = role
        self.layer = layer


def kd_loss_inputs(
    pair: LayerPair, loss: Any, student_out: Any, teacher_out: Any
) -> tuple[Any, Any]:
    """What a pair's loss receives: library output objects unwrapped; a loss that declares
    `expects_tensors` (every built-in KDLoss) gets tensors or LayerOutputError.

    The one rule for the engine (`DistillationModel`) and the dry run (`kdlab.worker.dry_run`).
    """
    student_out, teacher_out = unwrap_model_output(student_out), unwrap_model_output(teacher_out)
    if getattr(loss, "expects_tensors", False):
        for role, layer, out in (
            ("student", pair[0], student_out),
            ("teacher", pair[1], teacher_out),
        ):
            if not isinstance(out, torch.Tensor):
                raise LayerOutputError(
                    f"{role} output of layer {display_name(layer)!r} is a {describe_output(out)}, "
                    f"not a tensor; {type(loss).__name__} needs tensors. Pick a layer whose output "
                    "is a tensor, or write a loss that takes this output.",
                    role,
                    layer,
                )
    return student_out, teacher_out


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class DistillationModel(nn.Module):
    """Placed in front of the student's own class by `kd.convert` (so `isinstance` still holds).

    Calling the model runs the teacher (no grad, eval mode) and then the student, capturing the
    outputs of every paired layer; `compute_kd_loss` turns them into one scalar. The teacher is
    kept outside the module tree: it is never in `state_dict()` or `parameters()`, yet `.to()`
    and friends move it along.
    """

    KD_PREFIX = "_kd_"
    _kd_criterion: nn.ModuleList
    # plain attributes (set with object.__setattr__ so nn.Module does not register them)
    _kd_original_class: type
    _kd_teacher: nn.Module
    _kd_pairs: list[LayerPair]
    _kd_keys: dict[LayerPair, str]
    _kd_losses: dict[str, nn.Module]
    _kd_balancer: LossBalancer | Callable | None
    _kd_teacher_input_adapter: Callable | None
    _kd_only_student: bool
    _kd_student_out: dict[str, Any]
    _kd_teacher_out: dict[str, Any]
    _kd_components: dict[str, torch.Tensor]
    _kd_weighted: dict[str, torch.Tensor]
    _kd_ready: set[str]
    _kd_handles: list[RemovableHandle]
    _kd_loss_kwargs: dict[LayerPair, set[str] | None]

    # ----------------------------------------------------------------- set-up (called by convert)
    def _kd_attach(
        self,
        original_class: type,
        teacher: nn.Module,
        criterion: dict[LayerPair, Callable],
        balancer: LossBalancer | Callable | None,
        teacher_input_adapter: Callable | None,
    ) -> None:
        set_plain = object.__setattr__  # keeps these out of the module tree and state_dict
        set_plain(self, "_kd_original_class", original_class)
        set_plain(self, "_kd_teacher", teacher)
        set_plain(self, "_kd_pairs", list(criterion))
        set_plain(self, "_kd_keys", {pair: pair_key(pair) for pair in criterion})
        set_plain(self, "_kd_balancer", balancer)
        set_plain(self, "_kd_teacher_input_adapter", teacher_input_adapter)
        set_plain(self, "_kd_only_student", False)
        set_plain(self, "_kd_student_out", {})
        set_plain(self, "_kd_teacher_out", {})
        set_plain(self, "_kd_components", {})
        set_plain(self, "_kd_weighted", {})
        set_plain(self, "_kd_ready", set())
        set_plain(self, "_kd_handles", [])
        set_plain(self, "_kd_loss_kwargs", {})
        losses = {}
        for pair, loss in criterion.items():
            losses[self._kd_keys[pair]] = (
                loss if isinstance(loss, nn.Module) else _FunctionLoss(loss)
            )
            self._kd_loss_kwargs[pair] = _accepted_kwargs(loss)
        set_plain(self, "_kd_losses", losses)
        # registered (in pair order) so learned adapters train, move and checkpoint with the student
        self._kd_criterion = nn.ModuleList(losses.values())
        self._kd_register_hooks()
        teacher.requires_grad_(False)
        teacher.eval()

    def _kd_register_hooks(self) -> None:
        for student_layer, teacher_layer in self._kd_pairs:
            if student_layer != OUTPUT:
                self._kd_hook(self, student_layer, self._kd_student_out, "student")
            if teacher_layer != OUTPUT:
                self._kd_hook(self._kd_teacher, teacher_layer, self._kd_teacher_out, "teacher")

    def _kd_hook(self, model: nn.Module, name: str, store: dict[str, Any], role: str) -> None:
        module = resolve_layer(model, name, role)

        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[name] = output

        self._kd_handles.append(module.register_forward_hook(capture))

    def _kd_setup_losses(self, shapes: dict[LayerPair, tuple[Any, Any]], lazy: bool) -> None:
        """Give each loss the output shapes of its pair (validates them, builds adapters)."""
        device, dtype = self._kd_param_placement()
        for pair, (student_out, teacher_out) in shapes.items():
            key = self._kd_keys[pair]
            loss = self._kd_losses[key]
            setup = getattr(loss, "setup", None)
            if key in self._kd_ready or setup is None:
                self._kd_ready.add(key)
                continue
            student_out, teacher_out = self._kd_loss_inputs(pair, loss, student_out, teacher_out)
            before = _param_count(loss)
            setup(student_out.shape, teacher_out.shape)
            loss.to(device=device, dtype=dtype)
            self._kd_ready.add(key)
            if lazy and _param_count(loss) != before:
                raise ValueError(
                    f"criterion[{pair}]: {type(loss).__name__} needs a learned adapter for student "
                    f"shape {tuple(student_out.shape)} vs teacher shape {tuple(teacher_out.shape)}; "
                    "pass example_input=<a batch> to kd.convert so the adapter exists before you "
                    "build the optimizer"
                )

    def _kd_param_placement(self) -> tuple[torch.device | None, torch.dtype | None]:
        for param in self.parameters():
            if param.is_floating_point():
                return param.device, param.dtype
        return None, None

    # ----------------------------------------------------------------------- public properties
    @property
    def teacher_model(self) -> nn.Module:
        """The frozen teacher."""
        return self._kd_teacher

    @property
    def original_class(self) -> type:
        return self._kd_original_class

    @property
    def loss_balancer(self) -> LossBalancer | Callable | None:
        return self._kd_balancer

    @property
    def kd_pairs(self) -> list[LayerPair]:
        return list(self._kd_pairs)

    @property
    def kd_losses(self) -> dict[str, nn.Module]:
        """The loss module of each pair, keyed by `pair_key` (learned adapters live in them)."""
        return dict(self._kd_losses)

    @property
    def kd_loss_components(self) -> dict[str, torch.Tensor]:
        """Raw KD terms of the last `compute_kd_loss`, detached, keyed by `pair_key`."""
        return dict(self._kd_components)

    @property
    def kd_loss_weighted(self) -> dict[str, torch.Tensor]:
        """The same terms after the balancer's weighting, detached."""
        return dict(self._kd_weighted)

    # ------------------------------------------------------------------------- nn.Module hooks
    def train(self, mode: bool = True) -> DistillationModel:
        super().train(mode)
        self._kd_teacher.eval()  # the teacher never leaves eval mode
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> DistillationModel:
        """`.to()`, `.cuda()`, `.half()`… reach the teacher and its input adapter too."""
        super()._apply(fn, recurse)
        self._kd_teacher._apply(fn, recurse)
        adapter = self._kd_teacher_input_adapter
        if isinstance(adapter, nn.Module):
            adapter._apply(fn, recurse)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._kd_only_student:
            return super().forward(*args, **kwargs)
        self._kd_student_out.clear()
        self._kd_teacher_out.clear()
        with torch.no_grad():
            self._kd_teacher_out[OUTPUT] = self._kd_teacher(*self._kd_teacher_args(args), **kwargs)
        output = super().forward(*args, **kwargs)
        self._kd_student_out[OUTPUT] = output
        return output

    def _kd_teacher_args(self, args: tuple) -> tuple:
        adapter = self._kd_teacher_input_adapter
        if adapter is None or not args:
            return args
        return (adapter(args[0]), *args[1:])

    @contextmanager
    def only_student_forward(self) -> Iterator[None]:
        """Within the block, calls run the student alone (no teacher cost, no capture)."""
        previous = self._kd_only_student
        object.__setattr__(self, "_kd_only_student", True)
        try:
            yield
        finally:
            object.__setattr__(self, "_kd_only_student", previous)

    # ------------------------------------------------------------------------------- KD loss
    def compute_kd_loss(
        self,
        student_loss: torch.Tensor | None = None,
        skip_balancer: bool = False,
        **loss_kwargs: Any,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Total loss of the last forward through the balancer (or the raw terms if skipped).

        `loss_kwargs` (e.g. `labels=`) reach every loss that accepts them.
        """
        terms = self._kd_terms(loss_kwargs)
        object.__setattr__(self, "_kd_components", {k: v.detach() for k, v in terms.items()})
        self._kd_student_out.clear()
        self._kd_teacher_out.clear()
        if skip_balancer:
            return terms
        return self._kd_balance(terms, student_loss)

    def _kd_terms(self, loss_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = {pair: self._kd_captured(pair) for pair in self._kd_pairs}
        pending = {p: o for p, o in outputs.items() if self._kd_keys[p] not in self._kd_ready}
        if pending:
            self._kd_setup_losses(pending, lazy=True)
        terms = {}
        for pair, (student_out, teacher_out) in outputs.items():
            loss = self._kd_losses[self._kd_keys[pair]]
            student_out, teacher_out = self._kd_loss_inputs(pair, loss, student_out, teacher_out)
            accepted = self._kd_loss_kwargs[pair]
            kwargs = (
                loss_kwargs
                if accepted is None
                else {k: v for k, v in loss_kwargs.items() if k in accepted}
            )
            terms[self._kd_keys[pair]] = loss(student_out, teacher_out, **kwargs)
        return terms

    def _kd_captured(self, pair: LayerPair) -> tuple[Any, Any]:
        student_layer, teacher_layer = pair
        if student_layer not in self._kd_student_out or teacher_layer not in self._kd_teacher_out:
            raise RuntimeError(
                f"no outputs captured for pair {pair}: call the model on a batch (outside "
                "only_student_forward) before compute_kd_loss, once per compute_kd_loss"
            )
        return self._kd_student_out[student_layer], self._kd_teacher_out[teacher_layer]

    def _kd_loss_inputs(
        self, pair: LayerPair, loss: nn.Module, student_out: Any, teacher_out: Any
    ) -> tuple[Any, Any]:
        return kd_loss_inputs(pair, loss, student_out, teacher_out)

    def _kd_balance(
        self, terms: dict[str, torch.Tensor], student_loss: torch.Tensor | None
    ) -> torch.Tensor:
        balancer = self._kd_balancer
        if isinstance(balancer, LossBalancer):
            weighted = balancer.weighted_terms(terms, student_loss)
            object.__setattr__(self, "_kd_weighted", {k: v.detach() for k, v in weighted.items()})
            return balancer.combine(weighted, student_loss)
        if balancer is not None:  # any callable taking ModelOpt's loss dict (its key, too)
            loss_dict = (
                dict(terms) if student_loss is None else {STUDENT_LOSS_KEY: student_loss, **terms}
            )
            object.__setattr__(self, "_kd_weighted", {})
            return balancer(loss_dict)
        if student_loss is not None:
            raise ValueError(
                "compute_kd_loss got a student_loss but the model has no balancer to combine it "
                "with the KD term; pass balancer=kd.StaticBalancer(kd_weight=...) to kd.convert"
            )
        (term,) = terms.values()
        object.__setattr__(self, "_kd_weighted", {k: v.detach() for k, v in terms.items()})
        return term

    def check_kd_loss_finite(self) -> None:
        """Raise ValueError naming the first non-finite KD term (one host sync for all terms)."""
        components = self._kd_components
        if not components:
            return
        values = torch.stack([v.float().reshape(()) for v in components.values()])
        if bool(torch.isfinite(values).all()):
            return
        for key, value in components.items():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"NaN in train/kd/{key} (value {float(value)}); lower the learning rate, "
                    "check the inputs, or use amp 'bf16' instead of 'fp16'"
                )

    def describe_kd_loss(self) -> dict[str, Any]:
        """The loss formula in effect: each term, its weight and the student-loss weight."""
        balancer = self._kd_balancer
        weights: dict[str, float] = {}
        if isinstance(balancer, LossBalancer):
            weights = balancer.pair_weights([self._kd_keys[p] for p in self._kd_pairs])
        terms = []
        for pair in self._kd_pairs:
            key = self._kd_keys[pair]
            loss = self._kd_losses[key]
            describe = getattr(loss, "describe", None)
            terms.append(
                {
                    "key": key,
                    "student_layer": pair[0],
                    "teacher_layer": pair[1],
                    "loss": type(loss).__name__,
                    "formula": describe() if callable(describe) else repr(loss),
                    "weight": weights.get(key, 1.0 if balancer is None else None),
                }
            )
        return {
            "terms": terms,
            "balancer": balancer.describe()
            if isinstance(balancer, LossBalancer)
            else repr(balancer),
            "student_loss_weight": balancer.student_weight
            if isinstance(balancer, LossBalancer)
            else None,
        }


class SequentialStudent(nn.Module):
    """Mixed in for `nn.Sequential` students, whose forward runs every entry of `_modules`.

    The KD loss modules live in `_modules` too (so adapters train and move); iteration, `len`
    and indexing see only the student's own layers.
    """

    def _student_items(self) -> list[tuple[str, nn.Module]]:
        prefix = DistillationModel.KD_PREFIX
        return [
            (k, m) for k, m in self._modules.items() if m is not None and not k.startswith(prefix)
        ]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter([m for _, m in self._student_items()])

    def __len__(self) -> int:
        return len(self._student_items())

    def __getitem__(self, idx: int | slice) -> nn.Module:
        items = self._student_items()
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(items[idx]))
        return items[idx][1]


class _FunctionLoss(nn.Module):
    """Wraps a plain function loss so every criterion entry is a module."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, student_out: Any, teacher_out: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(student_out, teacher_out, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))
