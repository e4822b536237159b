"""The server-side `kdlab` subcommands, registered like `kdlab.backend.cli.add_train`:

    kdlab serve [--host 127.0.0.1] [--port 8000] [--data-dir ~/.kdlab] [--demo]
    kdlab db upgrade [--revision head] [--data-dir DIR]
    kdlab db current [--data-dir DIR]
    kdlab token create --name NAME [--run RUN_ID] [--data-dir DIR]

Options given on the command line override the matching `KDLAB_*` variables; everything else
(`KDLAB_TOKEN`, `KDLAB_DATABASE_URL`, ...) comes from the environment as in `Settings`. A user's
mistake raises `ValueError`, which `kdlab.backend.cli.main` prints as a one-line error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kdlab.backend.settings import Settings


def _settings(args: argparse.Namespace, **names: str) -> Settings:
    """Settings from the environment, overridden by the options that were given."""
    overrides: dict[str, Any] = {}
    for option, field in {"data_dir": "data_dir", **names}.items():
        value = getattr(args, option, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (default: $KDLAB_DATA_DIR or ~/.kdlab)",
    )


def _shown_url(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.resolved_database_url).render_as_string(hide_password=True)


def _ensure_dirs(settings: Settings) -> None:
    for directory in (settings.data_path, settings.artifacts_dir, settings.uploads_dir):
        directory.mkdir(parents=True, exist_ok=True)


def _require_head(engine: Any, settings: Settings) -> None:
    from kdlab.backend.db.migrate import current_revision, head_revision

    current = current_revision(engine)
    if current != head_revision():
        raise ValueError(
            f"the database {_shown_url(settings)} is at revision {current or 'none (empty)'}, "
            "not the newest; run `kdlab db upgrade` first"
        )


# --- serve --------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args, host="host", port="port")
    settings.check_bind()  # ValueError naming KDLAB_TOKEN when it would listen off loopback
    import uvicorn

    from kdlab.backend.db.engine import make_engine
    from kdlab.backend.db.migrate import upgrade
    from kdlab.backend.main import create_app

    _ensure_dirs(settings)
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    demo = bool(getattr(args, "demo", False))
    if demo:
        _seed_demo(settings)
    app = create_app(settings, demo=demo)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base = f"http://{host}:{settings.port}"
    print(f"KD Lab on {base}/ (data in {settings.data_path})", flush=True)
    if demo:
        from kdlab.backend.pages.compare import demo_view

        print(f"demo: watch it at {base}{demo_view()}", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port)
    return 0


def _seed_demo(settings: Settings) -> None:
    """`--demo`: queue the demo runs on a data dir without runs (the KD student follows its
    teacher, queued by the supervisor; see `kdlab.backend.services.dispatch.queue_demo`)."""
    from kdlab.backend.db.engine import make_engine, make_session_factory
    from kdlab.backend.services.dispatch import DEMO_EXPERIMENT, DEMO_KD, queue_demo

    if settings.executor != "local":
        raise ValueError(
            f"--demo runs its runs with the local executor, but KDLAB_EXECUTOR={settings.executor}"
        )
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            queued = queue_demo(session, settings)
    finally:
        engine.dispose()
    if queued:
        names = ", ".join(run.name for run in queued)
        print(
            f"demo: queued {names} in experiment {DEMO_EXPERIMENT!r}; {DEMO_KD} follows once "
            "the teacher has succeeded",
            flush=True,
        )
    else:
        print("demo: this data directory already has runs; nothing new queued", flush=True)


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the web app and API",
        description="Serve the API and pages. Creates the data directory and upgrades the "
        "database first. Off loopback it refuses to start unless KDLAB_TOKEN is set.",
    )
    parser.add_argument(
        "--host", default=None, help="address to listen on (default: $KDLAB_HOST or 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="port (default: $KDLAB_PORT or 8000)"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="on a data directory without runs, queue a small digits experiment (teacher, "
        "student alone, KD student from that teacher) to see live curves within minutes",
    )
    _data_dir_option(parser)
    parser.set_defaults(handler=_serve)


# --- db -----------------------------------------------------------------------------------------


def _db_upgrade(args: argparse.Namespace) -> int:
    from kdlab.backend.db.engine import make_engine
    from kdlab.backend.db.migrate import current_revision, upgrade

    settings = _settings(args)
    _ensure_dirs(settings)
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade(engine, args.revision)
        revision = current_revision(engine)
    finally:
        engine.dispose()
    print(f"{_shown_url(settings)} is at revision {revision}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    from kdlab.backend.db.engine import make_engine
    from kdlab.backend.db.migrate import current_revision, head_revision

    settings = _settings(args)
    engine = make_engine(settings.resolved_database_url)
    try:
        revision = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    state = "(head)" if revision == head else f"(newest is {head}: run `kdlab db upgrade`)"
    print(f"{revision or 'none'} {state}")
    return 0


def add_db(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "db",
        help="database schema: upgrade, current",
        description="Manage the database schema (Alembic migrations). The database is "
        "$KDLAB_DATABASE_URL, or the SQLite file kdlab.db in the data directory.",
    )
    actions = parser.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = actions.add_parser("upgrade", help="bring the schema to a revision (default: head)")
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    _data_dir_option(upgrade)
    upgrade.set_defaults(handler=_db_upgrade)
    current = actions.add_parser("current", help="print the schema revision")
    _data_dir_option(current)
    current.set_defaults(handler=_db_current)


# --- token --------------------------------------------------------------------------------------


def _token_create(args: argparse.Namespace) -> int:
    from kdlab.backend.db.engine import make_engine, make_session_factory
    from kdlab.backend.db.models import Run
    from kdlab.backend.services.auth import create_token

    name = args.name.strip()
    if not name:
        raise ValueError("--name must not be empty")
    settings = _settings(args)
    engine = make_engine(settings.resolved_database_url)
    try:
        _require_head(engine, settings)
        with make_session_factory(engine)() as session:
            if args.run is not None and session.get(Run, args.run) is None:
                raise ValueError(f"no run {args.run}")
            scope = "admin" if args.run is None else "run"
            token = create_token(session, name, scope=scope, run_id=args.run)
            session.commit()
    finally:
        engine.dispose()
    what = "an admin token" if args.run is None else f"a token for run {args.run} only"
    print(f"created {what} named {name!r}; it is shown only this once:", file=sys.stderr)
    print(token)
    return 0


def add_token(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "token",
        help="API tokens: create",
        description="Manage bearer tokens for the API (stored hashed).",
    )
    actions = parser.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="create a token and print it once",
        description="Create a bearer token: admin scope, or scoped to one run with --run. "
        "The token is printed to stdout once; only its hash is stored.",
    )
    create.add_argument("--name", required=True, help="a label to recognise the token by")
    create.add_argument("--run", default=None, metavar="RUN_ID", help="scope it to this run")
    _data_dir_option(create)
    create.set_defaults(handler=_token_create)
