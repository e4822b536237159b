"""Recipes: ready run configs shipped as files (`frontend/recipes/*.yaml`) that fill the launch
form. Each file has `title`, `description` and `config` (a RunConfig without teacher weights:
the form picks the newest finished run with the recipe's teacher architecture)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.orm import Session

from kdlab.backend.errors import NotFound
from kdlab.backend.schemas.runs import RunOut
from kdlab.backend.services import run_views

RECIPES_DIR = Path(__file__).resolve().parents[2] / "frontend" / "recipes"


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    description: str
    config: dict[str, Any]


@cache
def _all() -> dict[str, Recipe]:
    found = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        found[path.stem] = Recipe(path.stem, data["title"], data["description"], data["config"])
    return found


def listing() -> list[Recipe]:
    return list(_all().values())


def load(name: str) -> Recipe:
    recipes = _all()
    if name not in recipes:
        raise NotFound(f"no recipe {name!r}; the recipes are: {', '.join(recipes)}")
    return recipes[name]


def matching_teacher(session: Session, teacher: dict[str, Any], dataset: str) -> RunOut | None:
    """The newest succeeded run that trained `teacher`'s architecture on `dataset` (from the
    teacher picker's list)."""
    for run, _ in run_views.teacher_runs(session, limit=500):
        student = run.config.get("student") or {}
        if (
            student.get("name") == teacher.get("name")
            and (student.get("params") or {}) == (teacher.get("params") or {})
            and (run.config.get("dataset") or {}).get("name") == dataset
        ):
            return run
    return None


def draft_with_teacher(session: Session, config: dict[str, Any]) -> dict[str, Any]:
    """The recipe's config, its teacher weights set to a matching finished run when there is
    one (else left for the user to pick)."""
    draft = copy.deepcopy(config)
    teacher = draft.get("teacher")
    if isinstance(teacher, dict) and not teacher.get("weights"):
        found = matching_teacher(session, teacher, draft.get("dataset", {}).get("name", ""))
        if found is not None:
            teacher["weights"] = {"run_id": found.id, "checkpoint": "best"}
    return draft
