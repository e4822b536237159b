"""The launch form in a real browser: recipes, the teacher picker, the layer-pair picker, 422
errors beside their fields, "Check", and a launched run followed live on its page."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import (
    KD_STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    TEACHER_LR,
    TRAIN_TIMEOUT_MS,
    Launched,
    Server,
    assert_no_axe_violations,
    assert_same_document,
    console_log,
    is_form_post,
)

pytestmark = pytest.mark.browser


def test_launch_teacher_from_recipe_and_watch_it_succeed(teacher_launch: Launched) -> None:
    """Flow 1: the form landed on /runs/{id}; the badge turns `succeeded` over SSE, no reload."""
    page = teacher_launch.page
    expect(page).to_have_url(re.compile(rf"/runs/{teacher_launch.id}$"))
    expect(page.get_by_role("heading", level=1)).to_have_text(teacher_launch.name)
    status = page.locator("#run-status")
    expect(status).to_have_text("succeeded", timeout=TRAIN_TIMEOUT_MS)
    expect(status).to_have_attribute("data-status", "succeeded")
    assert_same_document(page)
    facts = page.locator("dl.facts")
    expect(facts).to_contain_text("train")
    expect(facts).to_contain_text(f"hidden={TEACHER_HIDDEN}")
    config = page.locator("#config-json")
    expect(config).to_contain_text('"epochs": 2')
    expect(config).to_contain_text(f'"lr": {TEACHER_LR}')
    console_log(page).assert_clean()


def test_launch_distill_with_picked_teacher(kd_launch: Launched, teacher: Launched) -> None:
    """Flow 2: picking the teacher run set the teacher's model to the one that run trained; the
    KD run lands on its page and succeeds live."""
    assert kd_launch.shown["teacher_hidden"] == ", ".join(map(str, TEACHER_HIDDEN))
    assert kd_launch.shown["picked"].startswith(teacher.name)
    page = kd_launch.page
    expect(page.get_by_role("heading", level=1)).to_have_text(kd_launch.name)
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=TRAIN_TIMEOUT_MS)
    assert_same_document(page)
    facts = page.locator("dl.facts")
    expect(facts).to_contain_text("distill")
    expect(facts.get_by_role("link", name=teacher.name)).to_have_attribute(
        "href", f"/runs/{teacher.id}"
    )
    expect(facts).to_contain_text(f"hidden={KD_STUDENT_HIDDEN}")
    expect(facts).to_contain_text(f"hidden={TEACHER_HIDDEN}")
    console_log(page).assert_clean()


def test_mismatched_layer_pair_offers_an_adapter(page: Page) -> None:
    """Flow 3: a student layer whose shape differs from the teacher's output → a notice and a
    button that switches the pair to feature_mse with a learned adapter."""
    page.goto("/runs/new?recipe=digits-logits-kd")
    student_layer = page.get_by_label("Student layer").first
    expect(student_layer).to_have_id("f-distill-pairs-0-student-layer")
    with page.expect_response(lambda r: "/runs/new/form" in r.url):
        student_layer.select_option("features")
    notice = page.locator("#pair-0-shapes")
    expect(notice).to_contain_text("Shapes differ")
    offer = notice.get_by_role("button", name="Use feature_mse with an auto adapter")
    with page.expect_response(lambda r: "/runs/new/form" in r.url and "feature_mse" in r.url):
        offer.click()
    expect(page.locator("#f-distill-pairs-0-loss-name")).to_have_value("feature_mse")
    expect(page.locator("#f-distill-pairs-0-student-layer")).to_have_value("features")
    expect(page.locator("#pair-0-shapes")).to_contain_text("an adapter is learned")
    console_log(page).assert_clean()


# Chrome logs every 4xx answer of a fetch/XHR as a console error; the 422 is the point here.
REJECTED = (r"status of 422",)


def test_invalid_form_shows_errors_beside_fields(
    open_page: Callable[..., Page], server: Server
) -> None:
    """Flow 4: a bad name and 0 epochs → a 422 re-render with each message beside its field;
    axe on that state."""
    page = open_page(server, bypass_csp=True)
    page.goto("/runs/new?recipe=digits-teacher")
    name = page.locator("#f-name")
    name.fill("bad name!")
    epochs = page.get_by_label("Epochs", exact=True)
    epochs.fill("0")
    with page.expect_response(is_form_post("/runs/new")) as answer:
        page.get_by_role("button", name="Launch run").click()
    assert answer.value.status == 422
    expect(page).to_have_url(re.compile(r"/runs/new\?recipe=digits-teacher$"))
    expect(page.get_by_role("alert")).to_contain_text("Some fields need attention")
    expect(page.locator("#f-name-error")).to_be_visible()
    expect(page.locator("#f-name-error")).to_contain_text(re.compile(r"pattern|letters", re.I))
    expect(name).to_have_attribute("aria-invalid", "true")
    expect(name).to_have_attribute("aria-describedby", re.compile(r"\bf-name-error\b"))
    expect(name).to_have_value("bad name!")  # what was typed stays
    epochs_error = page.locator("#f-train-epochs-error")
    expect(epochs_error).to_contain_text(re.compile(r"greater than or equal to 1|at least", re.I))
    expect(epochs).to_have_attribute("aria-invalid", "true")
    assert_no_axe_violations(page, "the launch form after a 422")
    console_log(page).assert_clean(allow=REJECTED)


def test_check_shows_formula_and_memory(page: Page) -> None:
    """Flow 4, continued: "Check" on a valid form shows the validation report."""
    page.goto("/runs/new?recipe=digits-logits-kd")
    with page.expect_response(is_form_post("/runs/new/validate")) as answer:
        page.get_by_role("button", name="Check").click()
    assert answer.value.status == 200
    report = page.locator("#validation-report")
    expect(report).to_be_visible()
    expect(report.get_by_role("heading")).to_have_text("Checked: ready to launch")
    formula = report.locator("code.formula")
    expect(formula).to_contain_text("KL")
    expect(report).to_contain_text(re.compile(r"Memory per GPU for one step: \d[\d.]* (B|KiB|MiB)"))
    expect(report.get_by_role("table")).to_contain_text("(model output)")
    console_log(page).assert_clean()
