"""The wheel as a user gets it: what it installs, what imports, `kdlab serve` and `kdlab train`.

Everything runs in the clean venv of `wheel_venv` (conftest.py), from temporary folders, so
nothing here can pass by importing the repository's checkout instead of the installed package.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import httpx
import pytest

from kdlab.backend.db.migrate import head_revision
from tests.conftest import free_port
from tests.helpers import wait_for
from tests.packaging.conftest import WheelVenv

# every test here needs `wheel_venv`: two to three minutes to build and install, once a session
pytestmark = pytest.mark.slow

DIST_INFO = re.compile(r"^kdlab-[^/]+\.dist-info$")


def _is_kdlab(top: str) -> bool:
    return top == "kdlab" or bool(DIST_INFO.match(top))


def _record(venv: WheelVenv) -> list[str]:
    """Paths of the installed kdlab distribution's RECORD, relative to site-packages."""
    dist_infos = sorted(venv.site_packages.glob("kdlab-*.dist-info"))
    assert len(dist_infos) == 1, dist_infos
    with (dist_infos[0] / "RECORD").open(newline="") as f:
        return [row[0] for row in csv.reader(f) if row]


# ------------------------------------------------------------------------------- the wheel


def test_the_wheel_installs_only_kdlab_and_its_console_script(wheel_venv: WheelVenv):
    # what installing the wheel alone (--no-deps) added to site-packages and bin/
    assert wheel_venv.added_site_packages, "installing the wheel added nothing"
    assert {n for n in wheel_venv.added_site_packages if not _is_kdlab(n)} == set()
    assert "kdlab" in wheel_venv.added_site_packages
    assert wheel_venv.added_bin == {"kdlab"}

    # the same from the installed RECORD: every file lies under kdlab/ or its dist-info,
    # but the console script (site-packages/../../../bin/kdlab)
    outside = set()
    for path in _record(wheel_venv):
        resolved = os.path.normpath(wheel_venv.site_packages / path)
        relative = os.path.relpath(resolved, wheel_venv.site_packages)
        if relative.startswith(".."):
            outside.add(os.path.relpath(resolved, wheel_venv.root))
            continue
        top = PurePosixPath(relative).parts[0]
        assert _is_kdlab(top), f"the wheel installs {relative} outside kdlab"
    assert outside == {"bin/kdlab"}
    script = wheel_venv.bin / "kdlab"
    assert script.is_file() and os.access(script, os.X_OK)
    assert "kdlab.backend.cli" in script.read_text()


def test_the_wheel_carries_the_pages_assets_recipes_and_migrations_and_nothing_else(
    wheel_venv: WheelVenv,
):
    names = zipfile.ZipFile(wheel_venv.wheel).namelist()
    tops = {PurePosixPath(n).parts[0] for n in names}
    assert {t for t in tops if not _is_kdlab(t)} == set(), tops

    def has(pattern: str) -> list[str]:
        return [n for n in names if re.fullmatch(pattern, n)]

    assert has(r"kdlab/frontend/templates/base\.html")
    assert has(r"kdlab/frontend/templates/pages/runs\.html")
    assert has(r"kdlab/frontend/templates/(macros|partials)/.+\.html")
    assert has(r"kdlab/frontend/static/vendor/htmx-[\d.]+\.min\.js")
    assert has(r"kdlab/frontend/static/vendor/htmx-ext-sse-[\d.]+\.js")
    assert has(r"kdlab/frontend/static/vendor/uPlot-[\d.]+\.esm\.js")
    assert has(r"kdlab/frontend/static/vendor/uPlot-[\d.]+\.min\.css")
    assert has(r"kdlab/frontend/static/css/.+\.css")
    assert has(r"kdlab/frontend/static/js/.+\.js")
    assert has(r"kdlab/frontend/recipes/digits-logits-kd\.yaml")
    assert has(r"kdlab/migrations/env\.py")
    assert has(r"kdlab/migrations/script\.py\.mako")
    assert has(r"kdlab/migrations/versions/0001_initial\.py")
    assert has(r"kdlab/py\.typed")
    # every migration script of the repository ships
    repo_versions = {
        p.name
        for p in (Path(__file__).resolve().parents[2] / "migrations" / "versions").glob("*.py")
    }
    assert {f"kdlab/migrations/versions/{v}" for v in repo_versions} <= set(names)

    for unwanted in (
        r"(.*/)?tests?/.*",
        r"(.*/)?benchmarks/.*",
        r"(.*/)?docs/.*",
        r"(.*/)?examples/.*",
        r".*node_modules/.*",
        r".*__pycache__/.*",
        r".*\.pyc",
        r"kdlab/frontend/(package(-lock)?\.json|biome\.json)",
    ):
        assert has(unwanted) == [], f"the wheel carries {has(unwanted)[:5]}"


# ------------------------------------------------------------------------------ importing


