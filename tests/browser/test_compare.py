"""Runs page → compare: both runs overlaid, the config diff, view state in the URL, drag-zoom."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import (
    KD_STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    Launched,
    console_log,
    wait_for_charts,
)

pytestmark = pytest.mark.browser


def _hidden(widths: list[int]) -> str:
    return "[" + ",".join(map(str, widths)) + "]"  # the diff shows arrays as compact JSON


def test_compare_selected_runs(page: Page, teacher: Launched, kd: Launched) -> None:
    """Flow 5: select both runs → "Compare selected" → both series drawn, the config diff, log
    y + smoothing in the URL and restored on reload, a drag-zoom refetches finer buckets."""
    page.goto("/")
    page.get_by_label(f"Select {teacher.name}", exact=True).check()
    page.get_by_label(f"Select {kd.name}", exact=True).check()
    page.get_by_role("button", name="Compare selected").click()
    # the form's GET; the page's script may then add the view's defaults (keys) to the URL
    expect(page).to_have_url(re.compile(r"/compare\?run=[0-9a-f]{16}&run=[0-9a-f]{16}(&|$)"))
    assert set(re.findall(r"run=([0-9a-f]{16})", page.url)) == {teacher.id, kd.id}

    chips = page.locator("#compare-runs li")
    expect(chips).to_have_count(2)
    wait_for_charts(page, [teacher.name, kd.name])
    panels = page.locator("#compare-charts .chart-panel")
    assert panels.count() >= 2  # eval/student_acc, train/loss_total and the KD term
    for i in range(panels.count()):
        rows = panels.nth(i).locator(".chart-legend tbody tr")
        expect(rows.filter(has_text=teacher.name)).to_have_count(1)
        expect(rows.filter(has_text=kd.name)).to_have_count(1)
    accuracy = panels.filter(has=page.get_by_role("heading", name="eval/student_acc"))
    expect(accuracy).to_have_count(1)
    expect(accuracy.locator(".chart-note")).to_contain_text(re.compile(r"showing \d+ of \d+"))

    diff = page.locator("#config-diff")
    hidden_row = diff.get_by_role("row").filter(
        has=page.get_by_role("rowheader", name="student.params.hidden", exact=True)
    )
    expect(hidden_row).to_contain_text(_hidden(TEACHER_HIDDEN))
    expect(hidden_row).to_contain_text(_hidden(KD_STUDENT_HIDDEN))
    expect(diff.get_by_role("rowheader", name="kind", exact=True)).to_be_visible()
    expect(diff.get_by_role("rowheader", name="name", exact=True)).to_have_count(0)

    page.get_by_label("log y").check()
    expect(page).to_have_url(re.compile(r"[?&]log=1(&|$)"))
    page.get_by_label("Smoothing").fill("0.6")
    expect(page).to_have_url(re.compile(r"[?&]smooth=0\.6(&|$)"))
    expect(page.locator("#ctl-smooth-value")).to_have_text("0.60")

    page.reload()
    expect(page.get_by_label("log y")).to_be_checked()
    expect(page.get_by_label("Smoothing")).to_have_value("0.6")
    expect(page.locator("#ctl-smooth-value")).to_have_text("0.60")
    wait_for_charts(page, [teacher.name, kd.name])

    over = panels.first.locator(".u-over")
    box = over.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    with page.expect_request(
        lambda r: "/api/compare?" in r.url and "min_step=" in r.url and "max_step=" in r.url
    ) as zoomed:
        page.mouse.move(box["x"] + box["width"] * 0.3, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
        page.mouse.move(box["x"] + box["width"] * 0.7, y, steps=5)
        page.mouse.up()
    first, last = (
        int(re.search(rf"{k}=(\d+)", zoomed.value.url).group(1))  # type: ignore[union-attr]
        for k in ("min_step", "max_step")
    )
    assert 0 < first < last
    expect(page).to_have_url(re.compile(r"[?&]xmin=[\d.]+(&|$)"))
    expect(page).to_have_url(re.compile(r"[?&]xmax=[\d.]+(&|$)"))
    expect(page).to_have_url(re.compile(r"[?&]log=1(&|$)"))  # the rest of the view is kept
    expect(panels.first.locator(".chart-note")).to_contain_text(" between ")
    console_log(page).assert_clean()
