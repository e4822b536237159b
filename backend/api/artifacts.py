"""/api/runs/{id}/artifacts and /api/runs/{id}/student routes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from kdlab.backend.api.deps import PrincipalDep, SessionDep, SettingsDep
from kdlab.backend.db.models import Artifact
from kdlab.backend.schemas.artifacts import ArtifactKind, ArtifactOut
from kdlab.backend.services import artifacts as service
from kdlab.backend.services import storage

router = APIRouter(tags=["artifacts"])

_RAW_BODY = {
    "requestBody": {
        "required": True,
        "description": "The file's bytes, as is (not multipart).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_FILE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file, as an attachment; `X-Content-SHA256` carries its sha256.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _out(request: Request, artifact: Artifact) -> ArtifactOut:
    url = request.app.url_path_for("download_artifact", run_id=artifact.run_id, name=artifact.name)
    return ArtifactOut.model_validate(service.to_out(artifact, str(url)))


def _send(file: service.FileToSend, background: BackgroundTask | None = None) -> FileResponse:
    return FileResponse(
        file.path,
        media_type="application/octet-stream",
        filename=file.filename,
        content_disposition_type="attachment",
        headers={"X-Content-SHA256": file.sha256},
        background=background,
    )


@router.put(
    "/runs/{run_id}/artifacts/{name}",
    status_code=201,
    responses={200: {"model": ArtifactOut, "description": "Replaced an artifact of that name."}},
    openapi_extra=_RAW_BODY,
)
async def put_artifact(
    run_id: str,
    name: str,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    x_content_sha256: Annotated[
        str,
        Header(
            alias="X-Content-SHA256",
            pattern=r"^[0-9A-Fa-f]{64}$",
            description="Hex sha256 of the body; a mismatch is refused and nothing is kept.",
        ),
    ],
    kind: ArtifactKind = "file",
) -> ArtifactOut:
    """Store the request body as the run's artifact `name` (admin, or the run's own token).

    `name` is 1-200 characters of `[A-Za-z0-9._-]` starting with a letter or digit. The body
    streams to disk with its sha256 computed on the way; a body over the upload limit gets 413 and
    a sha256 other than `X-Content-SHA256` gets 422, with nothing kept. Uploading a name again
    replaces the file (200 instead of 201). The exported student is `student.safetensors`.
    A finished run's artifacts (succeeded, failed, cancelled) are read-only: 409 for any token.
    """
    length = request.headers.get("content-length")
    artifact, created = await service.put_artifact(
        session,
        settings,
        principal,
        run_id,
        name,
        kind,
        x_content_sha256,
        request.stream(),
        int(length) if length and length.isdigit() else None,
    )
    if not created:
        response.status_code = 200
    return _out(request, artifact)


@router.get("/runs/{run_id}/artifacts")
def list_artifacts(
    run_id: str, request: Request, session: SessionDep, principal: PrincipalDep
) -> list[ArtifactOut]:
    """The run's artifacts by name, each with its download URL."""
    return [_out(request, a) for a in service.list_artifacts(session, principal, run_id)]


@router.get(
    "/runs/{run_id}/artifacts/{name}",
    name="download_artifact",
    response_class=FileResponse,
    responses=_FILE_RESPONSE,
)
def download_artifact(
    run_id: str,
    name: str,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> FileResponse:
    """The artifact's bytes (admin, the run's token, or the token of a run it is teacher of)."""
    file = service.artifact_file(session, settings, principal, run_id, name)
    session.commit()  # end the read transaction before the file streams out
    return _send(file)


@router.get("/runs/{run_id}/student", response_class=FileResponse, responses=_FILE_RESPONSE)
def download_student(
    run_id: str,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    format: Annotated[
        str,
        Query(
            description="`safetensors` (default): the file `kd.save` wrote (weights + JSON "
            "metadata in the header; `kd.restore` loads it). `pt`: a PyTorch state-dict file "
            "made from the same tensors - a plain dict of tensors (tied names included) plus "
            "the metadata JSON as a string under `kdlab_metadata`; read it with "
            "`torch.load(path, weights_only=True)` and pop `kdlab_metadata` before "
            "`load_state_dict`."
        ),
    ] = "safetensors",
) -> FileResponse:
    """The run's exported student, named `<run name>-student.safetensors` (or `.pt`)."""
    service.check_student_format(format)
    file = service.student_file(session, settings, principal, run_id)
    session.commit()  # end the read transaction before converting or streaming
    if format == "safetensors":
        return _send(file)
    converted = service.student_as_pt(file, file.path.parent)
    return _send(converted, BackgroundTask(storage.discard, converted.path))
