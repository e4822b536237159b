"""The GPU suite collects with the worker's dependencies alone (finding 20): a GPU machine needs
no FastAPI, SQLAlchemy, MLflow, Ray or Playwright to run `pytest -m gpu`. Runs on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ONLY = [
    "backend",
    "fastapi",
    "starlette",
    "sqlalchemy",
    "alembic",
    "mlflow",
    "ray",
    "playwright",
    "uvicorn",
    "psycopg",
]

BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {SERVICE_ONLY!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
        return None
sys.meta_path.insert(0, Block())
"""


def test_gpu_suite_collects_without_the_service_dependencies(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-m",
        "gpu",
        "tests/gpu",
        "--confcutdir=tests/gpu",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:cov",
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(collected) >= 15, proc.stdout
    assert all(line.startswith("tests/gpu/") for line in collected)
    # and the blocker really blocks: the service's own tests do not import
    proc = subprocess.run(
        [sys.executable, "-c", "import kdlab.backend.main"], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "not installed on the GPU machine" in proc.stderr
