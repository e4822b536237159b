"""Helpers shared by the test modules: polling for a condition, optional dependencies."""

from __future__ import annotations

import importlib
import os
import subprocess
import time
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    process: subprocess.Popen[str] | None = None,
) -> T:
    """Poll `condition` every `interval` s until it returns something truthy, and return that.

    Raises AssertionError naming `what` after `timeout` s, or as soon as `process` (when given)
    has exited: then the message carries the process's output.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"the process exited while waiting for {what}:\n{_output(process)}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _output(process: subprocess.Popen[str], timeout: float = 30) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # it exited, but a child of it still holds the pipe
        return f"(its output pipe still open after {timeout} s)"
    return output or ""


def require_module(name: str, env: str, install: str) -> ModuleType:
    """Import module `name` for a test module, or skip that module when it is not installed.

    With the environment variable `env` set to 1 (.ci/run sets it) a missing module fails the
    collection instead, with a message saying to install `install`.
    """
    if os.environ.get(env) != "1":
        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing = error
    pytest.fail(
        f"{env}=1 but {name} cannot be imported ({missing}): pip install {install}", pytrace=False
    )
