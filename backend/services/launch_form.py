"""The launch form as a tree of fields, generated from the RunConfig JSON Schema and the catalog.

`build_form(draft, ...)` walks the schema: every property becomes a field whose widget follows
its type (enum → select, number → number input, bool → checkbox, object → fieldset, nullable →
the inner type, left empty for null). The catalog fills in what the schema leaves open: model
and dataset names become selects whose params fieldset comes from that entry's params schema;
a loss's params come from its constructor; layer pairs get selects from both models' layer
trees with output shapes; the teacher's weights a picker of finished runs and uploads. Values
come from `draft` (what the user typed, a recipe or a cloned run), else the schema's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kdlab.backend.schemas.catalog import Catalog, Layer, LossItem
from kdlab.backend.services.form_codec import Loc, field_id

# Changing one of these re-renders the form (other fields depend on it).
STRUCTURAL = {
    ("kind",),
    ("dataset", "name"),
    ("student", "name"),
    ("teacher", "name"),
    ("distill", "balancer", "name"),
}
KIND_SECTIONS = {("teacher",), ("distill",)}  # present exactly when kind is distill
HIDDEN = {("schema_version",), ("distill", "pairs"), ("teacher", "weights")}  # own editors
CATALOG_NAMES = {("dataset", "name"): "datasets", ("student", "name"): "models",
                 ("teacher", "name"): "models"}  # fmt: skip


@dataclass
class FormField:
    loc: Loc
    label: str
    widget: str  # text | number | select | checkbox | textarea | group
    kind: str = "str"  # form_codec type of the value
    value: str = ""
    checked: bool = False
    description: str | None = None
    required: bool = False
    options: list[tuple[str, str]] = field(default_factory=list)
    children: list[FormField] = field(default_factory=list)
    step: str | None = None
    minimum: str | None = None
    maximum: str | None = None
    structural: bool = False
    error: str | None = None
    placeholder: str | None = None

    @property
    def id(self) -> str:
        return field_id(self.loc)

    @property
    def name(self) -> str:
        return ".".join(str(p) for p in self.loc) + f":{self.kind}"

    @property
    def path(self) -> str:
        return ".".join(str(p) for p in self.loc)


# Labels the generated titles ("Lr", "Gpus") get wrong; every other field uses its schema title.
LABELS = {
    "lr": "Learning rate",
    "gpus": "GPUs",
    "kd_weight": "KD weight",
    "n_train": "Labelled training examples",
    "ema_decay": "EMA decay",
    "amp": "Mixed precision",
    "scale_by_t2": "Scale by T²",
    "temperature": "Temperature",
    "as_image": "As image",
    "val_fraction": "Validation fraction",
    "n_layer": "Layers",
    "n_head": "Heads",
    "n_embd": "Width (n_embd)",
    "teacher_input_adapter": "Teacher input adapter",
}


def _label(name: str, schema: dict[str, Any]) -> str:
    if name in LABELS:
        return LABELS[name]
    return str(schema.get("title") or name.replace("_", " ").capitalize())


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the schema behind `$ref` / `anyOf [X, null]`, whether null is allowed)."""
    nullable = False
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        nullable = len(options) < len(schema["anyOf"])
        merged = {k: v for k, v in schema.items() if k != "anyOf"}
        schema = {**options[0], **merged} if len(options) == 1 else {**merged, "anyOf": options}
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**target, **rest}
    return schema, nullable


