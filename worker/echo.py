"""Where a run's progress lines go: `Echo` takes one line; the default prints it at once."""

from __future__ import annotations

from collections.abc import Callable

Echo = Callable[[str], None]


def print_line(line: str) -> None:
    print(line, flush=True)
