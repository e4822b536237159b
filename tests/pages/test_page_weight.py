"""No page ships more than 300 KB of JavaScript: every script a page loads, with every module
it imports, followed through the files as a browser would fetch them."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from kdlab.backend.pages.templating import STATIC_DIR
from tests.factories import create_run

BUDGET_BYTES = 300_000
IMPORT = re.compile(
    r"""(?:import|export)\s[^;]*?from\s*["']([^"']+)["']|import\s*["']([^"']+)["']"""
)


def _module_graph(entry: Path) -> set[Path]:
    seen: set[Path] = set()
    pending = [entry]
    while pending:
        path = pending.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        for match in IMPORT.finditer(path.read_text(encoding="utf-8")):
            target = match.group(1) or match.group(2)
            pending.append(path.parent / target)
    return seen


def _shipped_js(html: str) -> set[Path]:
    files: set[Path] = set()
    for src in re.findall(r'<script[^>]*\ssrc="[^"]*?/static/([^"]+)"', html):
        files |= _module_graph(STATIC_DIR / src)
    return files


def test_every_page_stays_under_300_kb_of_js(client: TestClient, db_session: Session) -> None:
    run = create_run(db_session, name="weighed", status="succeeded")
    pages = ["/", "/runs/new", f"/runs/{run.id}", f"/compare?run={run.id}", "/compare"]
    weights = {}
    for url in pages:
        html = client.get(url).text
        files = _shipped_js(html)
        assert any(f.name.startswith("htmx-2") for f in files), url
        weights[url] = sum(f.stat().st_size for f in files)
    assert all(size <= BUDGET_BYTES for size in weights.values()), weights
    # the chart pages really load the chart code (the graph is followed, not just the entry)
    compare = _shipped_js(client.get(f"/compare?run={run.id}").text)
    assert any(f.name.startswith("uPlot-") for f in compare)
