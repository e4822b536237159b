"""ModelOpt's distillation losses (``mtd.LogitsDistillationLoss``, ``mtd.MFTLoss``, ``mtd.MGDLoss``).

Thin subclasses of the engine's losses (`kdlab.worker.kd.losses`): the KL, the MFT-corrected
teacher distribution and MGD's generator come from there; this module adds ModelOpt's
constructor arguments, argument names, reductions and defaults (nvidia-modelopt 0.47).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.worker.kd import losses as kd_losses
from kdlab.worker.kd.losses import kl_div_last, log_probs

__all__ = ["LogitsDistillationLoss", "MFTLoss", "MGDLoss"]

Reduction = Literal["mean", "batchmean", "sum", "none"]
_REDUCTIONS = ("mean", "batchmean", "sum", "none")


def _check_reduction(owner: str, reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{owner}: reduction must be one of {list(_REDUCTIONS)} (as in F.kl_div), "
            f"got {reduction!r}"
        )
    return reduction


class LogitsDistillationLoss(kd_losses.LogitsKL):
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) on logits, class dim last (ModelOpt ≥ 0.43 semantics).

    The reduction is F.kl_div's, applied to the un-flattened logits: "mean" divides the sum by
    every element (``logits.numel()``, classes included), "batchmean" by ``logits.size(0)``,
    "sum" keeps the sum, "none" returns the KL per position (summed over the class dim only).
    The T² factor is always applied. Computed in float32 (ModelOpt computes in the input dtype).
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(temperature=temperature, scale_by_t2=True)
        self._temperature: float = self.temperature
        self._reduction: str = _check_reduction(type(self).__name__, reduction)

    def forward(self, logits_s: Tensor, logits_t: Tensor) -> Tensor:  # type: ignore[override]
        """Loss of student logits `logits_s` against teacher logits `logits_t` (the target)."""
        if self._reduction == "none":
            student, teacher, _ = self._inputs(logits_s, logits_t, None)
            per_position = kl_div_last(
                log_probs(teacher, self.temperature), log_probs(student, self.temperature)
            )
            return self.factor * per_position
        # the engine's loss is the mean over positions (every dim but the last)
        mean_over_positions = super().forward(logits_s, logits_t)
        positions = logits_s.numel() // max(logits_s.size(-1), 1)
        if self._reduction == "sum":
            return mean_over_positions * positions
        if self._reduction == "batchmean":
            return mean_over_positions * (positions / logits_s.size(0))
        return mean_over_positions / logits_s.size(-1)  # "mean": over every element

    def describe(self) -> str:
        return f"{super().describe()}; ModelOpt reduction {self._reduction!r}"


class MFTLoss(kd_losses.MFTLoss):
    """Minifinetuning KD loss (ModelOpt's ``MFTLoss``): KL to the label-corrected teacher.

    Logits of any rank are flattened to ``[N, classes]`` and the labels to ``[N]`` (ModelOpt
    needs 1-D labels; the leading shape is accepted too). "batchmean" (the default) divides by
    N, "sum" sums, "mean" divides by every element, "none" returns the ``[N, classes]``
    elementwise terms (as F.kl_div). T² factor always applied; ``apply_threshold_to_all``
    is always on, as in ModelOpt.
    """

    def __init__(
        self, temperature: float = 1.0, threshold: float = 0.2, reduction: str = "batchmean"
    ) -> None:
        super().__init__(
            temperature=temperature, threshold=threshold, apply_to_all=True, scale_by_t2=True
        )
        self._temperature: float = self.temperature
        self._threshold: float = self.threshold
        self._reduction: str = _check_reduction(type(self).__name__, reduction)

    def forward(  # type: ignore[override]
        self, logits_s: Tensor, logits_t: Tensor, labels: Tensor
    ) -> Tensor:
        """Loss of `logits_s` against `logits_t` corrected towards `labels`."""
        classes = logits_s.size(-1)
        student = logits_s.reshape(-1, classes)
        teacher = logits_t.reshape(-1, logits_t.size(-1))
        flat_labels = labels.reshape(-1)
        if self._reduction == "batchmean":
            return super().forward(student, teacher, labels=flat_labels)
        _, teacher32, checked = self._inputs(student, teacher, flat_labels)
        assert checked is not None
        corrected = self.corrected_teacher_probs(teacher32, checked)
        log_s = log_probs(student, self.temperature)
        return self.factor * F.kl_div(log_s, corrected, reduction=self._reduction)


class MGDLoss(kd_losses.MGDLoss):
    """Masked Generative Distillation as ModelOpt computes it (``mtd.MGDLoss``).

    The align conv and generator are the engine's, built here from the channel counts (so they
    exist at construction, as in ModelOpt) and named as in ModelOpt: ``align`` (identity for
    equal channels) and ``generation``. ModelOpt's formula differs from the engine's MGDLoss:
    the mask zeroes a position where U[0, 1) > 1 − lambda_mgd, and the loss is
    alpha_mgd · mean((G(align(s)·M) − t)²) (the engine: keep where U ≥ lambda, Σ/N).
    """

    def __init__(
        self,
        num_student_channels: int,
        num_teacher_channels: int,
        alpha_mgd: float = 1.0,
        lambda_mgd: float = 0.65,
    ) -> None:
        super().__init__(alpha=alpha_mgd, lambda_mask=lambda_mgd)
        self._alpha_mgd: float = self.alpha
        self._lambda_mgd: float = self.lambda_mask
        self.setup(
            torch.Size([1, num_student_channels, 1, 1]), torch.Size([1, num_teacher_channels, 1, 1])
        )
        generator = self.generator
        assert generator is not None
        del self.generator  # ModelOpt's name is `generation` (its state-dict keys)
        self.generation: nn.Sequential = generator
        if self.align is None:
            self.align = nn.Identity()

    def forward(self, out_s: Tensor, out_t: Tensor) -> Tensor:  # type: ignore[override]
        """Loss of student features `out_s` [N, Cs, H, W] against teacher features `out_t`."""
        if out_s.shape[-2:] != out_t.shape[-2:]:
            raise ValueError(
                f"MGDLoss: student features {tuple(out_s.shape)} and teacher features "
                f"{tuple(out_t.shape)} must have the same spatial size (H, W)"
            )
        assert self.align is not None
        aligned = self.align(out_s)
        n, _, h, w = out_t.shape
        uniform = torch.rand((n, 1, h, w), device=aligned.device)
        keep = (uniform <= 1 - self._lambda_mgd).to(aligned.dtype)  # ModelOpt's mask rule
        generated = self.generation(aligned * keep)
        return self._alpha_mgd * F.mse_loss(generated, out_t)

    def describe(self) -> str:
        return (
            f"{self._alpha_mgd:g} · mean((G(align(s)·M) − t)²), M zeroes a position where "
            f"U[0,1) > 1 − {self._lambda_mgd:g}, G = Conv3x3-ReLU-Conv3x3 (ModelOpt's MGD)"
        )
