"""What the launch form template needs for a draft config: the schema-driven sections, the
layer-pair editor, the teacher picker and the validation report; and the form's actions (add or
remove a pair, offer an adapter, adopt a teacher run's architecture)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from kdlab.backend.errors import ServiceError
from kdlab.backend.schemas.catalog import Catalog
from kdlab.backend.schemas.runs import ValidationReport
from kdlab.backend.services import catalog as catalog_service
from kdlab.backend.services import run_views
from kdlab.backend.services import runs as run_service
from kdlab.backend.services import uploads as upload_service
from kdlab.backend.services.launch_form import (
    CATALOG_NAMES,
    FormField,
    LayerChoice,
    attach_errors,
    catalog_options,
    layer_choices,
    loss_param_fields,
    object_fields,
    params_fields,
)
from kdlab.backend.services.validation import data_root
from kdlab.backend.settings import Settings
from kdlab.worker.config import balancer_params_schema
from kdlab.worker.kd.loss_balancers import BALANCERS

DEFAULT_DRAFT: dict[str, Any] = {
    "name": "my-distill-run",
    "experiment": "default",
    "kind": "distill",
    "dataset": {"name": "digits"},
    "student": {"name": "mlp", "params": {"hidden": [16]}},
    "teacher": {"name": "mlp", "params": {"hidden": [256, 256]}},
    "distill": {
        "pairs": [{"student_layer": "", "teacher_layer": "", "loss": {"name": "logits_kl"}}]
    },
}
ADAPTER_LOSS = "feature_mse"  # the loss the form offers when a pair's shapes differ


@dataclass
class PairView:
    index: int
    student_layer: str
    teacher_layer: str
    loss_name: str
    loss_fields: list[FormField]
    student_choices: list[LayerChoice]
    teacher_choices: list[LayerChoice]
    student_shape: list[int] | None = None
    teacher_shape: list[int] | None = None
    notice: str | None = None  # shapes differ: what happens
    offer: str | None = None  # the action that fixes it (`adapter:i` or `feature_mse:i`)
    offer_label: str | None = None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def student_options(self) -> list[tuple[str, str]]:
        return [(c.name, c.label) for c in self.student_choices]

    @property
    def teacher_options(self) -> list[tuple[str, str]]:
        return [(c.name, c.label) for c in self.teacher_choices]

    @property
    def mismatch(self) -> bool:
        return (
            self.student_shape is not None
            and self.teacher_shape is not None
            and self.student_shape != self.teacher_shape
        )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _layers(
    catalog: Catalog, spec: dict[str, Any], dataset: dict[str, Any], settings: Settings
) -> tuple[list[Any] | None, str | None]:
    name = spec.get("name")
    if name not in catalog.models:
        return None, None
    try:
        layers = catalog_service.model_layers(
            name,
            json.dumps(_dict(spec.get("params"))),
            str(dataset.get("name") or "digits"),
            json.dumps(_dict(dataset.get("params"))),
            data_root(settings),
        )
    except ServiceError as err:
        return None, f"cannot list the layers of {name}: {err.message}"
    return layers, None


def _pair_views(
    catalog: Catalog, draft: dict[str, Any], errors: dict[str, str], settings: Settings
) -> tuple[list[PairView], str | None]:
    dataset = _dict(draft.get("dataset"))
    student_layers, student_problem = _layers(
        catalog, _dict(draft.get("student")), dataset, settings
    )
    teacher_layers, teacher_problem = _layers(
        catalog, _dict(draft.get("teacher")), dataset, settings
    )
    student_choices, teacher_choices = layer_choices(student_layers), layer_choices(teacher_layers)
    shapes_s = {c.name: c.shape for c in student_choices}
    shapes_t = {c.name: c.shape for c in teacher_choices}
    pairs = _dict(draft.get("distill")).get("pairs") or [{}]
    views = []
    for i, pair in enumerate(p if isinstance(p, dict) else {} for p in pairs):
        loss = _dict(pair.get("loss"))
        loss_name = str(loss.get("name") or "logits_kl")
        loc: list[str | int] = ["distill", "pairs", i, "loss", "params"]
        loss_fields = loss_param_fields(
            loc, catalog.losses.get(loss_name), _dict(loss.get("params"))
        )
        prefix = f"distill.pairs.{i}."
        view = PairView(
            index=i,
            student_layer=str(pair.get("student_layer", "")),
            teacher_layer=str(pair.get("teacher_layer", "")),
            loss_name=loss_name,
            loss_fields=loss_fields,
            student_choices=student_choices,
            teacher_choices=teacher_choices,
            errors={k[len(prefix) :]: v for k, v in errors.items() if k.startswith(prefix)},
        )
        attach_errors(loss_fields, errors)
        view.student_shape = shapes_s.get(view.student_layer)
        view.teacher_shape = shapes_t.get(view.teacher_layer)
        _explain_mismatch(view, _dict(loss.get("params")))
        views.append(view)
    return views, student_problem or teacher_problem


def _explain_mismatch(view: PairView, params: dict[str, Any]) -> None:
    if not view.mismatch:
        return
    shapes = f"student {_shape(view.student_shape)} vs teacher {_shape(view.teacher_shape)}"
    if view.loss_name == ADAPTER_LOSS and params.get("adapter", "auto") == "auto":
        view.notice = (
            f"Shapes differ ({shapes}): an adapter is learned that projects the student's "
            "output to the teacher's shape (trained with the student, not exported)."
        )
    elif view.loss_name == ADAPTER_LOSS:
        view.notice = f"Shapes differ ({shapes}) and this loss has no adapter: it will fail."
        view.offer, view.offer_label = f"adapter:{view.index}", "Learn an adapter (adapter: auto)"
    else:
        view.notice = f"Shapes differ ({shapes}): {view.loss_name} needs outputs of equal shape."
        view.offer = f"{ADAPTER_LOSS}:{view.index}"
        view.offer_label = f"Use {ADAPTER_LOSS} with an auto adapter"


def _shape(shape: list[int] | None) -> str:
    return "×".join(map(str, shape)) if shape else "?"


def _hooks(catalog: Catalog, kind: str, draft: dict[str, Any]) -> Any:
    def take(loc: list[Any], prop: dict[str, Any]) -> list[FormField] | None:
        key = tuple(loc)
        if key in (("teacher",), ("distill",)) and kind != "distill":
            return []
        if key in CATALOG_NAMES:
            group = CATALOG_NAMES[key]
            value = str(_dict(draft.get(loc[0])).get("name") or "")
            return [FormField(list(loc), "Name", "select", value=value, required=True,
                              options=catalog_options(catalog, group), structural=True,
                              description=prop.get("description"))]  # fmt: skip
        if key == ("distill", "balancer", "params"):
            balancer = _dict(_dict(draft.get("distill")).get("balancer"))
            name = str(balancer.get("name") or "static")
            schema = balancer_params_schema(name) if name in BALANCERS else None
            values = _dict(balancer.get("params")) or {"kd_weight": 0.5}
            children = params_fields(list(loc), schema, values)
            return [FormField(list(loc), "Params", "group", children=children)]
        if len(loc) == 2 and loc[1] == "params" and loc[0] in ("dataset", "student", "teacher"):
            section = _dict(draft.get(loc[0]))
            items = catalog.datasets if loc[0] == "dataset" else catalog.models
            item = items.get(str(section.get("name")))
            schema = item.params_schema if item is not None else None
            children = params_fields(list(loc), schema, _dict(section.get("params")))
            return [FormField(list(loc), "Params", "group", children=children,
                              description=item.description if item else None)]  # fmt: skip
        return None

    return take


def _sections(catalog: Catalog, draft: dict[str, Any]) -> tuple[list[FormField], list[FormField]]:
    """(top-level fields of the run, one group per section), from the RunConfig schema."""
    schema = catalog.run_config_schema
    kind = str(draft.get("kind") or "distill")
    fields = object_fields([], schema, draft, schema.get("$defs", {}), _hooks(catalog, kind, draft))
    return [f for f in fields if f.widget != "group"], [f for f in fields if f.widget == "group"]


def _teacher_context(session: Session, draft: dict[str, Any], source: str | None) -> dict[str, Any]:
    weights = _dict(_dict(draft.get("teacher")).get("weights"))
    if source not in ("run", "upload"):
        source = "upload" if weights.get("upload_id") else "run"
    return {
        "teacher_runs": run_views.teacher_runs(session),
        "uploads": upload_service.list_uploads(session),
        "weights": weights,
        "weights_source": source,
    }


def form_context(
    session: Session,
    settings: Settings,
    draft: dict[str, Any],
    *,
    errors: dict[str, str] | None = None,
    report: ValidationReport | None = None,
    weights_source: str | None = None,
) -> dict[str, Any]:
    """Everything `partials/_launch_form.html` renders, for this draft."""
    errors = dict(errors or {})
    catalog = catalog_service.catalog_listing()
    run_fields, sections = _sections(catalog, draft)
    unclaimed = attach_errors(run_fields + sections, errors)
    is_distill = draft.get("kind", "distill") == "distill"
    pairs, layer_problem = (
        _pair_views(catalog, draft, errors, settings) if is_distill else ([], None)
    )
    pair_paths = {f"distill.pairs.{p.index}.{k}" for p in pairs for k in p.errors}
    loss_paths = {f.path for p in pairs for f in p.loss_fields if f.error}
    weights_paths = {k for k in unclaimed if k.startswith("teacher.weights")}
    general = [
        (path, errors[path])
        for path in unclaimed
        if path not in pair_paths | loss_paths | weights_paths
    ]
    return {
        "draft": draft,
        "run_fields": run_fields,
        "sections": sections,
        "is_distill": is_distill,
        "pairs": pairs,
        "layer_problem": layer_problem,
        "loss_options": [(name, name) for name in sorted(catalog.losses)],
        "errors": errors,
        "general_errors": general,
        "weights_error": " ".join(errors[k] for k in sorted(weights_paths)) or None,
        "report": report,
        "formula": report.loss_formula if report is not None else None,
        **(_teacher_context(session, draft, weights_source) if is_distill else {}),
    }


# --------------------------------------------------------------------------- form actions


def apply_action(session: Session, draft: dict[str, Any], action: str | None) -> None:
    """Change the draft as a form button asked: `add_pair`, `remove_pair:i`, `adapter:i`,
    `feature_mse:i`, `adopt_teacher`; and keep it consistent with its kind."""
    if draft.get("kind", "distill") == "distill":
        draft.setdefault("teacher", copy.deepcopy(DEFAULT_DRAFT["teacher"]))
        draft.setdefault("distill", copy.deepcopy(DEFAULT_DRAFT["distill"]))
    else:
        draft.pop("teacher", None)
        draft.pop("distill", None)
    if not action:
        return
    verb, _, arg = action.partition(":")
    distill = _dict(draft.get("distill"))
    pairs = distill.setdefault("pairs", [])
    if verb == "add_pair":
        pairs.append({"student_layer": "", "teacher_layer": "", "loss": {"name": ADAPTER_LOSS}})
    elif verb == "remove_pair" and arg.isdigit() and int(arg) < len(pairs) and len(pairs) > 1:
        del pairs[int(arg)]
        _trim_weights(distill, int(arg))
    elif verb in ("adapter", ADAPTER_LOSS) and arg.isdigit() and int(arg) < len(pairs):
        pairs[int(arg)]["loss"] = {"name": ADAPTER_LOSS, "params": {"adapter": "auto"}}
    elif verb == "adopt_teacher":
        _adopt_teacher(session, draft)


def _trim_weights(distill: dict[str, Any], removed: int) -> None:
    weight = _dict(_dict(distill.get("balancer")).get("params")).get("kd_weight")
    if isinstance(weight, list) and removed < len(weight):
        del weight[removed]


def _adopt_teacher(session: Session, draft: dict[str, Any]) -> None:
    """The picked teacher run's architecture becomes the teacher's (its weights fit no other)."""
    teacher = _dict(draft.get("teacher"))
    run_id = _dict(teacher.get("weights")).get("run_id")
    if not run_id:
        return
    try:
        source = run_service.get_run(session, str(run_id))
    except ServiceError:
        return
    student = source.config.get("student") or {}
    teacher["name"] = student.get("name", teacher.get("name"))
    teacher["params"] = copy.deepcopy(student.get("params") or {})
