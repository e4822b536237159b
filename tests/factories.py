"""Rows for tests, written through the ORM (the same models the service uses)."""

from __future__ import annotations

import copy
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Experiment, Run

DIGITS_TEACHER: dict[str, Any] = {
    "name": "digits-teacher",
    "experiment": "digits-kd",
    "kind": "train",
    "seed": 0,
    "dataset": {"name": "digits", "params": {}, "val_fraction": 0.2},
    "student": {"name": "mlp", "params": {"hidden": [64]}},
    "train": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.003}},
}

DIGITS_KD: dict[str, Any] = {
    "name": "digits-kd",
    "experiment": "digits-kd",
    "kind": "distill",
    "seed": 0,
    "dataset": {"name": "digits", "params": {}, "val_fraction": 0.2},
    "student": {"name": "mlp", "params": {"hidden": [16]}},
    "teacher": {"name": "mlp", "params": {"hidden": [64]}},
    "distill": {
        "pairs": [
            {
                "student_layer": "",
                "teacher_layer": "",
                "loss": {"name": "logits_kl", "params": {"temperature": 4.0}},
            }
        ],
        "balancer": {"name": "static", "params": {"kd_weight": 0.7}},
    },
    "train": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.003}},
}


def config(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of `base` with top-level keys replaced."""
    result = copy.deepcopy(base)
    result.update(changes)
    return result


def create_run(
    session: Session,
    name: str = "run",
    experiment: str = "default",
    kind: str = "train",
    status: str = "queued",
    run_config: dict[str, Any] | None = None,
) -> Run:
    """A committed run row (no validation: for tests of metrics, artifacts and states)."""
    exp = session.scalar(select(Experiment).where(Experiment.name == experiment))
    if exp is None:
        exp = Experiment(name=experiment)
        session.add(exp)
        session.flush()
    run = Run(
        experiment_id=exp.id,
        name=name,
        kind=kind,
        status=status,
        config=run_config or config(DIGITS_TEACHER, name=name, experiment=experiment),
    )
    session.add(run)
    session.commit()
    return run
