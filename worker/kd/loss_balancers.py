"""Loss balancers: reduce the student loss and the KD terms to one scalar (ModelOpt semantics)."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn

STUDENT_LOSS_KEY = "student_loss"  # ModelOpt's key (mtd.loss_balancers.STUDENT_LOSS_KEY)


def _validate_weights(kd_weight: float | Sequence[float]) -> tuple[float, ...]:
    weights = (kd_weight,) if isinstance(kd_weight, (int, float)) else tuple(kd_weight)
    if not weights:
        raise ValueError("kd_weight: give a float or a non-empty list of floats, one per pair")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"kd_weight: {w!r} is not a number; use floats in [0, 1]")
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"kd_weight: {w} is outside [0, 1]; each weight must be in [0, 1]")
    if sum(weights) > 1.0 + 1e-9:
        raise ValueError(
            f"kd_weight: weights {list(weights)} sum to {sum(weights):.4g} > 1; the student loss "
            "gets 1 - sum(kd_weight), so the KD weights must sum to at most 1"
        )
    return tuple(float(w) for w in weights)


class LossBalancer(nn.Module, abc.ABC):
    """Combines `{"student_loss": loss, "<pair key>": kd term, ...}` into one scalar."""

    def __init__(self, kd_weight: float | Sequence[float] = 0.5) -> None:
        super().__init__()
        self.kd_weights = _validate_weights(kd_weight)

    @property
    def student_weight(self) -> float:
        return 1.0 - sum(self.kd_weights)

    def pair_weights(self, keys: Sequence[str]) -> dict[str, float]:
        """Weight of each KD term: a single float applies to every term, a list is per pair."""
        if len(self.kd_weights) == 1:
            return dict.fromkeys(keys, self.kd_weights[0])
        if len(self.kd_weights) != len(keys):
            raise ValueError(
                f"kd_weight: {len(self.kd_weights)} weights for {len(keys)} KD pairs {list(keys)}; "
                "give one weight per pair or a single float"
            )
        return dict(zip(keys, self.kd_weights, strict=True))

    def weighted_terms(
        self, kd_terms: dict[str, torch.Tensor], student_loss: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Each KD term after weighting (and any rescaling) — what enters the total."""
        weights = self.pair_weights(list(kd_terms))
        return {k: weights[k] * self.scale(t, student_loss) for k, t in kd_terms.items()}

    def scale(self, term: torch.Tensor, student_loss: torch.Tensor | None) -> torch.Tensor:
        return term

    def combine(
        self, weighted: dict[str, torch.Tensor], student_loss: torch.Tensor | None
    ) -> torch.Tensor:
        """The scalar to back-propagate: weighted KD terms plus the weighted student loss."""
        self._check_student_loss(student_loss)
        total = torch.stack(list(weighted.values())).sum()
        if student_loss is not None:
            total = total + self.student_weight * student_loss
        return total

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """ModelOpt-style call: `{"student_loss": loss, "<pair>": term, ...}` → total."""
        terms = dict(loss_dict)
        student_loss = terms.pop(STUDENT_LOSS_KEY, None)
        self._check_student_loss(student_loss)
        return self.combine(self.weighted_terms(terms, student_loss), student_loss)

    def _check_student_loss(self, student_loss: torch.Tensor | None) -> None:
        if student_loss is None and self.student_weight > 1e-9:
            raise ValueError(
                f"{type(self).__name__}(kd_weight={list(self.kd_weights)}) leaves weight "
                f"{self.student_weight:.4g} for the student loss, but compute_kd_loss got no "
                "student_loss; pass student_loss=... or make kd_weight sum to 1.0"
            )

    def describe(self) -> str:
        return f"{self.student_weight:.4g}·student_loss + Σ wᵢ·kdᵢ with w={list(self.kd_weights)}"


class StaticBalancer(LossBalancer):
    """total = (1 − Σw)·student_loss + Σ wᵢ·kdᵢ (a float weight applies to each KD term)."""


class DynamicBalancer(LossBalancer):
    """Rescales each KD term to the student loss magnitude before weighting.

    total = (1 − Σw)·student_loss + Σ wᵢ·kdᵢ·(|student_loss| / |kdᵢ|), the ratio detached, so
    the gradient direction of each term is kept while its size follows the task loss.
    """

    def __init__(self, kd_weight: float | Sequence[float] = 0.5, eps: float = 1e-12) -> None:
        super().__init__(kd_weight)
        self.eps = eps

    def _check_student_loss(self, student_loss: torch.Tensor | None) -> None:
        if student_loss is None:
            raise ValueError(
                "DynamicBalancer scales KD terms to the student loss, but compute_kd_loss got no "
                "student_loss; pass student_loss=... or use StaticBalancer"
            )

    def scale(self, term: torch.Tensor, student_loss: torch.Tensor | None) -> torch.Tensor:
        assert student_loss is not None
        ratio = student_loss.detach().abs() / term.detach().abs().clamp_min(self.eps)
        return term * ratio

    def describe(self) -> str:
        return (
            f"{self.student_weight:.4g}·student_loss + Σ wᵢ·kdᵢ·(|student_loss|/|kdᵢ|, detached) "
            f"with w={list(self.kd_weights)}"
        )


BALANCERS: dict[str, type[LossBalancer]] = {"static": StaticBalancer, "dynamic": DynamicBalancer}


def build_balancer(name: str, params: dict | None = None) -> LossBalancer:
    """A balancer from its catalog name (`static` | `dynamic`) and constructor params."""
    if name not in BALANCERS:
        raise ValueError(
            f"balancer.name: unknown balancer {name!r}; choose one of {list(BALANCERS)}"
        )
    try:
        return BALANCERS[name](**(params or {}))
    except TypeError as err:
        raise ValueError(f"balancer.params: {err}; {name} takes kd_weight") from None
