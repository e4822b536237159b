"""The `kdlab` command line.

    kdlab train CONFIG.yaml [--out DIR] [--resume] [--device DEVICE]
    kdlab train CONFIG.yaml --server URL [--token T] [--work-dir DIR] [--device DEVICE]

Each subcommand is one `add_<name>(subparsers)` function that registers its parser and sets
`handler`; `main` dispatches. (`serve`, `db` and `token` live in `kdlab.backend.commands`.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kdlab.backend.commands import add_db, add_serve, add_token

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def _train(args: argparse.Namespace) -> int:
    # The worker's trainer runs in this process; imported here so other commands stay light.
    if args.server is not None:
        return _train_on_server(args)
    if args.token is not None or args.work_dir is not None:
        raise ValueError("--token and --work-dir go with --server URL")
    from kdlab.worker.local_run import run_local

    result = run_local(args.config, args.out, resume=args.resume, device=args.device)
    return EXIT_INTERRUPTED if result.stopped else 0


def _train_on_server(args: argparse.Namespace) -> int:
    """Register an external run on the server and train it here like a dispatched worker."""
    if args.resume:
        raise ValueError(
            "--resume is for local runs; with --server every invocation registers a new run"
        )
    from kdlab.worker.client import ApiError
    from kdlab.worker.run import train_on_server

    try:
        outcome = train_on_server(
            args.config,
            args.server,
            args.token or os.environ.get("KDLAB_TOKEN"),
            work_dir=args.work_dir,
            device=args.device,
        )
    except ApiError as err:
        print(f"kdlab train: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if outcome.status == "succeeded" and outcome.reported:
        return 0
    if outcome.status in ("cancelled", "interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_ERROR


def add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run one config on this machine (optionally reporting to a server)",
        description="Train or distil one run config here; writes <out>/<name>/ with metrics, "
        "checkpoints and the exported student. With --server URL the run is registered on "
        "that server and reports to it instead.",
    )
    parser.add_argument("config", type=Path, help="run config (YAML or JSON)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs"), help="runs directory (default: ./runs)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from <out>/<name>/latest.pt if present"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    server = parser.add_argument_group(
        "reporting to a KD Lab server",
        "With --server the run is registered there as an external run and reports like a "
        "dispatched worker: live metrics (spooled to disk while the server is away), logs, "
        "checkpoints and the exported student. teacher.weights.run_id / upload_id then name a "
        "run / upload on that server.",
    )
    server.add_argument("--server", metavar="URL", default=None, help="e.g. http://host:8000")
    server.add_argument(
        "--token", default=None, help="admin token of the server (default: $KDLAB_TOKEN)"
    )
    server.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="checkpoints and the metric spool (default: ~/.kdlab/work/<run id>)",
    )
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
