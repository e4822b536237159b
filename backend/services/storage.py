"""Files on disk: streamed in with a sha256 and a size cap, then moved into place atomically.

Artifacts and uploads both land through this module: `receive` streams a request body into a
temporary file next to its destination (hashing as it goes and stopping at the cap), `write`
does the same for a file the server produces, and `commit` renames the result into place, so a
reader never sees a half-written file. File names are always made here (`new_name`), never taken
from a request.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from starlette.concurrency import run_in_threadpool

from kdlab.backend.errors import PayloadTooLarge

TEMP_PREFIX = ".tmp-"
WRITE_SIZE = 1 << 20  # chunks are gathered to this size before a write (one thread hop each)
HASH_SIZE = 1 << 20


@dataclass(frozen=True)
class Stored:
    """A file the server wrote: where it is now, its sha256 (hex) and size in bytes."""

    path: Path
    sha256: str
    size: int


def new_name(suffix: str = "") -> str:
    """A fresh server-made file name (no part of it comes from a request)."""
    return uuid.uuid4().hex + suffix


def temp_path(directory: Path) -> Path:
    """A fresh temporary path in `directory` (same file system as the destination)."""
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}"


def too_large(what: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{what} is larger than the limit of {limit} bytes (KDLAB_MAX_UPLOAD_BYTES); nothing was stored"
    )


def _open(path: Path) -> BinaryIO:
    return open(path, "xb")


def _write_chunk(handle: BinaryIO, digest: Any, data: bytes) -> None:
    handle.write(data)
    digest.update(data)


def _finish(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


async def receive(
    chunks: AsyncIterable[bytes], directory: Path, max_bytes: int, what: str = "the upload"
) -> Stored:
    """Stream `chunks` into a temporary file in `directory`, hashing as it goes.

    Raises 413 as soon as more than `max_bytes` arrive; on any error the temporary file is gone.
    The caller `commit`s the returned temporary file or `discard`s it.
    """
    path = temp_path(directory)
    digest = hashlib.sha256()
    size = 0
    handle = await run_in_threadpool(_open, path)
    try:
        buffer = bytearray()
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise too_large(what, max_bytes)
            buffer += chunk
            if len(buffer) >= WRITE_SIZE:
                await run_in_threadpool(_write_chunk, handle, digest, bytes(buffer))
                buffer.clear()
        if buffer:
            await run_in_threadpool(_write_chunk, handle, digest, bytes(buffer))
        await run_in_threadpool(_finish, handle)
    except BaseException:
        handle.close()
        discard(path)
        raise
    return Stored(path, digest.hexdigest(), size)


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file on disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(HASH_SIZE):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def write(directory: Path, produce: Callable[[Path], None]) -> Stored:
    """Let `produce(path)` write a temporary file in `directory`; hash it. Blocking.

    On any error the temporary file is gone. The caller `commit`s or `discard`s the result.
    """
    path = temp_path(directory)
    try:
        produce(path)
        sha256, size = hash_file(path)
    except BaseException:
        discard(path)
        raise
    return Stored(path, sha256, size)


def commit(stored: Stored, destination: Path) -> Stored:
    """Atomically move a temporary file to `destination` (same directory tree, same disk)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stored.path, destination)
    return Stored(destination, stored.sha256, stored.size)


def discard(path: Path) -> None:
    """Remove a file if it is there."""
    path.unlink(missing_ok=True)


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing anything that would resolve outside `root` (defence in depth:
    the relative paths come from the database, written by this module's callers)."""
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base) or path == base:
        raise ValueError(f"stored path {relative!r} points outside {base}")
    return path
