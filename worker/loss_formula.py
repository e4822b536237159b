"""The loss a run optimises, written out: one home for the formula text that the trainer logs
(from its live DistillationModel) and the launch form previews (from the config alone)."""

from __future__ import annotations

from typing import Any

from kdlab.worker import kd
from kdlab.worker.config import RunConfig
from kdlab.worker.kd.distillation_model import pair_key

STUDENT_LOSS_FORMULA = "cross_entropy(student_logits, labels), mean over labels != -100"


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.6g}"


def describe_from_config(
    config: RunConfig, term_formulas: list[str] | None = None
) -> dict[str, Any]:
    """What `DistillationModel.describe_kd_loss()` will report for this config, from the losses
    and balancer alone (no models). `term_formulas`: each pair's `describe()` once its loss was
    set up for the real shapes (learned adapters show only then; the dry run has them)."""
    assert config.distill is not None
    spec = config.distill
    balancer = kd.build_balancer(spec.balancer.name, spec.balancer.params)
    keys = [pair_key((p.student_layer, p.teacher_layer)) for p in spec.pairs]
    weights = balancer.pair_weights(keys)
    terms = []
    for i, (pair, key) in enumerate(zip(spec.pairs, keys, strict=True)):
        loss = kd.losses.build_loss(pair.loss.name, pair.loss.params)
        formula = term_formulas[i] if term_formulas is not None else loss.describe()
        terms.append(
            {
                "key": key,
                "student_layer": pair.student_layer,
                "teacher_layer": pair.teacher_layer,
                "loss": type(loss).__name__,
                "formula": formula,
                "weight": weights.get(key),
            }
        )
    return {
        "terms": terms,
        "balancer": balancer.describe(),
        "student_loss_weight": balancer.student_weight,
    }


def loss_formula(config: RunConfig, described: dict[str, Any] | None) -> dict[str, Any]:
    """`{"formula": "total = …", "student_loss", "student_loss_weight", "kd"}` for a distill
    run (`described`: from `describe_kd_loss` or `describe_from_config`), or the supervised
    formula of a train run (`described` None)."""
    if described is None:
        return {"formula": f"total = {STUDENT_LOSS_FORMULA}", "student_loss_weight": 1.0}
    assert config.distill is not None
    uses_student_loss = config.train.student_loss != "none"
    student_weight = described.get("student_loss_weight") if uses_student_loss else 0.0
    parts = [f"{_num(t['weight'])}·[{t['formula']}]" for t in described["terms"]]
    if uses_student_loss:
        parts.insert(0, f"{_num(student_weight)}·[{STUDENT_LOSS_FORMULA}]")
    formula = "total = " + " + ".join(parts)
    if config.distill.balancer.name == "dynamic":
        formula += f" (each KD term first rescaled: {described['balancer']})"
    return {
        "formula": formula,
        "student_loss": STUDENT_LOSS_FORMULA if uses_student_loss else None,
        "student_loss_weight": student_weight,
        "kd": described,
    }
