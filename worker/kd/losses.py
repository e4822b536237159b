"""Knowledge-distillation losses of the KD engine (``kd.losses``).

Every loss is called as ``loss(student_out, teacher_out, **kwargs)`` (student first) and returns a
float32 scalar. Keyword arguments a loss does not use (e.g. ``labels=`` for a feature loss) are
ignored, so one ``compute_kd_loss(labels=y)`` call can feed every pair. The teacher output is a
constant target: it is detached, so no gradient ever reaches the teacher. Losses with learned parts
(adapters, MGD's generator) build them in ``setup`` from the probed shapes, so they exist right after
``kd.convert`` and an optimizer built then trains them.

Conventions: "batchmean over positions" means the per-position KL (summed over the class dim) is
averaged over every leading position, i.e. over tokens for ``[B, L, V]`` LM logits (divided by
B·L); with ``labels=`` positions whose label is -100 are left out and the mean is over the rest.
"""

from __future__ import annotations

import abc
import difflib
import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.worker.kd.adapters_auto import build_auto_adapter

IGNORE_INDEX = -100
_BATCHMEAN = "batchmean over positions (all leading dims; label -100 excluded when labels= given)"
T2Scaling = Literal["always", "never", "switchable"]  # `KDLoss.t2_scaling`

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "AttentionTransfer",
    "CosineLoss",
    "DKDLoss",
    "FeatureMSE",
    "GeneralizedJSD",
    "KDLoss",
    "LogitsKL",
    "MFTLoss",
    "MGDLoss",
    "build_loss",
    "kl_div_last",
    "log_probs",
    "loss_parameters",
]


# --------------------------------------------------------------------------- parameter checks


def _fmt(value: float) -> str:
    """Compact number for formulas: 4.0 -> '4', 2e-05 -> '2e-05'."""
    return f"{value:g}"


def _check_number(
    owner: str,
    name: str,
    value: object,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    hint: str = "",
) -> float:
    """Return `value` as a float or raise ValueError naming the parameter, its bounds and the fix."""
    bounds = [
        f"{op} {_fmt(b)}"
        for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le))
        if b is not None
    ]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        x = float(value)  # type: ignore[arg-type]
        ok = (
            math.isfinite(x)
            and (gt is None or x > gt)
            and (ge is None or x >= ge)
            and (lt is None or x < lt)
            and (le is None or x <= le)
        )
    if not ok:
        need = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(
            f"{owner}: {name} must be {need} (got {value!r}){'; ' + hint if hint else ''}"
        )
    return float(value)  # type: ignore[arg-type]


def _check_temperature(owner: str, value: object) -> float:
    return _check_number(
        owner, "temperature", value, gt=0, hint="use 1.0 for the plain softmax, or 2-8 to soften"
    )


