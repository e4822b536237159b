"""Real-browser tests: a real `kdlab serve` subprocess driven by Debian's chromium (Playwright).

- `server` (session): `kdlab serve` on a free port and a fresh data dir, the local executor
  training for real; `token_server` (session): the same with `KDLAB_TOKEN` set (sign-in tests).
  Both stop with SIGTERM to their process group (SIGKILL after a timeout), after cancelling
  whatever still runs on them.
- `browser` (session): one chromium; `open_page(server, ...)` a fresh context + page per call,
  closed after the test; `page` = `open_page(server)` in light mode at 1280×900.
- `teacher` / `kd` (session): a digits teacher and a KD student launched once through the
  launch form and shared by every module (flows 1 and 2 assert on how they were launched).
- `console_log(page)` collects console errors; `assert_no_axe_violations(page)` runs axe-core.

Without /usr/bin/chromium every test here is skipped (with the reason), unless
KDLAB_REQUIRE_BROWSER=1 (CI), where a missing browser is a failure. Never `playwright install`:
nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.conftest import free_port

CHROMIUM = Path(os.environ.get("KDLAB_CHROMIUM", "/usr/bin/chromium"))
REQUIRE_BROWSER = os.environ.get("KDLAB_REQUIRE_BROWSER") == "1"
# chromium must not reach anything but this machine (no DNS, no update checks)
CHROMIUM_ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1"]

BROWSER_MISSING = (
    None
    if CHROMIUM.exists()
    else f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium); "
    "with KDLAB_REQUIRE_BROWSER=1 its absence is a failure"
)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 900}
RUN_URL = re.compile(r"/runs/([0-9a-f]{16})$")
FINISHED = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "starting", "running")
TRAIN_TIMEOUT_MS = 120_000  # a 2-epoch digits run takes ~10 s alone; generous for a busy CI box
TEACHER_HIDDEN = [64, 32]  # not the recipe's teacher (2×256): picking the run must change it
TEACHER_LR = "0.01"
KD_STUDENT_HIDDEN = [16]  # the logits-KD recipe's student

expect.set_options(timeout=15_000)

# Module order: the launch flows first, so flow 1 watches its run finish live; the long run of
# the cancel test last but one, so it never holds the CPU slot while another run waits.
MODULE_ORDER = (
    "test_launch.py",
    "test_compare.py",
    "test_run_page.py",
    "test_auth.py",
    "test_a11y.py",
    "test_screenshots.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip this directory without chromium (unless required); order its modules."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if Path(item.path).parent == here]
    if BROWSER_MISSING is not None and not REQUIRE_BROWSER:
        for i in slots:
            items[i].add_marker(pytest.mark.skip(reason=BROWSER_MISSING))

    def rank(item: pytest.Item) -> int:
        name = Path(item.path).name
        return MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER)

    ordered = sorted((items[i] for i in slots), key=rank)  # stable: file order within a module
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item


# --------------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A running `kdlab serve`; `api` is an httpx client on it (with the admin token if any)."""

    url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    token: str | None = None
    api: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.api = httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def run(self, run_id: str) -> dict[str, Any]:
        answer = self.api.get(f"/api/runs/{run_id}")
        answer.raise_for_status()
        return answer.json()

    def create_run(self, config: dict[str, Any]) -> dict[str, Any]:
        answer = self.api.post("/api/runs", json=config)
        assert answer.status_code == 201, answer.text
        return answer.json()

    def wait_for_status(self, run_id: str, wanted: str, timeout: float) -> dict[str, Any]:
        """Polls the API (fixtures only: tests watch the page)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run["status"] == wanted:
                return run
            if run["status"] in FINISHED or time.monotonic() > deadline:
                pytest.fail(
                    f"run {run['name']} is {run['status']}, not {wanted} "
                    f"(error: {run.get('error')})\n--- server log ---\n{self.log()}"
                )
            time.sleep(0.5)

    def active_run_ids(self) -> list[str]:
        answer = self.api.get("/api/runs", params={"limit": 200})
        answer.raise_for_status()
        return [r["id"] for r in answer.json()["runs"] if r["status"] in ACTIVE]


def _start_server(
    data_dir: Path, token: str | None = None, demo: bool = False, cpu_slots: int = 1
) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDLAB_")}
    env.update(
        KDLAB_EXECUTOR="local",
        KDLAB_MLFLOW_TRACKING_URI="none",  # no mirror: nothing here looks at MLflow
        KDLAB_SWEEP_INTERVAL_SECONDS="0.5",
        KDLAB_CANCEL_GRACE_SECONDS="10",
        KDLAB_CPU_SLOTS=str(cpu_slots),
        PYTHONUNBUFFERED="1",
    )
    if token is not None:
        env["KDLAB_TOKEN"] = token
    log_path = data_dir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kdlab.backend.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                *(["--demo"] if demo else []),
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
        )
    server = Server(f"http://127.0.0.1:{port}", data_dir, log_path, process, token)
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            pytest.fail(f"kdlab serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/api/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            _stop_server(server)
            pytest.fail(f"kdlab serve did not answer /api/health within 90 s:\n{server.log()}")
        time.sleep(0.25)


def _worker_groups(run_ids: list[str]) -> list[int]:
    """Process groups of local workers still training one of these runs (started by our server:
    `python -m kdlab.worker.run --run-id <id>` in a session of its own)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "kdlab.worker.run" in words and any(r in words for r in run_ids):
            try:
                found.append(os.getpgid(int(proc.name)))
            except ProcessLookupError:
                continue
    return sorted(set(found))


