"""Run artifacts: files a worker uploads (checkpoints, the exported student, logs) and their rows.

A request never names a path on disk: an upload's bytes go to
`<artifacts_dir>/<run id>/<server-made name>`, and a download looks its name up in the
`artifacts` table for that run and serves the path stored there.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from kdlab.backend.db.models import Artifact, Run, utcnow
from kdlab.backend.errors import Conflict, Invalid, NotFound
from kdlab.backend.schemas.runs import FINISHED
from kdlab.backend.services import storage
from kdlab.backend.services.auth import Principal
from kdlab.backend.settings import Settings
from kdlab.worker.names import STUDENT_FILE

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
_NAME = re.compile(NAME_PATTERN)
KINDS = ("student", "checkpoint", "log", "file")
STUDENT_NAME = STUDENT_FILE
STUDENT_FORMATS = ("safetensors", "pt")
PT_METADATA_KEY = "kdlab_metadata"
SAFETENSORS_METADATA_KEY = "kdlab"  # kdlab.worker.kd.serialization.METADATA_KEY


@dataclass(frozen=True)
class FileToSend:
    """What a download needs once the database transaction is over."""

    path: Path
    filename: str
    sha256: str


def check_name(name: str, loc: str = "path") -> None:
    if not _NAME.fullmatch(name):
        raise Invalid.at(
            [loc, "name"],
            f"artifact name {name!r} is not allowed: 1-200 characters of letters, digits, '.', "
            "'_' or '-', starting with a letter or digit (no slashes)",
        )


def get_run(session: Session, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    return run


def _teacher_run_id(run: Run) -> str | None:
    if run.teacher_run_id:
        return run.teacher_run_id
    teacher = (run.config or {}).get("teacher") or {}
    weights = teacher.get("weights") if isinstance(teacher, dict) else None
    value = weights.get("run_id") if isinstance(weights, dict) else None
    return value if isinstance(value, str) else None


def check_read(session: Session, principal: Principal, run_id: str) -> None:
    """Admin reads everything; a run's token reads its own run and its teacher run's files."""
    if principal.scope == "admin" or principal.run_id == run_id:
        return
    own = session.get(Run, principal.run_id) if principal.run_id else None
    if own is not None and _teacher_run_id(own) == run_id:
        return
    principal.require_run(run_id)  # raises 403 naming both runs


def to_out(artifact: Artifact, download_url: str) -> dict[str, Any]:
    return {
        "name": artifact.name,
        "kind": artifact.kind,
        "sha256": artifact.sha256,
        "size": artifact.size,
        "created_at": artifact.created_at,
        "download_url": download_url,
    }


def list_artifacts(session: Session, principal: Principal, run_id: str) -> list[Artifact]:
    check_read(session, principal, run_id)
    get_run(session, run_id)
    return list(
        session.scalars(select(Artifact).where(Artifact.run_id == run_id).order_by(Artifact.name))
    )


def _lookup(session: Session, run_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.run_id == run_id, Artifact.name == name))


def _file_of(settings: Settings, artifact: Artifact) -> Path:
    try:
        path = storage.inside(settings.artifacts_dir, artifact.path)
    except ValueError as err:
        raise Conflict(f"artifact {artifact.name} of run {artifact.run_id}: {err}") from err
    if not path.is_file():
        raise NotFound(
            f"artifact {artifact.name} of run {artifact.run_id} is listed but its file is missing "
            f"from {settings.artifacts_dir}"
        )
    return path


def artifact_file(
    session: Session, settings: Settings, principal: Principal, run_id: str, name: str
) -> FileToSend:
    """The stored file behind `name` (looked up in the table, never joined onto a path)."""
    check_name(name)
    check_read(session, principal, run_id)
    get_run(session, run_id)
    artifact = _lookup(session, run_id, name)
    if artifact is None:
        raise NotFound(f"run {run_id} has no artifact named {name!r}")
    return FileToSend(_file_of(settings, artifact), artifact.name, artifact.sha256)


def safe_filename(text: str) -> str:
    """`text` reduced to characters that are safe in a file name and a header."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "run"


def student_file(
    session: Session, settings: Settings, principal: Principal, run_id: str
) -> FileToSend:
    """The run's exported student (`student.safetensors`), named after the run for download."""
    check_read(session, principal, run_id)
    run = get_run(session, run_id)
    artifact = _lookup(session, run_id, STUDENT_NAME)
    if artifact is None:
        raise NotFound(f"run {run_id} has no exported student yet")
    filename = f"{safe_filename(run.name)}-student.safetensors"
    return FileToSend(_file_of(settings, artifact), filename, artifact.sha256)


def check_student_format(value: str) -> None:
    if value not in STUDENT_FORMATS:
        raise Invalid.at(
            ["query", "format"],
            f"unknown format {value!r}; the formats are: {', '.join(STUDENT_FORMATS)}",
        )


