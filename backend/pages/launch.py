"""The launch page (`/runs/new`): a form generated from the RunConfig schema and the catalog;
recipes and clone fill it; validate shows shapes, formula and memory; 422 errors sit beside
their fields; submit → the new run's page."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData
from starlette.responses import Response

from kdlab.backend.api.deps import SessionDep, SettingsDep
from kdlab.backend.api.uploads import receive_upload
from kdlab.backend.errors import Invalid
from kdlab.backend.pages.launch_context import DEFAULT_DRAFT, apply_action, form_context
from kdlab.backend.pages.security import verify_csrf
from kdlab.backend.pages.templating import is_fragment_request, render
from kdlab.backend.services import form_codec, recipes
from kdlab.backend.services import runs as service

router = APIRouter(dependencies=[Depends(verify_csrf)], include_in_schema=False)

PAGE = "pages/launch.html"
FORM = "partials/_launch_form.html"


def _initial_draft(session: SessionDep, recipe: str | None, clone: str | None) -> dict[str, Any]:
    if clone:
        source = service.run_out(service.get_run(session, clone))
        if source.kind == "external":
            raise Invalid.at(["query", "clone"], f"{source.name} ran elsewhere; it has no config")
        draft = copy.deepcopy(source.config)
        draft["name"] = f"{source.name}-clone"
        return draft
    if recipe:
        return recipes.draft_with_teacher(session, recipes.load(recipe).config)
    return copy.deepcopy(DEFAULT_DRAFT)


@router.get("/runs/new")
def launch_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    recipe: str | None = None,
    clone: str | None = None,
) -> Response:
    draft = _initial_draft(session, recipe, clone)
    context = form_context(session, settings, draft)
    context.update(nav="launch", recipes=recipes.listing(), recipe=recipe, clone=clone)
    return render(request, PAGE, context)


@dataclass
class Submitted:
    """A submitted launch form: the draft config, fields that did not read, the form controls."""

    draft: dict[str, Any]
    errors: dict[str, str]
    action: str | None
    weights_source: str | None


def _submitted(fields: list[tuple[str, str]]) -> Submitted:
    draft, problems = form_codec.decode(fields)
    controls = {name: value for name, value in fields if name.startswith("_")}
    source = controls.get("_weights_source")
    teacher = draft.get("teacher")
    weights = teacher.get("weights") if isinstance(teacher, dict) else None
    if isinstance(teacher, dict) and isinstance(weights, dict):
        if source in ("run", "upload"):  # only the chosen source's pick counts
            weights.pop("upload_id" if source == "run" else "run_id", None)
        if not weights.get("run_id") and not weights.get("upload_id"):
            teacher.pop("weights")  # nothing picked: a randomly initialised teacher
    return Submitted(
        draft,
        {".".join(map(str, p.loc)): p.msg for p in problems},
        controls.get("_action"),
        source,
    )


def _items(form: FormData) -> list[tuple[str, str]]:
    return [(k, v) for k, v in form.multi_items() if isinstance(v, str)]


def _errors_by_path(err: Invalid) -> dict[str, str]:
    """422 entries keyed by the dotted path of the field they name (the leading `body` cut)."""
    found: dict[str, str] = {}
    items: list[dict[str, Any]] = err.detail  # type: ignore[assignment]  # Invalid's is a list
    for item in items:
        loc = [p for p in item["loc"] if p not in ("body", "config")]
        path = ".".join(map(str, loc))
        found[path] = f"{found[path]} {item['msg']}" if path in found else item["msg"]
    return found


def _form(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    form: Submitted,
    errors: dict[str, str],
    report: Any = None,
    status_code: int = 200,
) -> Response:
    context = form_context(
        session,
        settings,
        form.draft,
        errors=errors,
        report=report,
        weights_source=form.weights_source,
    )
    context.update(nav="launch", recipes=recipes.listing(), recipe=None, clone=None)
    return render(request, PAGE, context, partial=FORM, status_code=status_code)


@router.get("/runs/new/form")
def refresh_form(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """Re-render the form from its current values (a model, loss or kind was picked, a pair
    added or removed): the fields that depend on the choice follow it."""
    form = _submitted(list(request.query_params.multi_items()))
    apply_action(session, form.draft, form.action)
    return _form(request, session, settings, form, form.errors)


def _attempt(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    form: Submitted,
    action: Callable[[dict[str, Any]], Any],
) -> Any:
    """`action(draft)`, or the form again with each error beside its field (a 422 Response)."""
    errors = form.errors
    if not errors:
        try:
            return action(form.draft)
        except Invalid as err:
            errors = _errors_by_path(err)
    return _form(request, session, settings, form, errors, status_code=422)


@router.post("/runs/new/validate")
async def validate(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """Every check of a launch without launching: pair shapes, the loss formula in effect and
    the memory estimate, or each error beside its field (422)."""
    form = _submitted(_items(await request.form()))
    report = _attempt(
        request, session, settings, form, partial(service.validate, session, settings)
    )
    if isinstance(report, Response):
        return report
    return _form(request, session, settings, form, {}, report=report)


@router.post("/runs/new")
async def launch(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    form = _submitted(_items(await request.form()))
    run = _attempt(request, session, settings, form, partial(service.create_run, session, settings))
    if isinstance(run, Response):
        return run
    target = f"/runs/{run.id}"
    if is_fragment_request(request):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return Response(status_code=303, headers={"Location": target})


@router.post("/runs/new/upload")
async def upload_teacher(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
) -> Response:
    """Upload teacher weights from the form; answers the teacher-weights picker with the new
    upload chosen."""
    upload = await receive_upload(request, session, settings)
    draft = {"kind": "distill", "teacher": {"weights": {"upload_id": upload.id}}}
    context = form_context(session, settings, draft)
    context["upload_message"] = f"Uploaded {upload.filename} ({upload.tensor_count} tensors)."
    return render(request, "partials/_teacher_weights.html", context)
