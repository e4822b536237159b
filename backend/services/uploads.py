"""Uploaded weights (teacher weights for runs): checked, converted, stored as safetensors.

The multipart body is parsed as it streams in, so the size limit holds while reading and an
oversize upload leaves nothing behind. A `.safetensors` file is kept as is once its header
parses; a `.pt`/`.pth` file is loaded with `torch.load(weights_only=True)` - which refuses any
pickle that would run code - and rewritten as safetensors, so every later reader needs only
safetensors. The client's file name is kept for display, never used as a path.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from kdlab.backend.db.models import Run, Upload, new_id
from kdlab.backend.errors import Invalid, NotFound
from kdlab.backend.services import storage
from kdlab.backend.services.artifacts import PT_METADATA_KEY, SAFETENSORS_METADATA_KEY, FileToSend
from kdlab.backend.services.auth import Principal
from kdlab.backend.settings import Settings

if TYPE_CHECKING:
    import torch

FIELD = "file"
FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}
MULTIPART_OVERHEAD = 1 << 20  # bytes of multipart framing and other fields allowed on top
REFUSED = "refused: the file needs arbitrary code to load; save a state_dict or safetensors"
_LOC = ["body", FIELD]


def _invalid(message: str) -> Invalid:
    return Invalid.at(list(_LOC), message)


# --- the multipart body, streamed ---------------------------------------------------------------


class FilePart:
    """The bytes of one multipart file field, pulled out of the request body as it arrives."""

    def __init__(
        self, content_type: str | None, body: AsyncIterable[bytes], max_body: int, field: str
    ) -> None:
        kind, params = parse_options_header(content_type or "")
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise _invalid(f"send the file as multipart/form-data in a field named {field!r}")
        self.field = field
        self.filename: str | None = None
        self._body = aiter(body)
        self._max_body = max_body
        self._read = 0
        self._eof = False
        self._pending: list[bytes] = []
        self._target = False  # inside the wanted part
        self._found = False
        self._done = False  # the wanted part ended
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    # parser callbacks (synchronous; they only record)
    def _on_part_begin(self) -> None:
        self._disposition = b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name != self.field or self._found:
            return
        if b"filename" not in options:
            raise _invalid(f"field {self.field!r} must be a file, not a text value")
        self._found = self._target = True
        self.filename = options[b"filename"].decode("utf-8", "replace")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target:
            self._pending.append(data[start:end])

    def _on_part_end(self) -> None:
        if self._target:
            self._target = False
            self._done = True

    async def _pump(self) -> None:
        """Feed the parser one more piece of the body (or finish it)."""
        try:
            raw = await anext(self._body)
        except StopAsyncIteration:
            self._eof = True
            self._parser.finalize()
            return
        self._read += len(raw)
        if self._read > self._max_body:
            raise storage.too_large("the request body", self._max_body)
        try:
            self._parser.write(raw)
        except FormParserError as err:
            raise _invalid(f"the multipart body is malformed: {err}") from err

    async def start(self) -> str:
        """Read up to the start of the file's bytes; returns the client's file name."""
        while not self._found and not self._eof:
            await self._pump()
        if not self._found:
            raise _invalid(f"no file field named {self.field!r} in the multipart body")
        return self.filename or ""

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes, as they arrive."""
        while True:
            if self._pending:
                data = b"".join(self._pending)
                self._pending.clear()
                yield data
            if self._done:
                return
            if self._eof:
                raise _invalid(f"the multipart body ended inside the {self.field!r} field")
            await self._pump()


# --- file names ---------------------------------------------------------------------------------


def clean_filename(raw: str) -> str:
    """The base name only, printable characters, at most 255 of them (extension kept)."""
    base = re.split(r"[\\/]", raw)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if base in {".", ".."}:
        base = ""
    if len(base) > 255:
        stem, dot, ext = base.rpartition(".")
        base = stem[: 255 - len(ext) - 1] + dot + ext if dot and len(ext) < 32 else base[:255]
    return base