def student_as_pt(student: FileToSend, directory: Path) -> FileToSend:
    """Write the student as a PyTorch state-dict file (a temporary file in `directory`).

    The file holds a plain dict: every tensor under its state-dict name (tied names included,
    sharing storage), plus `"kdlab_metadata"`: the JSON metadata string of the safetensors header
    (`"{}"` when there is none). `torch.load(path, weights_only=True)` reads it; pop
    `"kdlab_metadata"` before `model.load_state_dict`.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(student.path), framework="pt") as handle:
            header = handle.metadata() or {}
            state: dict[str, Any] = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise Conflict(f"the stored student is not a readable safetensors file: {err}") from err
    metadata = header.get(SAFETENSORS_METADATA_KEY, "{}")
    try:
        aliases = json.loads(metadata).get("aliases") or {}
    except (ValueError, AttributeError):
        aliases = {}
    for alias, target in aliases.items():
        if target in state and alias not in state:
            state[alias] = state[target]
    if PT_METADATA_KEY in state:
        raise Conflict(f"the student has a tensor named {PT_METADATA_KEY!r}; download safetensors")
    state[PT_METADATA_KEY] = metadata

    def produce(path: Path) -> None:
        with open(path, "wb") as handle:  # a handle: torch names archives after the file
            torch.save(state, handle)

    stored = storage.write(directory, produce)
    filename = student.filename.removesuffix(".safetensors") + ".pt"
    return FileToSend(stored.path, filename, stored.sha256)


def _record(
    session: Session, run_id: str, name: str, kind: str, stored: storage.Stored, relative: str
) -> tuple[Artifact, str | None]:
    """Insert or replace the row; returns it and the replaced file's relative path."""
    for attempt in range(2):
        try:
            check_writable(get_run(session, run_id))  # it may have finished meanwhile
            artifact = session.scalar(
                select(Artifact)
                .where(Artifact.run_id == run_id, Artifact.name == name)
                .with_for_update()
            )
            old_path = None
            if artifact is None:
                artifact = Artifact(run_id=run_id, name=name)
                session.add(artifact)
            else:
                old_path = artifact.path
            artifact.kind = kind
            artifact.sha256 = stored.sha256
            artifact.size = stored.size
            artifact.path = relative
            artifact.created_at = utcnow()
            session.commit()
            return artifact, old_path
        except IntegrityError:  # a concurrent first upload of the same name won: replace it
            session.rollback()
            if attempt:
                raise
    raise AssertionError("unreachable")


def check_writable(run: Run) -> None:
    """A finished run's artifacts are read-only (for every token, admin too)."""
    if run.status in FINISHED:
        raise Conflict(f"run {run.id} already {run.status}; its artifacts are read-only")


def _prepare_put(session: Session, principal: Principal, run_id: str) -> None:
    principal.require_run(run_id)
    check_writable(get_run(session, run_id))
    session.commit()  # end the transaction: no lock is held while the body streams in


async def put_artifact(
    session: Session,
    settings: Settings,
    principal: Principal,
    run_id: str,
    name: str,
    kind: str,
    expected_sha256: str,
    body: AsyncIterable[bytes],
    content_length: int | None,
) -> tuple[Artifact, bool]:
    """Stream `body` into the run's artifact `name`; returns the row and whether it is new."""
    check_name(name)
    await run_in_threadpool(_prepare_put, session, principal, run_id)
    limit = settings.max_upload_bytes
    what = f"artifact {name}"
    if content_length is not None and content_length > limit:
        raise storage.too_large(what, limit)
    directory = settings.artifacts_dir / run_id
    stored = await storage.receive(body, directory, limit, what)
    try:
        if stored.sha256 != expected_sha256.lower():
            raise Invalid.at(
                ["header", "X-Content-SHA256"],
                f"the body's sha256 is {stored.sha256}, not {expected_sha256}; nothing was stored",
            )
        file_name = storage.new_name()
        final = await run_in_threadpool(storage.commit, stored, directory / file_name)
    except BaseException:
        storage.discard(stored.path)
        raise
    try:
        artifact, old_path = await run_in_threadpool(
            _record, session, run_id, name, kind, final, f"{run_id}/{file_name}"
        )
    except BaseException:
        storage.discard(final.path)
        raise
    if old_path is not None and old_path != artifact.path:
        with contextlib.suppress(ValueError):  # a bad stored path is left alone
            storage.discard(storage.inside(settings.artifacts_dir, old_path))
    return artifact, old_path is None


def remove_run_files(settings: Settings, run_id: str) -> None:
    """Delete a run's artifact directory (for run deletion, after its rows are gone)."""
    try:
        directory = storage.inside(settings.artifacts_dir, run_id)
    except ValueError:
        return
    shutil.rmtree(directory, ignore_errors=True)
