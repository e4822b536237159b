"""The launch form: generated from the schema and catalog, round-trips a recipe exactly, shows
layer shapes and offers an adapter, puts 422 errors beside their fields."""

from __future__ import annotations

import re

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from kdlab.backend.db.models import Run
from kdlab.backend.services import recipes
from kdlab.worker import kd
from kdlab.worker.config import RunConfig
from kdlab.worker.loss_formula import loss_formula
from kdlab.worker.models import MLP
from tests.factories import create_run
from tests.pages.form_html import as_form, form_fields, replace


def _csrf(html: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)  # type: ignore[union-attr]


def _submit(client: TestClient, fields: list[tuple[str, str]], url: str = "/runs/new"):
    return client.post(url, data=as_form(fields), follow_redirects=False)


def test_a_recipe_submitted_unchanged_creates_exactly_its_config(
    client: TestClient, db_session: Session
) -> None:
    page = client.get("/runs/new?recipe=digits-teacher")
    assert page.status_code == 200
    fields = form_fields(page.text, "launch-form")
    assert ("student.params.hidden:list", "256, 256") in fields
    assert ("train.epochs:int", "20") in fields
    answer = _submit(client, fields)
    assert answer.status_code == 303, answer.text[:2000]
    run = db_session.get(Run, answer.headers["location"].rsplit("/", 1)[-1])
    assert run is not None
    expected = RunConfig.model_validate(recipes.load("digits-teacher").config)
    assert run.config == expected.model_dump(mode="json") | {
        # the form writes every param it shows: the catalog's defaults, explicitly
        "dataset": expected.dataset.model_dump() | {"params": {"as_image": False}},
        "student": {
            "name": "mlp",
            "params": {"hidden": [256, 256], "dropout": 0.0, "activation": "relu"},
        },
    }


def test_htmx_submit_redirects_to_the_new_run(client: TestClient) -> None:
    page = client.get("/runs/new?recipe=digits-teacher")
    fields = replace(form_fields(page.text, "launch-form"), "name:str", "via-htmx")
    answer = client.post(
        "/runs/new",
        data=as_form(fields),
        headers={"HX-Request": "true", "X-CSRF-Token": _csrf(page.text)},
    )
    assert answer.status_code == 204 and answer.headers["HX-Redirect"].startswith("/runs/")


def test_errors_sit_beside_the_fields_they_name(client: TestClient) -> None:
    fields = form_fields(client.get("/runs/new?recipe=digits-teacher").text, "launch-form")
    fields = replace(replace(fields, "name:str", "bad name!"), "train.epochs:int", "0")
    answer = client.post("/runs/new", data=as_form(fields), headers={"HX-Request": "true"})
    assert answer.status_code == 422
    html = answer.text
    assert html.lstrip().startswith('<form id="launch-form"')
    name_error = re.search(r'<p class="field-error" id="f-name-error">([^<]+)</p>', html)
    epochs_error = re.search(r'<p class="field-error" id="f-train-epochs-error">([^<]+)</p>', html)
    assert name_error and "pattern" in name_error.group(1)
    assert epochs_error and "greater than or equal to 1" in epochs_error.group(1)
    assert re.search(r'id="f-train-epochs"[^>]*aria-invalid="true"', html)
    assert ("bad name!" in html) and ('value="0"' in html)  # what was typed stays


def test_a_field_that_does_not_read_is_refused_before_validation(client: TestClient) -> None:
    fields = form_fields(client.get("/runs/new?recipe=digits-teacher").text, "launch-form")
    answer = _submit(client, replace(fields, "train.optimizer.lr:float", "fast"))
    assert answer.status_code == 422
    assert (
        "&#39;fast&#39; is not a number" in answer.text or "'fast' is not a number" in answer.text
    )