def _text(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "list" and isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if kind == "json":
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer() and kind == "float":
        return repr(value)
    return str(value)


def scalar_field(
    loc: Loc, schema: dict[str, Any], value: Any, required: bool, defs: dict[str, Any]
) -> FormField:
    """One input for a schema node that is not an object with properties."""
    label = _label(str(loc[-1]), {"title": schema.get("title")})  # the property's, not its type's
    schema, nullable = _resolve(schema, defs)
    present = value if value is not None else schema.get("default")
    base: dict[str, Any] = {
        "loc": loc,
        "label": label,
        "description": schema.get("description"),
        "required": required and not nullable,
        "structural": tuple(loc) in STRUCTURAL,
    }
    kind_of = schema.get("type")
    if "enum" in schema or "const" in schema:
        choices = schema.get("enum") or [schema["const"]]
        options = [(str(c), str(c)) for c in choices]
        return FormField(**base, widget="select", value=_text(present, "str"), options=options)
    if kind_of == "boolean":
        return FormField(**base, widget="checkbox", kind="bool", checked=bool(present))
    if kind_of in ("integer", "number"):
        kind = "int" if kind_of == "integer" else "float"
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        return FormField(
            **base,
            widget="number",
            kind=kind,
            value=_text(present, kind),
            step="1" if kind == "int" else "any",
            minimum=None if low is None else str(low),
            maximum=None if high is None else str(high),
            placeholder="off" if nullable else None,
        )
    if kind_of == "array" and schema.get("items", {}).get("type") in ("integer", "number"):
        return FormField(**base, widget="text", kind="list", value=_text(present, "list"),
                         placeholder="e.g. 64, 32")  # fmt: skip
    if kind_of == "string":
        return FormField(**base, widget="text", value=_text(present, "str"))
    example = "none" if nullable else "JSON, e.g. 0.5 or [0.3, 0.2]"
    return FormField(**base, widget="textarea", kind="json",
                     value="" if present in (None, {}) and nullable else _text(present, "json"),
                     placeholder=example)  # fmt: skip


def object_fields(
    loc: Loc, schema: dict[str, Any], values: dict[str, Any], defs: dict[str, Any], hooks: Any
) -> list[FormField]:
    """A field per property of an object schema; `hooks(loc, prop)` may take a property over."""
    schema, _ = _resolve(schema, defs)
    required = set(schema.get("required", []))
    fields = []
    for name, prop in schema.get("properties", {}).items():
        sub = [*loc, name]
        if tuple(sub) in HIDDEN:
            continue
        taken = hooks(sub, prop) if hooks is not None else None
        if taken is not None:
            fields.extend(taken)
            continue
        value = values.get(name) if isinstance(values, dict) else None
        inner, nullable = _resolve(prop, defs)
        # an optional object (null by default) stays one JSON field, empty meaning null; the
        # teacher and distill sections are null only by kind, which decides whether they show
        optional = nullable and tuple(sub) not in KIND_SECTIONS
        if inner.get("type") == "object" and inner.get("properties") and not optional:
            children = object_fields(sub, inner, value or {}, defs, hooks)
            fields.append(FormField(sub, _label(name, {}), "group",
                                    description=prop.get("description") or inner.get("description"),
                                    children=children))  # fmt: skip
        else:
            fields.append(scalar_field(sub, prop, value, name in required, defs))
    return fields


def params_fields(
    loc: Loc, schema: dict[str, Any] | None, values: dict[str, Any]
) -> list[FormField]:
    """The params fieldset of a catalog entry, from its params JSON Schema."""
    if not schema:
        return [FormField(loc, "Params", "textarea", kind="json", value=_text(values or {}, "json"),
                          description="Keyword params as a JSON object.")]  # fmt: skip
    return object_fields(loc, schema, values or {}, schema.get("$defs", {}), None)


def loss_param_fields(loc: Loc, item: LossItem | None, values: dict[str, Any]) -> list[FormField]:
    """A loss's constructor params, typed from their defaults."""
    if item is None:
        return []
    fields = []
    for param in item.params:
        sub = [*loc, param.name]
        value = values.get(param.name, param.default)
        default = param.default
        if isinstance(default, bool):
            fields.append(FormField(sub, _label(param.name, {}), "checkbox", kind="bool",
                                    checked=bool(value)))  # fmt: skip
        elif isinstance(default, (int, float)):
            kind = "int" if isinstance(default, int) else "float"
            fields.append(FormField(sub, _label(param.name, {}), "number", kind=kind,
                                    value=_text(value, kind),
                                    step="1" if kind == "int" else "any",
                                    required=param.required))  # fmt: skip
        elif isinstance(default, str):
            fields.append(FormField(sub, _label(param.name, {}), "text", value=_text(value, "str")))
        else:
            text = "" if value is None else _text(value, "json")
            fields.append(FormField(sub, _label(param.name, {}), "textarea", kind="json", value=text,
                                    placeholder="none" if default is None else None,
                                    required=param.required))  # fmt: skip
    return fields


def catalog_options(catalog: Catalog, group: str) -> list[tuple[str, str]]:
    items = catalog.models if group == "models" else catalog.datasets
    return [(name, f"{name} — {item.description}") for name, item in sorted(items.items())]


@dataclass
class LayerChoice:
    name: str
    label: str
    shape: list[int] | None


def layer_choices(layers: list[Layer] | None) -> list[LayerChoice]:
    if not layers:
        return [LayerChoice("", "(model output)", None)]
    choices = []
    for layer in layers:
        shape = "×".join(map(str, layer.output_shape)) if layer.output_shape else "no tensor"
        title = "(model output)" if layer.name == "" else layer.name
        choices.append(
            LayerChoice(layer.name, f"{title} · {layer.type} · {shape}", layer.output_shape)
        )
    return choices


def attach_errors(fields: list[FormField], errors: dict[str, str]) -> list[str]:
    """Put each error (keyed by dotted path) on its field; the ones no field claims remain."""
    claimed: set[str] = set()

    def walk(items: list[FormField]) -> None:
        for item in items:
            if item.path in errors:
                item.error = errors[item.path]
                claimed.add(item.path)
            walk(item.children)

    walk(fields)
    return [path for path in errors if path not in claimed]
