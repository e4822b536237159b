"""ModelOpt's loss balancers (``mtd.DistillationLossBalancer``, ``mtd.StaticLossBalancer``).

A balancer is called with ModelOpt's loss dict: ``{"student_loss": ..., "<LossClass>_<i>": ...}``
(the student loss only when one was given) and returns the scalar to back-propagate. The
weighting itself is the engine's `StaticBalancer` (`kdlab.worker.kd.loss_balancers`).
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kdlab.worker.kd.loss_balancers import STUDENT_LOSS_KEY, StaticBalancer

__all__ = ["STUDENT_LOSS_KEY", "DistillationLossBalancer", "StaticLossBalancer"]


class DistillationLossBalancer(nn.Module, abc.ABC):
    """Interface for loss balancers: ``forward(loss_dict) -> total loss`` (ModelOpt's)."""

    def __init__(self) -> None:
        super().__init__()
        self._student_loss_reduction_fn: Callable[[Any], torch.Tensor] | None = None

    def set_student_loss_reduction_fn(
        self, student_loss_reduction_fn: Callable[[Any], torch.Tensor]
    ) -> None:
        """Reduce the student loss with this function before balancing."""
        self._student_loss_reduction_fn = student_loss_reduction_fn

    @abc.abstractmethod
    def forward(self, loss: dict[str, torch.Tensor]) -> torch.Tensor:
        """The total loss from ModelOpt's loss dict."""


class StaticLossBalancer(DistillationLossBalancer):
    """total = Σ wᵢ·kdᵢ + (1 − Σw)·student_loss (the student term only when one is given).

    `kd_loss_weight`: a float (for a single KD loss) or one weight per KD loss, in criterion
    order. Their sum must lie in [0, 1]; below 1 a `student_loss` is expected (warned, as in
    ModelOpt). Each weight must also lie in [0, 1] (the engine's rule; ModelOpt checks only the sum).
    """

    def __init__(self, kd_loss_weight: float | Sequence[float] = 0.5) -> None:
        super().__init__()
        weights = (
            [float(kd_loss_weight)]
            if isinstance(kd_loss_weight, (int, float))
            else [float(w) for w in kd_loss_weight]
        )
        total = sum(weights)
        if total < 0.0 or total > 1.0:
            raise ValueError(
                f"The sum of values of kd_loss_weight should be [0., 1.], actual sum {total}"
            )
        if total < 1.0:
            warnings.warn(
                "`StaticLossBalancer` weights do not sum to 1.0. Argument `student_loss` should be "
                "passed into `DistillationModel.compute_kd_loss`",
                stacklevel=2,
            )
        self._kd_loss_weight: list[float] = weights
        self._weighting = StaticBalancer(kd_weight=weights)

    def forward(self, loss: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of ModelOpt's loss dict."""
        kd_terms = dict(loss)
        student_loss = kd_terms.pop(STUDENT_LOSS_KEY, None)
        if student_loss is not None and self._student_loss_reduction_fn is not None:
            student_loss = self._student_loss_reduction_fn(student_loss)
        if len(kd_terms) != len(self._kd_loss_weight):
            raise AssertionError(
                f"Number of `kd_loss_weight` ({len(self._kd_loss_weight)}) does not correspond to "
                f"number of kd losses computed ({len(kd_terms)}: {list(kd_terms)})"
            )
        weighted = self._weighting.weighted_terms(kd_terms, student_loss)
        if student_loss is None:  # ModelOpt: no student term (the engine would refuse)
            return torch.stack(list(weighted.values())).sum()
        return self._weighting.combine(weighted, student_loss)