def test_kdlab_imports_from_the_venv_and_the_repository_layout_does_not(
    wheel_venv: WheelVenv, tmp_path: Path
):
    probe = """
import json, sys
found = {}
import kdlab
found["kdlab"] = kdlab.__file__
try:
    import kdlab.distill as mtd
    found["distill"] = mtd.__file__
    found["distill_api"] = [n for n in ("convert", "export", "LogitsDistillationLoss",
                            "StaticLossBalancer") if not hasattr(mtd, n)]
except ImportError as error:
    found["distill"] = f"{type(error).__name__}: {error}"
for name in ("backend", "worker"):
    try:
        __import__(name)
        found[name] = "imported"
    except ModuleNotFoundError as error:
        found[name] = f"ModuleNotFoundError:{error.name}"
found["path"] = sys.path
print(json.dumps(found))
"""
    result = wheel_venv.run(wheel_venv.python, "-c", probe, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    site = wheel_venv.site_packages
    assert Path(found["kdlab"]).is_relative_to(site / "kdlab"), found["kdlab"]
    assert found["backend"] == "ModuleNotFoundError:backend"
    assert found["worker"] == "ModuleNotFoundError:worker"
    repo = str(Path(__file__).resolve().parents[2])
    assert not [p for p in found["path"] if p.startswith(repo)], found["path"]
    if sys.prefix != sys.base_prefix:  # pytest runs in a venv (CI's): the wheel's sees none of it
        assert not [p for p in found["path"] if p.startswith(sys.prefix)], found["path"]
    assert Path(found["distill"]).is_relative_to(site / "kdlab"), found["distill"]
    assert found["distill_api"] == [], f"kdlab.distill lacks {found['distill_api']}"


# ---------------------------------------------------------------------------- kdlab serve


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM the server's process group (ours: started in a session of its own), then KILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_kdlab_serve_answers_serves_the_pages_and_migrates(wheel_venv: WheelVenv, tmp_path: Path):
    data = tmp_path / "data"
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(wheel_venv.bin / "kdlab"), "serve", "--port", str(port), "--data-dir", str(data)],
            cwd=tmp_path,
            env=wheel_venv.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        try:
            wait_for(
                healthy, 90, "kdlab serve to answer /api/health", interval=0.25, process=process
            )
        except AssertionError as error:
            raise AssertionError(
                f"{error}\n--- kdlab serve log ---\n{log_path.read_text()}"
            ) from None
        assert process.poll() is None

        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200, page.text[:500]
        assert page.headers["content-type"].startswith("text/html")
        assert re.search(r"<title>\s*Runs · KD Lab\s*</title>", page.text), page.text[:500]
        assert re.search(r"<h1>\s*Runs\s*</h1>", page.text)
        assert "Launch a run" in page.text

        # the vendored htmx the page loads, as a browser would fetch it
        scripts = re.findall(r'<script[^>]+src="([^"]*htmx-[\d.]+\.min\.js)"', page.text)
        assert scripts, "the runs page loads no vendored htmx"
        asset = httpx.get(f"{url}{scripts[0]}" if scripts[0].startswith("/") else scripts[0])
        assert asset.status_code == 200
        assert "javascript" in asset.headers["content-type"]
        assert "htmx" in asset.text[:2000] and len(asset.content) > 10_000

        with sqlite3.connect(data / "kdlab.db") as db:
            versions = [row[0] for row in db.execute("SELECT version_num FROM alembic_version")]
        assert versions == [head_revision()]
    finally:
        _stop(process)
    assert process.returncode is not None


# ---------------------------------------------------------------------------- kdlab train

TINY_DIGITS_KD = """\
name: tiny-digits-kd
experiment: packaging
kind: distill
seed: 0
dataset: {name: digits, val_fraction: 0.2}
student: {name: mlp, params: {hidden: [8]}}
teacher: {name: mlp, params: {hidden: [16]}}
distill:
  pairs:
    - {student_layer: "", teacher_layer: "", loss: {name: logits_kl, params: {temperature: 4.0}}}
  balancer: {name: static, params: {kd_weight: 0.7}}
  allow_weak_teacher: true  # a random teacher: this checks the installed engine, not accuracy
train:
  epochs: 1
  batch_size: 256
  optimizer: {name: adamw, lr: 0.01}
"""


def test_kdlab_train_distils_a_tiny_digits_run_and_exports_the_student(
    wheel_venv: WheelVenv, tmp_path: Path
):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_DIGITS_KD)
    out = tmp_path / "runs"
    result = wheel_venv.run(
        wheel_venv.bin / "kdlab",
        "train",
        config,
        "--out",
        out,
        "--device",
        "cpu",
        cwd=tmp_path,
        timeout=180,
        KDLAB_DATA_DIR=str(tmp_path / "home-kdlab"),
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    student = out / "tiny-digits-kd" / "student.safetensors"
    assert student.is_file(), sorted(p.name for p in (out / "tiny-digits-kd").iterdir())
    load = (
        "import json, sys; from safetensors.torch import load_file; "
        "t = load_file(sys.argv[1]); "
        "print(json.dumps({k: list(v.shape) for k, v in t.items()}))"
    )
    loaded = wheel_venv.run(wheel_venv.python, "-c", load, student, cwd=tmp_path, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    shapes = json.loads(loaded.stdout.splitlines()[-1])
    assert shapes, "the exported student holds no tensors"
    # an MLP 64 → 8 → 10 on the 8×8 digits: a weight of 8×64 and one of 10×8
    assert sorted(s for s in shapes.values() if len(s) == 2) == [[8, 64], [10, 8]], shapes