def _check_bool(owner: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be True or False (got {value!r})")
    return value


def _check_int(owner: str, name: str, value: object, *, ge: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < ge:
        raise ValueError(f"{owner}: {name} must be an integer >= {ge} (got {value!r})")
    return int(value)


# --------------------------------------------------------------------------- tensor checks


def _shape_str(shape: Sequence[int]) -> str:
    return str(list(shape))


def _require_tensors(owner: str, student_out: object, teacher_out: object) -> None:
    for role, value in (("student", student_out), ("teacher", teacher_out)):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{owner} expects tensors, but the {role} output is {type(value).__name__}; "
                "pick a layer whose output is a tensor, or wrap the model so it returns one"
            )


def _require_same_shape(
    owner: str, student: Sequence[int], teacher: Sequence[int], fix: str
) -> None:
    if tuple(student) != tuple(teacher):
        raise ValueError(
            f"{owner}: student shape {_shape_str(student)} and teacher shape "
            f"{_shape_str(teacher)} differ; {fix}"
        )


def _check_labels(
    owner: str, labels: object, positions: Sequence[int], required: bool
) -> Tensor | None:
    """Validate `labels=` against the logits' leading shape; None when absent and optional."""
    if labels is None:
        if required:
            raise ValueError(
                f"{owner} needs labels=: pass the targets to the loss, e.g. "
                "dm.compute_kd_loss(student_loss=ce, labels=y) (-100 marks ignored positions)"
            )
        return None
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        what = f"a {labels.dtype} tensor" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{owner}: labels= must be an integer tensor (got {what})")
    if tuple(labels.shape) != tuple(positions):
        raise ValueError(
            f"{owner}: labels shape {_shape_str(labels.shape)} must equal the logits shape without "
            f"its last (class) dim, {_shape_str(positions)}"
        )
    return labels


# --------------------------------------------------------------------------- shared math


def _kl_sum_last(target_log: Tensor, input_log: Tensor) -> Tensor:
    """Σ_last p·(target_log − input_log), 0 where p = exp(target_log) is 0; no autograd graph needed.

    Same numbers as ``(p * where(p > 0, target_log - input_log, 0)).sum(-1)`` (NaN inputs too), built
    in place so only p, the product and a bool mask are alive at once.
    """
    target = target_log.exp()
    terms = torch.sub(target_log, input_log)
    terms = terms.to(torch.promote_types(terms.dtype, target.dtype))  # autocast: exp may be fp32
    terms.mul_(target)
    terms.masked_fill_(target == 0, 0.0)
    del target
    return terms.sum(dim=-1)


class _KLDivLast(torch.autograd.Function):
    """KL(exp(target_log) ‖ exp(input_log)) summed over the last dim, with a hand-written backward.

    Autograd saves only the two inputs. They are log-probabilities that the log_softmax producing
    them already keeps for its own backward, so in the usual ``kl_div_last(log_softmax(t),
    log_softmax(s))`` no [..., V] tensor is stored beyond those (the composite formula also stored
    exp(target), the masked difference and the bool mask). Backward recomputes p = exp(target_log):
    d/d input_log = −g·p and d/d target_log = g·p·(target_log − input_log + 1), both 0 where p = 0,
    which is exactly the gradient of the composite formula (0·log 0 = 0, finite when
    target_log = −inf). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, target_log: Tensor, input_log: Tensor) -> Tensor:
        ctx.save_for_backward(target_log, input_log)
        return _kl_sum_last(target_log, input_log)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        target_log, input_log = ctx.saved_tensors
        need_target, need_input = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad.unsqueeze(-1)
        target = target_log.to(g.dtype).exp()
        grad_target = None
        if need_target:
            diff = torch.sub(target_log.to(g.dtype), input_log.to(g.dtype)).add_(1.0)
            diff.mul_(target).masked_fill_(target == 0, 0.0).mul_(g)
            grad_target = diff.to(target_log.dtype)
        grad_input = target.mul_(g).neg_().to(input_log.dtype) if need_input else None
        return grad_target, grad_input


def kl_div_last(target_log: Tensor, input_log: Tensor) -> Tensor:
    """KL(target ‖ input) summed over the last dim, from log-probabilities; 0·log 0 counts as 0.

    Same values and gradients as ``(p · where(p > 0, target_log − input_log, 0)).sum(-1)`` with
    p = exp(target_log), but autograd keeps only the inputs (see `_KLDivLast`).
    """
    if target_log.shape != input_log.shape:
        target_log, input_log = torch.broadcast_tensors(target_log, input_log)
    if not (target_log.requires_grad or input_log.requires_grad) or not torch.is_grad_enabled():
        return _kl_sum_last(target_log, input_log)
    out: Tensor = _KLDivLast.apply(target_log, input_log)
    return out


def _masked_batchmean(per_position: Tensor, labels: Tensor | None) -> Tensor:
    """Mean over all positions, or over positions whose label is not -100 (0 if there are none)."""
    if labels is None:
        return per_position.mean()
    keep = labels != IGNORE_INDEX
    total = torch.where(keep, per_position, torch.zeros_like(per_position)).sum()
    return total / keep.sum().clamp_min(1).to(total.dtype)


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T) over the last dim, in float32 (every KL here starts from it)."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _safe_targets(labels: Tensor, fallback: Tensor) -> Tensor:
    """Labels usable as indices: ignored (-100) positions take `fallback`'s index."""
    return torch.where(labels == IGNORE_INDEX, fallback, labels.to(fallback.dtype))


# --------------------------------------------------------------------------- base classes


class KDLoss(nn.Module, abc.ABC):
    """Base of the engine's losses: ``forward(student_out, teacher_out, **kwargs) -> scalar``.

    Each loss declares ``t2_scaling``, its T² convention: "always" (multiplies by T²), "never"
    (no T² factor; so every loss without a temperature), "switchable" (multiplies by T² unless
    its ``scale_by_t2`` param is False)."""

    expects_tensors: bool = True
    t2_scaling: ClassVar[T2Scaling]

    def setup(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        """Validate the probed output shapes and build learned parts; the default accepts any."""

    def describe(self) -> str:
        """Exact formula in effect, with the actual numbers."""
        return type(self).__name__

    @abc.abstractmethod
    def forward(self, student_out: Tensor, teacher_out: Tensor, **kwargs: Any) -> Tensor:
        """Scalar loss for one (student, teacher) output pair."""

    @property
    def _name(self) -> str:
        return type(self).__name__


class _LogitsLoss(KDLoss):
    """Shared checks for losses on logits ``[..., classes]``, the class dim last."""

    needs_labels: ClassVar[bool] = False

    def setup(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        _require_same_shape(
            self._name,
            student_shape,
            teacher_shape,
            "distill logits with the same number of classes/vocabulary (last dim) and positions",
        )

    def _inputs(
        self, student_out: object, teacher_out: object, labels: object
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Float32 student logits, detached float32 teacher logits and checked labels."""
        _require_tensors(self._name, student_out, teacher_out)
        assert isinstance(student_out, Tensor) and isinstance(teacher_out, Tensor)
        self.setup(student_out.shape, teacher_out.shape)
        checked = _check_labels(self._name, labels, student_out.shape[:-1], self.needs_labels)
        return student_out.float(), teacher_out.detach().float(), checked


class _AdaptedLoss(KDLoss):
    """Shared adapter handling: ``adapter`` is "auto", None or a user nn.Module (student → teacher)."""

    def __init__(self, adapter: str | nn.Module | None) -> None:
        super().__init__()
        is_auto = isinstance(adapter, str) and adapter == "auto"
        if not (adapter is None or is_auto or isinstance(adapter, nn.Module)):
            raise ValueError(
                f"{self._name}: adapter must be 'auto', None or an nn.Module (got {adapter!r}); "
                "'auto' learns a projection when shapes differ, None requires equal shapes"
            )
        self.auto_adapter = is_auto
        self.adapter: nn.Module | None = adapter if isinstance(adapter, nn.Module) else None

    def setup(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        if self.auto_adapter:
            self.adapter = build_auto_adapter(
                student_shape, teacher_shape, owner=self._name, existing=self.adapter
            )
        elif self.adapter is None:
            _require_same_shape(
                self._name,
                student_shape,
                teacher_shape,
                'pass adapter="auto" to learn a projection, or pick layers with equal shapes',
            )

    def _adapted(self, student_out: object, teacher_out: object) -> tuple[Tensor, Tensor]:
        """(adapter(student), detached teacher), both float32, with equal shapes."""
        _require_tensors(self._name, student_out, teacher_out)
        assert isinstance(student_out, Tensor) and isinstance(teacher_out, Tensor)
        student = student_out if self.adapter is None else self.adapter(student_out)
        if student.shape != teacher_out.shape:
            if self.adapter is not None:
                fix = "the adapter's output must have the teacher's shape"
            elif self.auto_adapter:
                fix = (
                    "no adapter was built: pass example_input= to kd.convert so "
                    'adapter="auto" can build one from the probed shapes'
                )
            else:
                fix = 'pass adapter="auto" to learn a projection, or pick layers with equal shapes'
            where = " (after the adapter)" if self.adapter is not None else ""
            _require_same_shape(self._name + where, student.shape, teacher_out.shape, fix)
        return student.float(), teacher_out.detach().float()

    def _adapter_text(self) -> str:
        if self.adapter is not None:
            return f"A = {self.adapter!r} (learned)"
        return (
            "A = auto (built at setup when shapes differ; identity now)"
            if self.auto_adapter
            else "A = identity"
        )


# --------------------------------------------------------------------------- logits losses


class LogitsKL(_LogitsLoss):
    """Soft-target distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

    loss = c · mean_positions Σ_v softmax(t/T)_v · (log softmax(t/T)_v − log softmax(s/T)_v),
    i.e. c · KL(softmax(t/T) ‖ softmax(s/T)) over the last dim with c = T² when ``scale_by_t2``
    (keeps gradient magnitudes independent of T) else 1. Reduction "batchmean" over every leading
    position: ``[B, V]`` divides by B, ``[B, L, V]`` by B·L (token level). With ``labels=`` the
    positions labelled -100 are excluded and the mean is over the label-bearing ones. Computed in
    float32; the result is float32.
    """

    t2_scaling: ClassVar[T2Scaling] = "switchable"

    def __init__(self, temperature: float = 1.0, scale_by_t2: bool = True) -> None:
        super().__init__()
        self.temperature = _check_temperature(self._name, temperature)
        self.scale_by_t2 = _check_bool(self._name, "scale_by_t2", scale_by_t2)

    @property
    def factor(self) -> float:
        """The multiplier in effect: T² or 1."""
        return self.temperature**2 if self.scale_by_t2 else 1.0

    def forward(
        self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        student, teacher, labels = self._inputs(student_out, teacher_out, labels)
        kl = kl_div_last(log_probs(teacher, self.temperature), log_probs(student, self.temperature))
        return self.factor * _masked_batchmean(kl, labels)

    def describe(self) -> str:
        t = _fmt(self.temperature)
        return f"{_fmt(self.factor)} · KL(softmax(t/{t}) ‖ softmax(s/{t})), {_BATCHMEAN}"


class MFTLoss(_LogitsLoss):
    """Minifinetuning loss (Belcak et al. 2025, arXiv 2506.15702; ModelOpt's ``MFTLoss``).

    The teacher distribution p = softmax(t/T) is corrected per position towards the label y
    (teacher argmax a): q = (1 − λ)·p + λ·onehot(y) with
    λ = (τ − p_y + p_a) / (1 − p_y + p_a) when a ≠ y (so q_y − q_a = τ exactly), and, when a = y,
    λ = min(τ / (1 − p_y), 1) if ``apply_to_all`` (so q_y = min(p_y + τ, 1)) else 0 (q = p).
    loss = c · KL(q ‖ softmax(s/T)) over the last dim, c = T² when ``scale_by_t2`` else 1,
    "batchmean" over label-bearing positions (label ≠ -100; token level for ``[B, L, V]``).
    Needs ``labels=``. Computed in float32.
    """

    t2_scaling: ClassVar[T2Scaling] = "switchable"

    needs_labels = True

    def __init__(
        self,
        temperature: float = 1.0,
        threshold: float = 0.2,
        apply_to_all: bool = True,
        scale_by_t2: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(self._name, temperature)
        self.threshold = _check_number(
            self._name, "threshold", threshold, gt=0, lt=1, hint="the paper uses 0.2"
        )
        self.apply_to_all = _check_bool(self._name, "apply_to_all", apply_to_all)
        self.scale_by_t2 = _check_bool(self._name, "scale_by_t2", scale_by_t2)

    @property
    def factor(self) -> float:
        """The multiplier in effect: T² or 1."""
        return self.temperature**2 if self.scale_by_t2 else 1.0

    @torch.no_grad()
    def corrected_teacher_probs(self, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        """The corrected teacher distribution q (float32, shape of the logits); -100 rows stay p."""
        checked = _check_labels(self._name, labels, teacher_logits.shape[:-1], required=True)
        assert checked is not None
        p = F.softmax(teacher_logits.detach().float() / self.temperature, dim=-1)
        argmax = p.argmax(dim=-1)
        target = _safe_targets(checked, argmax)
        p_y = p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        p_a = p.gather(-1, argmax.unsqueeze(-1)).squeeze(-1)
        lam_wrong = (self.threshold - p_y + p_a) / (1 - p_y + p_a)
        if self.apply_to_all:
            room = (1 - p_y).clamp_min(torch.finfo(p.dtype).tiny)
            lam_right = (self.threshold / room).clamp(max=1.0)
        else:
            lam_right = torch.zeros_like(p_y)
        lam = torch.where(argmax != target, lam_wrong, lam_right)
        lam = lam.masked_fill(checked == IGNORE_INDEX, 0.0).unsqueeze(-1)
        return ((1 - lam) * p).scatter_add_(-1, target.unsqueeze(-1), lam)

    def forward(
        self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        student, teacher, checked = self._inputs(student_out, teacher_out, labels)
        assert checked is not None
        q = self.corrected_teacher_probs(teacher, checked)
        kl = kl_div_last(q.log(), log_probs(student, self.temperature))
        return self.factor * _masked_batchmean(kl, checked)

    def describe(self) -> str:
        t, tau = _fmt(self.temperature), _fmt(self.threshold)
        right = f"q_y = min(p_y + {tau}, 1)" if self.apply_to_all else "q = p"
        return (
            f"{_fmt(self.factor)} · KL(q ‖ softmax(s/{t})), p = softmax(t/{t}), q = (1−λ)p + λ·onehot(y): "
            f"wrong argmax a → q_y − q_a = {tau}; right argmax → {right}; "
            "batchmean over label-bearing positions (label -100 excluded)"
        )


class DKDLoss(_LogitsLoss):
    """Decoupled KD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"; mdistiller's form).

    With s, t divided by T and y the label: TCKD = KL(b_t ‖ b_s) over the binary distribution
    b = (p_y, 1 − p_y) of softmax; NCKD = KL(softmax(t − 1000·onehot(y)) ‖ softmax(s − 1000·onehot(y)))
    (the target logit masked out so only non-target classes count).
    loss = w · (alpha·TCKD + beta·NCKD) · T², "batchmean" over label-bearing positions, where
    w = min(step / warmup_steps, 1) (1 when warmup_steps = 0) and ``step`` is a persistent buffer
    incremented by every forward in training mode (the current step counts, so the first training
    step already uses 1/warmup_steps; eval reuses the last value). Needs ``labels=``. Float32.
    """

    t2_scaling: ClassVar[T2Scaling] = "always"

    needs_labels = True

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        self.alpha = _check_number(self._name, "alpha", alpha, ge=0, hint="the paper uses 1.0")
        self.beta = _check_number(self._name, "beta", beta, ge=0, hint="the paper uses 1-8")
        self.temperature = _check_temperature(self._name, temperature)
        self.warmup_steps = _check_int(self._name, "warmup_steps", warmup_steps, ge=0)
        self.step: Tensor
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _warmup(self) -> Tensor | float:
        if self.warmup_steps == 0:
            return 1.0
        return (self.step.float() / self.warmup_steps).clamp(max=1.0)

    def forward(
        self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        student, teacher, checked = self._inputs(student_out, teacher_out, labels)
        assert checked is not None
        if student.shape[-1] < 2:
            raise ValueError(
                f"DKDLoss needs at least 2 classes (logits shape {_shape_str(student.shape)})"
            )
        if self.training:
            self.step += 1
        s, t = student / self.temperature, teacher / self.temperature
        target = _safe_targets(checked, torch.zeros_like(checked, dtype=torch.long)).unsqueeze(-1)
        gt = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, target, True)
        tckd = kl_div_last(_binary_log_probs(t, gt, target), _binary_log_probs(s, gt, target))
        nckd = kl_div_last(
            F.log_softmax(t - 1000.0 * gt, dim=-1), F.log_softmax(s - 1000.0 * gt, dim=-1)
        )
        per_position = (self.alpha * tckd + self.beta * nckd) * self.temperature**2
        return self._warmup() * _masked_batchmean(per_position, checked)

    def describe(self) -> str:
        t = _fmt(self.temperature)
        warm = f"min(step/{self.warmup_steps}, 1)" if self.warmup_steps else "1"
        return (
            f"{warm} · ({_fmt(self.alpha)}·TCKD + {_fmt(self.beta)}·NCKD) · {_fmt(self.temperature**2)}, "
            f"TCKD = KL over (target, non-target) of softmax(·/{t}), NCKD = KL(softmax(t/{t} − 1000·y) ‖ "
            f"softmax(s/{t} − 1000·y)), batchmean over label-bearing positions (label -100 excluded)"
        )


def _binary_log_probs(logits: Tensor, gt: Tensor, target: Tensor) -> Tensor:
    """log of (p_target, 1 − p_target) of softmax(logits), computed stably; shape [..., 2]."""
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    log_target = logits.gather(-1, target) - norm
    log_rest = torch.logsumexp(logits.masked_fill(gt, float("-inf")), dim=-1, keepdim=True) - norm
    return torch.cat([log_target, log_rest], dim=-1)


class GeneralizedJSD(_LogitsLoss):
    """Generalized Jensen-Shannon divergence (Agarwal et al., ICLR 2024, GKD; TRL's generalized_jsd_loss).

    With P_t = softmax(t/T), P_s = softmax(s/T) and the mixture M = beta·P_t + (1 − beta)·P_s
    (formed in log space with logsumexp): loss = beta·KL(P_t ‖ M) + (1 − beta)·KL(P_s ‖ M);
    beta = 0 gives KL(P_t ‖ P_s) (forward KL), beta = 1 gives KL(P_s ‖ P_t) (reverse KL).
    No T² factor (TRL's convention). Float32.

    Normalisation ("batchmean" over positions): the per-position divergences (summed over the
    vocabulary, the last dim) are averaged over every leading position, so 3-D logits (B, S, V)
    without ``labels`` give their sum divided by B·S, the number of positions. TRL's
    ``generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py; ``batchmean`` since TRL PR
    #4105) divides that sum by ``jsd.size(0)``, the batch size B, so for 3-D input without labels
    TRL's value is S times this one (a sum over the sequence, averaged over the batch); for 2-D
    (N, V) input both divide by N. With ``labels=`` both divide by the number of positions whose
    label is not -100 (at least 1: 0 when every position is masked), as in LogitsKL.
    """

    t2_scaling: ClassVar[T2Scaling] = "never"

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__()
        self.beta = _check_number(
            self._name,
            "beta",
            beta,
            ge=0,
            le=1,
            hint="0 = KL(teacher‖student), 1 = KL(student‖teacher)",
        )
        self.temperature = _check_temperature(self._name, temperature)

    def forward(
        self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        student, teacher, checked = self._inputs(student_out, teacher_out, labels)
        log_s = log_probs(student, self.temperature)
        log_t = log_probs(teacher, self.temperature)
        if self.beta == 0:
            per_position = kl_div_last(log_t, log_s)
        elif self.beta == 1:
            per_position = kl_div_last(log_s, log_t)
        else:
            log_m = torch.logsumexp(
                torch.stack([log_t + math.log(self.beta), log_s + math.log(1 - self.beta)]), dim=0
            )
            per_position = self.beta * kl_div_last(log_t, log_m) + (1 - self.beta) * kl_div_last(
                log_s, log_m
            )
        return _masked_batchmean(per_position, checked)

    def describe(self) -> str:
        b, t = _fmt(self.beta), _fmt(self.temperature)
        rest = _fmt(1 - self.beta)
        return (
            f"{b}·KL(P_t ‖ M) + {rest}·KL(P_s ‖ M), M = {b}·P_t + {rest}·P_s, "
            f"P = softmax(·/{t}), no T² factor, {_BATCHMEAN}"
        )


# --------------------------------------------------------------------------- feature losses


class FeatureMSE(_AdaptedLoss):
    """Feature regression (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets").

    loss = mean((A(s) − t)²) over all elements, A the adapter: "auto" builds in ``setup`` a learned
    bias-free 1x1 Conv2d (4-D, channels differ) or Linear (2-D/3-D, last dim differs) when the
    shapes differ, None requires equal shapes, an nn.Module is used as given. The adapter is a
    registered submodule (trained, in ``state_dict``). Float32 result.
    """

    t2_scaling: ClassVar[T2Scaling] = "never"

    def __init__(self, adapter: str | nn.Module | None = "auto") -> None:
        super().__init__(adapter)

    def forward(self, student_out: Tensor, teacher_out: Tensor, **kwargs: Any) -> Tensor:
        student, teacher = self._adapted(student_out, teacher_out)
        return F.mse_loss(student, teacher)

    def describe(self) -> str:
        return f"mean((A(s) − t)²) over all elements, {self._adapter_text()}"


class CosineLoss(_AdaptedLoss):
    """Cosine feature loss: mean(1 − cos(A(s), t)) over positions.

    The cosine is taken along ``dim`` (default: the channel dim 1 for 4-D features, the last dim
    otherwise) and averaged over every remaining position. ``adapter`` as in FeatureMSE, default
    None (equal shapes required). Float32 result.
    """

    t2_scaling: ClassVar[T2Scaling] = "never"

    def __init__(self, dim: int | None = None, adapter: str | nn.Module | None = None) -> None:
        super().__init__(adapter)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise ValueError(f"CosineLoss: dim must be an integer or None (auto) (got {dim!r})")
        self.dim = dim

    def _dim_for(self, rank: int) -> int:
        if self.dim is not None:
            return self.dim
        return 1 if rank == 4 else -1

    def forward(self, student_out: Tensor, teacher_out: Tensor, **kwargs: Any) -> Tensor:
        student, teacher = self._adapted(student_out, teacher_out)
        cos = F.cosine_similarity(student, teacher, dim=self._dim_for(student.dim()))
        return (1 - cos).mean()

    def describe(self) -> str:
        dim = "channel dim 1 for 4-D, last dim otherwise" if self.dim is None else f"dim {self.dim}"
        return f"mean(1 − cos(A(s), t)) over positions, cosine along {dim}, {self._adapter_text()}"


class AttentionTransfer(KDLoss):
    """Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    Q(F) = normalize(mean_c |F|^p flattened over space, L2 per sample); loss = mean((Q(s) − Q(t))²)
    over samples and spatial positions. Features are ``[N, C, *spatial]``; channel counts may
    differ, batch and spatial sizes must match. Float32.
    """

    t2_scaling: ClassVar[T2Scaling] = "never"

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = _check_number(self._name, "p", p, gt=0, hint="the paper uses p=2")

    def setup(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        if len(student_shape) < 3 or len(teacher_shape) < 3:
            raise ValueError(
                f"AttentionTransfer needs [N, C, *spatial] features; got student shape "
                f"{_shape_str(student_shape)} and teacher shape {_shape_str(teacher_shape)}; "
                "pick convolutional layers"
            )
        _require_same_shape(
            self._name + " (batch and spatial dims)",
            [student_shape[0], *student_shape[2:]],
            [teacher_shape[0], *teacher_shape[2:]],
            f"full shapes {_shape_str(student_shape)} vs {_shape_str(teacher_shape)}: "
            "pick layers with the same spatial size (channels may differ)",
        )

    def _attention(self, features: Tensor) -> Tensor:
        return F.normalize(features.float().abs().pow(self.p).mean(dim=1).flatten(1), dim=1)

    def forward(self, student_out: Tensor, teacher_out: Tensor, **kwargs: Any) -> Tensor:
        _require_tensors(self._name, student_out, teacher_out)
        self.setup(student_out.shape, teacher_out.shape)
        return (self._attention(student_out) - self._attention(teacher_out.detach())).pow(2).mean()

    def describe(self) -> str:
        p = _fmt(self.p)
        return f"mean((Q(s) − Q(t))²), Q(F) = normalize(mean_c |F|^{p}, L2 over space per sample)"


class MGDLoss(KDLoss):
    """Masked Generative Distillation (Yang et al., ECCV 2022, arXiv 2205.01529).

    aligned = align(s) (a 1x1 Conv2d when channel counts differ, else identity); a random spatial
    mask M ``[N, 1, H, W]`` keeps a position where U[0, 1) ≥ lambda_mask (drawn with torch.rand on
    the features' device); G = Conv3x3(Ct, Ct) → ReLU → Conv3x3(Ct, Ct);
    loss = alpha · Σ (G(aligned · M) − t)² / N (sum over all elements, divided by the batch size).
    The align conv and G are built in ``setup`` (pass example_input= to kd.convert). 4-D features
    with equal spatial size. Float32 result.
    """

    t2_scaling: ClassVar[T2Scaling] = "never"

    def __init__(self, alpha: float = 2e-5, lambda_mask: float = 0.65) -> None:
        super().__init__()
        self.alpha = _check_number(self._name, "alpha", alpha, ge=0, hint="the paper uses 2e-5")
        self.lambda_mask = _check_number(
            self._name, "lambda_mask", lambda_mask, ge=0, lt=1, hint="the paper uses 0.65"
        )
        self.align: nn.Module | None = None
        self.generator: nn.Sequential | None = None
        self._channels: tuple[int, int] | None = None

    def setup(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        if len(student_shape) != 4 or len(teacher_shape) != 4:
            raise ValueError(
                f"MGDLoss needs 4-D [N, C, H, W] features; got student shape "
                f"{_shape_str(student_shape)} and teacher shape {_shape_str(teacher_shape)}"
            )
        _require_same_shape(
            self._name + " (batch and spatial dims)",
            [student_shape[0], *student_shape[2:]],
            [teacher_shape[0], *teacher_shape[2:]],
            f"full shapes {_shape_str(student_shape)} vs {_shape_str(teacher_shape)}: "
            "pick layers with the same spatial size (channels may differ)",
        )
        channels = (int(student_shape[1]), int(teacher_shape[1]))
        if channels == self._channels:
            return
        cs, ct = channels
        self.align = nn.Conv2d(cs, ct, kernel_size=1) if cs != ct else None
        self.generator = nn.Sequential(
            nn.Conv2d(ct, ct, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(ct, ct, kernel_size=3, padding=1),
        )
        self._channels = channels

    def forward(self, student_out: Tensor, teacher_out: Tensor, **kwargs: Any) -> Tensor:
        _require_tensors(self._name, student_out, teacher_out)
        if self.generator is None or self._channels is None:
            raise ValueError(
                "MGDLoss is not set up: its generator is built from the feature shapes; "
                "pass example_input= to kd.convert (or call setup(student_shape, teacher_shape))"
            )
        if (student_out.shape[1], teacher_out.shape[1]) != self._channels or student_out.dim() != 4:
            raise ValueError(
                f"MGDLoss was set up for (student, teacher) channels {self._channels}, got student "
                f"shape {_shape_str(student_out.shape)} and teacher shape {_shape_str(teacher_out.shape)}"
            )
        self.setup(student_out.shape, teacher_out.shape)
        aligned = student_out if self.align is None else self.align(student_out)
        n, _, h, w = teacher_out.shape
        keep = torch.rand((n, 1, h, w), device=aligned.device) >= self.lambda_mask
        generated = self.generator(aligned * keep.to(aligned.dtype))
        return self.alpha * (generated.float() - teacher_out.detach().float()).pow(2).sum() / n

    def describe(self) -> str:
        return (
            f"{_fmt(self.alpha)} · Σ(G(align(s)·M) − t)² / N, M keeps a position where "
            f"U[0,1) ≥ {_fmt(self.lambda_mask)}, G = Conv3x3-ReLU-Conv3x3"
        )


# --------------------------------------------------------------------------- registry

LOSSES: dict[str, type[KDLoss]] = {
    "logits_kl": LogitsKL,
    "mft": MFTLoss,
    "feature_mse": FeatureMSE,
    "cosine": CosineLoss,
    "attention_transfer": AttentionTransfer,
    "mgd": MGDLoss,
    "dkd": DKDLoss,
    "generalized_jsd": GeneralizedJSD,
}


def loss_parameters(loss: str | type[KDLoss]) -> list[inspect.Parameter]:
    """The params a loss takes (what `build_loss` accepts), in order: the keyword parameters of
    its constructor, each with its default (`inspect.Parameter.empty` when it is required).
    `loss` is a registered name (KeyError when unknown) or the class itself."""
    cls = LOSSES[loss] if isinstance(loss, str) else loss
    params = inspect.signature(cls.__init__).parameters.values()
    return [p for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


def _parameter_names(cls: type[KDLoss]) -> list[str]:
    return [p.name for p in loss_parameters(cls)]


def build_loss(name: str, params: dict[str, Any] | None = None) -> KDLoss:
    """Instantiate the registered loss `name` with `params` (ValueError naming a bad name/param)."""
    if name not in LOSSES:
        close = difflib.get_close_matches(str(name), LOSSES, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown loss {name!r}{hint} Available: {', '.join(sorted(LOSSES))}")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise ValueError(f"loss {name!r}: params must be a dict (got {type(params).__name__})")
    cls = LOSSES[name]
    accepted = _parameter_names(cls)
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"loss {name!r} has no parameter {key!r}{hint}; accepted: {', '.join(accepted)}"
            )
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"loss {name!r}: bad parameters {params!r}: {exc}") from exc