def test_layer_pairs_show_shapes_and_offer_an_adapter(client: TestClient) -> None:
    page = client.get("/runs/new?recipe=digits-fitnet-kd").text
    # an MLP on digits (batch 2): `features` of [16] → [2, 16], of [256, 256] → [2, 256]
    assert "features · Sequential · 2×16" in page and "features · Sequential · 2×256" in page
    assert "(model output) · MLP · 2×10" in page
    assert "an adapter is learned" in page
    fields = form_fields(client.get("/runs/new?recipe=digits-logits-kd").text, "launch-form")
    fields = replace(fields, "distill.pairs.0.student_layer:str", "features")
    mismatch = client.get("/runs/new/form", params=fields, headers={"HX-Request": "true"})
    assert "Shapes differ (student 2×16 vs teacher 2×10)" in mismatch.text
    assert 'value="feature_mse:0"' in mismatch.text
    fixed = client.get(
        "/runs/new/form",
        params=[*fields, ("_action", "feature_mse:0")],
        headers={"HX-Request": "true"},
    )
    assert re.search(r'<option value="feature_mse" selected>', fixed.text)
    assert "an adapter is learned" in fixed.text


def test_picking_a_teacher_run_adopts_its_architecture(
    client: TestClient, db_session: Session
) -> None:
    teacher = create_run(db_session, name="wide-teacher", status="succeeded")  # mlp [64]
    fields = form_fields(client.get("/runs/new?recipe=digits-logits-kd").text, "launch-form")
    fields = replace(fields, "teacher.weights.run_id:str", teacher.id)
    page = client.get(
        "/runs/new/form",
        params=[*fields, ("_action", "adopt_teacher")],
        headers={"HX-Request": "true"},
    )
    adopted = form_fields(page.text, "launch-form")
    assert ("teacher.params.hidden:list", "64") in adopted
    assert ("teacher.weights.run_id:str", teacher.id) in adopted


def test_kind_train_drops_the_teacher_sections(client: TestClient) -> None:
    fields = form_fields(client.get("/runs/new").text, "launch-form")
    page = client.get(
        "/runs/new/form",
        params=replace(fields, "kind:str", "train"),
        headers={"HX-Request": "true"},
    )
    names = {name for name, _ in form_fields(page.text, "launch-form")}
    assert not any(n.startswith(("teacher.", "distill.")) for n in names)


def test_clone_fills_the_form_from_a_run(client: TestClient, db_session: Session) -> None:
    source = create_run(db_session, name="orig", status="succeeded")
    fields = form_fields(client.get(f"/runs/new?clone={source.id}").text, "launch-form")
    assert ("name:str", "orig-clone") in fields and ("student.params.hidden:list", "64") in fields


def test_check_shows_formula_and_memory(client: TestClient) -> None:
    fields = form_fields(client.get("/runs/new?recipe=digits-logits-kd").text, "launch-form")
    fields = replace(fields, "teacher.weights.run_id:str", "")
    fields = replace(fields, "distill.allow_weak_teacher:bool", "true")
    page = client.post("/runs/new/validate", data=as_form(fields), headers={"HX-Request": "true"})
    assert page.status_code == 200, page.text[:3000]
    assert 'id="validation-report"' in page.text
    assert "0.3·[cross_entropy(student_logits, labels)" in page.text
    assert "Memory per GPU for one step" in page.text


@pytest.mark.parametrize("recipe", ["digits-logits-kd", "digits-fitnet-kd"])
def test_the_checked_formula_is_the_one_training_reports(client: TestClient, recipe: str) -> None:
    """The dry run's formula (adapters set up on meta) equals what a real DistillationModel of
    the same config describes, through the trainer's own formula function."""
    body = recipes.load(recipe).config | {"distill": {**recipes.load(recipe).config["distill"],
                                                      "allow_weak_teacher": True}}  # fmt: skip
    answer = client.post("/api/runs/validate", json=body)
    assert answer.status_code == 200, answer.text
    config = RunConfig.model_validate(body)
    assert config.distill is not None
    criterion = {
        (p.student_layer, p.teacher_layer): kd.losses.build_loss(p.loss.name, p.loss.params)
        for p in config.distill.pairs
    }
    balancer = kd.build_balancer(config.distill.balancer.name, config.distill.balancer.params)
    student = MLP(64, config.student.params["hidden"], 10)
    dm = kd.convert(student, teacher=MLP(64, [256, 256], 10), criterion=criterion,
                    balancer=balancer, example_input=torch.zeros(2, 64))  # fmt: skip
    expected = loss_formula(config, dm.describe_kd_loss())["formula"]
    assert answer.json()["loss_formula"] == expected
