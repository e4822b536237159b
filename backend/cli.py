"""The `kdlab` command line.

    kdlab train CONFIG.yaml [--out DIR] [--resume] [--device DEVICE]

Each subcommand is one `add_<name>(subparsers)` function that registers its parser and sets
`handler`; `main` dispatches. (`serve`, `db` and `token` live in `backend.commands`.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from backend.commands import add_db, add_serve, add_token

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def _train(args: argparse.Namespace) -> int:
    # The worker's trainer runs in this process; imported here so other commands stay light.
    from worker.local_run import run_local

    result = run_local(args.config, args.out, resume=args.resume, device=args.device)
    return EXIT_INTERRUPTED if result.stopped else 0


def add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run one config on this machine (no server)",
        description="Train or distil one run config here; writes <out>/<name>/ with metrics, "
        "checkpoints and the exported student.",
    )
    parser.add_argument("config", type=Path, help="run config (YAML or JSON)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs"), help="runs directory (default: ./runs)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from <out>/<name>/latest.pt if present"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.set_defaults(handler=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdlab", description="KD Lab: knowledge-distillation experiments."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train(subparsers)
    add_serve(subparsers)
    add_db(subparsers)
    add_token(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, FileNotFoundError) as err:  # a user's mistake: the message, no traceback
        print(f"kdlab {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # stdout closed early (`kdlab train ... | head`): exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