def _stop_server(server: Server) -> None:
    """Cancel what still runs (workers outlive the server by design), then SIGTERM the server's
    process group, SIGKILL after 20 s."""
    active: list[str] = []
    if server.process.poll() is None:
        try:
            active = server.active_run_ids()
            for run_id in active:
                server.api.post(f"/api/runs/{run_id}/cancel")
            deadline = time.monotonic() + 30
            while server.active_run_ids() and time.monotonic() < deadline:
                time.sleep(0.5)
        except httpx.HTTPError:
            pass
    server.api.close()
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
    for group in _worker_groups(active):  # a worker that ignored the cancel
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An open-access server (loopback, no token): the one most tests use."""
    s = _start_server(tmp_path_factory.mktemp("kdlab-browser") / "data")
    try:
        yield s
    finally:
        _stop_server(s)
        shutil.rmtree(s.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`kdlab serve --demo` with its three runs finished: what a newcomer sees (the README's
    screenshots). Teacher and student-alone train side by side (2 CPU slots)."""
    from kdlab.backend.services.dispatch import DEMO_KD

    s = _start_server(tmp_path_factory.mktemp("kdlab-demo") / "data", demo=True, cpu_slots=2)
    try:
        deadline = time.monotonic() + 300
        while not any(r["name"] == DEMO_KD for r in s.api.get("/api/runs").json()["runs"]):
            if time.monotonic() > deadline:
                pytest.fail(f"the demo's KD student was never queued:\n{s.log()}")
            time.sleep(1)
        for run in s.api.get("/api/runs").json()["runs"]:
            s.wait_for_status(run["id"], "succeeded", timeout=300)
        yield s
    finally:
        _stop_server(s)
        shutil.rmtree(s.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server protected by KDLAB_TOKEN: pages need a sign-in. It has no runs."""
    s = _start_server(
        tmp_path_factory.mktemp("kdlab-browser-token") / "data", secrets.token_hex(16)
    )
    try:
        yield s
    finally:
        _stop_server(s)
        shutil.rmtree(s.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------------- browser


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"KDLAB_REQUIRE_BROWSER=1 but there is no chromium at {CHROMIUM}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class ConsoleLog:
    """Console errors and uncaught exceptions of a page, as a person with devtools would see."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.errors.append(f"uncaught: {err}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            where = message.location.get("url", "") if message.location else ""
            self.errors.append(f"{message.text} ({where})" if where else message.text)

    def assert_clean(self, allow: tuple[str, ...] = ()) -> None:
        """No error, except those matching one of the `allow` regexes."""
        left = [e for e in self.errors if not any(re.search(a, e) for a in allow)]
        assert not left, "console errors:\n" + "\n".join(left)


def new_context(browser: Browser, base_url: str, **options: Any) -> BrowserContext:
    options.setdefault("color_scheme", "light")
    options.setdefault("viewport", VIEWPORT)
    context = browser.new_context(base_url=base_url, **options)
    context.set_default_timeout(20_000)
    return context


def new_page(browser: Browser, base_url: str, **options: Any) -> tuple[BrowserContext, Page]:
    context = new_context(browser, base_url, **options)
    page = context.new_page()
    page.console_log = ConsoleLog(page)  # type: ignore[attr-defined]
    return context, page


def console_log(page: Page) -> ConsoleLog:
    return page.console_log  # type: ignore[attr-defined]


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """`open_page(server, color_scheme=..., bypass_csp=...)`: a page in a fresh context."""
    contexts: list[BrowserContext] = []

    def make(target: Server, **options: Any) -> Page:
        context, page = new_page(browser, target.url, **options)
        contexts.append(context)
        return page

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def page(open_page: Callable[..., Page], server: Server) -> Page:
    return open_page(server)


@pytest.fixture
def axe_page(open_page: Callable[..., Page], server: Server) -> Page:
    """A page in a context that bypasses the CSP, so axe-core can be injected."""
    return open_page(server, bypass_csp=True)


# --------------------------------------------------------------------------------- axe


def assert_no_axe_violations(page: Page, what: str) -> None:
    """axe-core over the whole page; any violation of impact serious or critical fails."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    bad = [
        v
        for v in results.response.get("violations", [])
        if v.get("impact") in ("serious", "critical")
    ]
    lines = []
    for v in bad:
        lines.append(f"- {v['id']} ({v['impact']}): {v['help']}  [{v.get('helpUrl', '')}]")
        for node in v.get("nodes", [])[:8]:
            lines.append(f"    {node.get('target')}: {node.get('failureSummary', '').strip()}")
    assert not bad, f"axe on {what}: {len(bad)} serious/critical violation(s)\n" + "\n".join(lines)


# --------------------------------------------------------------------------------- helpers


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def mark_document(page: Page) -> None:
    """Tags the current document: `assert_same_document` then proves no reload happened."""
    page.evaluate("window.__kdlabDocument = 'kept'")


def assert_same_document(page: Page) -> None:
    assert page.evaluate("window.__kdlabDocument") == "kept", "the page was reloaded"


def is_form_post(path: str) -> Callable[[Any], bool]:
    return lambda r: r.request.method == "POST" and r.url.split("?")[0].endswith(path)


def submit_launch_form(page: Page) -> str:
    """Clicks "Launch run" (an htmx POST answered with HX-Redirect) and waits for the run page;
    returns the new run's id."""
    with page.expect_response(is_form_post("/runs/new")) as answer:
        page.get_by_role("button", name="Launch run").click()
    assert answer.value.status == 204, f"launch answered {answer.value.status}"
    expect(page).to_have_url(RUN_URL)
    match = RUN_URL.search(page.url)
    assert match is not None
    return match.group(1)


def wait_for_charts(page: Page, names: list[str] | None = None) -> None:
    """Every chart panel has drawn: a canvas, and a legend row with data (a run without the
    panel's metric has a hidden row); the runs named, if given."""
    panels = page.locator(".chart-panel")
    expect(panels.first).to_be_visible()
    for i in range(panels.count()):
        panel = panels.nth(i)
        expect(panel.locator(".chart-legend tbody tr:not([hidden])").first).to_be_visible()
        expect(panel.locator(".u-over")).to_have_count(1)
        for name in names or []:
            expect(panel.locator(".chart-legend")).to_contain_text(name)


@dataclass
class Launched:
    """A run launched through the form; `page` still shows its run page (never reloaded)."""

    id: str
    name: str
    page: Page
    shown: dict[str, str] = field(default_factory=dict)  # what the form showed before submit


@pytest.fixture(scope="session")
def teacher_launch(browser: Browser, server: Server) -> Iterator[Launched]:
    """Flow 1's actions: the digits-teacher recipe, epochs typed down to 2, a unique name and
    a smaller MLP, "Launch run" → the run page (left open, watching the run over SSE)."""
    context, page = new_page(browser, server.url)
    name = unique("ui-teacher")
    page.goto("/runs/new?recipe=digits-teacher")
    expect(page.get_by_role("heading", name="Launch a run")).to_be_visible()
    page.locator("#f-name").fill(name)
    epochs = page.get_by_label("Epochs", exact=True)
    epochs.fill("")
    epochs.press_sequentially("2")
    page.get_by_label("Hidden", exact=True).fill(", ".join(map(str, TEACHER_HIDDEN)))
    page.get_by_label("Learning rate", exact=True).fill(
        TEACHER_LR
    )  # a teacher worth distilling in 2 epochs
    run_id = submit_launch_form(page)
    mark_document(page)
    try:
        yield Launched(run_id, name, page)
    finally:
        context.close()


@pytest.fixture(scope="session")
def teacher(teacher_launch: Launched, server: Server) -> Launched:
    """The teacher, succeeded."""
    server.wait_for_status(teacher_launch.id, "succeeded", TRAIN_TIMEOUT_MS / 1000)
    return teacher_launch


@pytest.fixture(scope="session")
def kd_launch(browser: Browser, server: Server, teacher: Launched) -> Iterator[Launched]:
    """Flow 2's actions: the logits-KD recipe, the teacher picked in the teacher picker (which
    re-renders the form with that run's architecture), epochs 2, "Launch run"."""
    context, page = new_page(browser, server.url)
    name = unique("ui-kd")
    page.goto("/runs/new?recipe=digits-logits-kd")
    picker = page.get_by_label("Teacher run", exact=True)
    expect(picker).to_be_visible()
    with page.expect_response(lambda r: "/runs/new/form" in r.url) as refreshed:
        picker.select_option(teacher.id)
    assert refreshed.value.status == 200
    hidden = page.locator("#f-teacher-params-hidden")
    expect(hidden).to_have_value(", ".join(map(str, TEACHER_HIDDEN)))
    shown = {"teacher_hidden": hidden.input_value()}
    shown["picked"] = page.locator("#f-teacher-weights-run-id option:checked").inner_text()
    page.locator("#f-name").fill(name)
    epochs = page.get_by_label("Epochs", exact=True)
    epochs.fill("")
    epochs.press_sequentially("2")
    run_id = submit_launch_form(page)
    mark_document(page)
    try:
        yield Launched(run_id, name, page, shown)
    finally:
        context.close()


@pytest.fixture(scope="session")
def kd(kd_launch: Launched, server: Server) -> Launched:
    """The KD student, succeeded."""
    server.wait_for_status(kd_launch.id, "succeeded", TRAIN_TIMEOUT_MS / 1000)
    return kd_launch
