"""The run page: download the exported student; a running run on its page (axe), cancelled."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from playwright.sync_api import Page, expect
from safetensors.torch import load_file

from kdlab.worker.catalog import DataInfo, build_model
from kdlab.worker.config import ModelSpec
from tests.browser.conftest import (
    KD_STUDENT_HIDDEN,
    Launched,
    Server,
    assert_no_axe_violations,
    assert_same_document,
    console_log,
    mark_document,
    unique,
    wait_for_charts,
)

pytestmark = pytest.mark.browser

DIGITS = DataInfo(
    task="classification", num_classes=10, input_shape=(64,), input_dtype=torch.float32
)


def test_download_student_matches_the_architecture(
    page: Page, kd: Launched, tmp_path: Path
) -> None:
    """Flow 6: "Download student (.safetensors)" gives the weights of an mlp of the run's widths
    on digits (64 inputs, 10 classes)."""
    page.goto(f"/runs/{kd.id}")
    expect(page.locator("#run-status")).to_have_text("succeeded")
    wait_for_charts(page)
    expect(page.get_by_role("heading", name="Loss in effect")).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download student (.safetensors)").click()
    assert download.value.failure() is None
    assert download.value.suggested_filename.endswith(".safetensors")
    saved = tmp_path / "student.safetensors"
    download.value.save_as(saved)
    tensors = load_file(saved)
    model = build_model(ModelSpec(name="mlp", params={"hidden": KD_STUDENT_HIDDEN}), DIGITS)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert any(shape == (KD_STUDENT_HIDDEN[0], 64) for shape in expected.values())
    assert any(shape == (10, KD_STUDENT_HIDDEN[-1]) for shape in expected.values())
    console_log(page).assert_clean()


LONG_EPOCHS = 200


@pytest.fixture(scope="module")
def long_run(server: Server, kd: Launched) -> Iterator[dict]:
    """A 200-epoch teacher launched through the API (after the shared runs finished, so it
    takes the CPU slot at once); cancelled on the way out if a test left it running."""
    config = {
        "name": unique("long-teacher"),
        "experiment": "browser-cancel",
        "kind": "train",
        "dataset": {"name": "digits"},
        "student": {"name": "mlp", "params": {"hidden": [32]}},
        "train": {"epochs": LONG_EPOCHS},
    }
    run = server.create_run(config)
    try:
        yield run
    finally:
        if server.run(run["id"])["status"] not in ("succeeded", "failed", "cancelled"):
            server.api.post(f"/api/runs/{run['id']}/cancel")


def test_axe_on_running_run_page(
    open_page: Callable[..., Page], server: Server, long_run: dict
) -> None:
    """Flow 9, the run page while it runs (live progress, cancel button, SSE-swapped head)."""
    page = open_page(server, bypass_csp=True)
    page.goto(f"/runs/{long_run['id']}")
    expect(page.locator("#run-status")).to_have_text("running", timeout=90_000)
    expect(page.locator("#run-head progress")).to_be_visible()
    wait_for_charts(page)
    assert_no_axe_violations(page, "the run page of a running run")


def test_cancel_running_run(page: Page, long_run: dict) -> None:
    """Flow 7: "Cancel run" (confirmed) → the badge reaches `cancelled` without a reload."""
    page.goto(f"/runs/{long_run['id']}")
    mark_document(page)
    status = page.locator("#run-status")
    expect(status).to_have_text("running", timeout=90_000)
    dialogs: list[str] = []

    def accept(dialog):  # the hx-confirm question
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith("/cancel")
    ) as answer:
        page.get_by_role("button", name="Cancel run").click()
    assert answer.value.status == 200
    assert dialogs and long_run["name"] in dialogs[0]
    expect(status).to_have_text(re.compile(r"^(running \(cancelling\)|cancelled)$"))
    expect(status).to_have_text("cancelled", timeout=60_000)
    expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)
    assert_same_document(page)
    console_log(page).assert_clean()