def format_of(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    if suffix not in FORMATS:
        raise _invalid(
            f"{filename or 'the file'!r}: upload a .safetensors, .pt or .pth file "
            "(the extension decides how it is read)"
        )
    return FORMATS[suffix]


# --- checking and converting --------------------------------------------------------------------


def _safetensors_count(path: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            count = len(list(handle.keys()))
    except Exception as err:  # SafetensorError and friends: a corrupt or foreign file
        raise _invalid(f"not a valid safetensors file: {err}") from err
    if count == 0:
        raise _invalid("the safetensors file holds no tensors")
    return count


def _describe(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"a single tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict with keys {list(value)[:8]}"
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _flat_problem(value: Any) -> str | None:
    """Why `value` is not a flat dict of tensors (None when it is one)."""
    import torch

    if not isinstance(value, dict):
        return _describe(value)
    for key, item in value.items():
        if not isinstance(key, str):
            return f"a dict with a non-string key {key!r}"
        if key == PT_METADATA_KEY and isinstance(item, str):
            continue
        if not isinstance(item, torch.Tensor):
            return f"a dict whose entry {key!r} is {_describe(item)}, not a tensor"
    return None


def _state_dict_of(loaded: Any) -> dict[str, Any]:
    problem = _flat_problem(loaded)
    if problem is None:
        return loaded
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if key in loaded and _flat_problem(loaded[key]) is None:
                return loaded[key]
    raise _invalid(
        "expected a state_dict: a flat dict of tensors, or a dict with a 'state_dict' or 'model' "
        f"entry holding one; this file holds {problem}"
    )


def _check_unpacked_size(path: Path, limit: int) -> None:
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        total = sum(info.file_size for info in archive.infolist())
    if total > limit:
        raise _invalid(f"the file unpacks to {total} bytes, over the upload limit of {limit}")


def _load_pt(path: Path, limit: int) -> Any:
    import torch

    _check_unpacked_size(path, limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported operand" not in text:  # a global, reduce or class the safe loader refuses
            found = re.search(r"GLOBAL ([\w.]+)", text)
            raise _invalid(
                REFUSED + (f" (it references {found.group(1)})" if found else "")
            ) from err
        raise _invalid(f"not a readable PyTorch file: {text.splitlines()[-1]}") from err
    except Exception as err:  # a damaged archive, a truncated file, ...
        raise _invalid(f"not a readable PyTorch file: {err}") from err


def _independent(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no storage (what safetensors needs), same values."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in state.items():
        if name == PT_METADATA_KEY and isinstance(value, str):
            continue
        tensor = value.detach()
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise _invalid(f"tensor {name!r} is {tensor.layout} / quantized; store dense tensors")
        pointer = tensor.untyped_storage().data_ptr()
        shared = pointer != 0 and pointer in storages
        tensor = tensor.to("cpu").contiguous()
        tensors[name] = tensor.clone() if shared else tensor
        if pointer:
            storages.add(pointer)
    return tensors


def _convert_pt(raw: Path, directory: Path, limit: int) -> tuple[storage.Stored, int]:
    """Load a .pt/.pth safely and write its state dict as a temporary safetensors file."""
    from safetensors.torch import save_file

    state = _state_dict_of(_load_pt(raw, limit))
    tensors = _independent(state)
    if not tensors:
        raise _invalid("the file holds no tensors")
    metadata = state.get(PT_METADATA_KEY)
    header = {SAFETENSORS_METADATA_KEY: metadata} if isinstance(metadata, str) else None

    def produce(path: Path) -> None:
        try:
            save_file(tensors, str(path), metadata=header)
        except Exception as err:  # e.g. a dtype safetensors cannot store
            raise _invalid(f"cannot store these tensors as safetensors: {err}") from err

    return storage.write(directory, produce), len(tensors)


def _finish(
    session: Session,
    settings: Settings,
    raw: storage.Stored,
    upload_id: str,
    filename: str,
    fmt: str,
) -> Upload:
    """Check/convert the received file, move it into place and record it. Blocking."""
    directory = settings.uploads_dir
    if fmt == "safetensors":
        count = _safetensors_count(raw.path)
        ready = raw
    else:
        ready, count = _convert_pt(raw.path, directory, settings.max_upload_bytes)
        storage.discard(raw.path)
    final_name = f"{upload_id}.safetensors"
    try:
        final = storage.commit(ready, directory / final_name)
    except BaseException:
        storage.discard(ready.path)
        raise
    try:
        upload = Upload(
            id=upload_id,
            filename=filename,
            format=fmt,
            sha256=final.sha256,
            size=final.size,
            path=final_name,
            tensor_count=count,
        )
        session.add(upload)
        session.commit()
    except BaseException:
        session.rollback()
        storage.discard(final.path)
        raise
    return upload


async def create_upload(
    session: Session,
    settings: Settings,
    content_type: str | None,
    body: AsyncIterable[bytes],
    content_length: int | None,
) -> Upload:
    """Receive the multipart `file` field, check it and store it as safetensors."""
    await run_in_threadpool(session.commit)  # no transaction stays open while the body streams
    limit = settings.max_upload_bytes
    max_body = limit + MULTIPART_OVERHEAD
    if content_length is not None and content_length > max_body:
        raise storage.too_large("the upload", limit)
    part = FilePart(content_type, body, max_body, FIELD)
    filename = clean_filename(await part.start())
    fmt = format_of(filename)
    raw = await storage.receive(part.chunks(), settings.uploads_dir, limit, f"{filename!r}")
    try:
        return await run_in_threadpool(_finish, session, settings, raw, new_id(), filename, fmt)
    finally:
        storage.discard(raw.path)  # already moved or converted on success; gone either way


# --- reading ------------------------------------------------------------------------------------


def _referenced_upload(run: Run) -> str | None:
    teacher = (run.config or {}).get("teacher") or {}
    weights = teacher.get("weights") if isinstance(teacher, dict) else None
    value = weights.get("upload_id") if isinstance(weights, dict) else None
    return value if isinstance(value, str) else None


def check_read(session: Session, principal: Principal, upload_id: str) -> None:
    """Admin reads every upload; a run's token reads the upload its config names as teacher."""
    if principal.scope == "admin":
        return
    run = session.get(Run, principal.run_id) if principal.run_id else None
    if run is not None and _referenced_upload(run) == upload_id:
        return
    principal.require_admin()


def list_uploads(session: Session) -> list[Upload]:
    return list(session.scalars(select(Upload).order_by(Upload.created_at.desc(), Upload.id)))


def get_upload(session: Session, principal: Principal, upload_id: str) -> Upload:
    check_read(session, principal, upload_id)
    upload = session.get(Upload, upload_id)
    if upload is None:
        raise NotFound(f"no upload {upload_id}")
    return upload


def upload_file(
    session: Session, settings: Settings, principal: Principal, upload_id: str
) -> FileToSend:
    upload = get_upload(session, principal, upload_id)
    try:
        path = storage.inside(settings.uploads_dir, upload.path)
    except ValueError as err:
        raise NotFound(f"upload {upload_id}: {err}") from err
    if not path.is_file():
        raise NotFound(f"upload {upload_id} is listed but its file is missing")
    stem = Path(upload.filename).stem or upload_id
    return FileToSend(path, f"{stem}.safetensors", upload.sha256)
