"""/api/uploads routes: teacher weights uploaded by hand."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from kdlab.backend.api.deps import AdminDep, PrincipalDep, SessionDep, SettingsDep
from kdlab.backend.db.models import Upload
from kdlab.backend.schemas.uploads import UploadOut
from kdlab.backend.services import uploads as service

router = APIRouter(tags=["uploads"])

_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [service.FIELD],
                    "properties": {
                        service.FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "A .safetensors, .pt or .pth file.",
                        }
                    },
                }
            }
        },
    }
}


def _out(upload: Upload) -> UploadOut:
    return UploadOut.model_validate(upload, from_attributes=True)


@router.post("/uploads", status_code=201, openapi_extra=_MULTIPART_BODY)
async def create_upload(
    request: Request, session: SessionDep, settings: SettingsDep, _admin: AdminDep
) -> UploadOut:
    """Upload weights (admin): multipart field `file`, a `.safetensors`, `.pt` or `.pth` file.

    safetensors must parse; `.pt`/`.pth` is read with `torch.load(weights_only=True)`, so a
    pickle that would run code is refused, and must hold a state_dict (a flat dict of tensors,
    or one under a `state_dict` or `model` key). Either way the stored file is safetensors and
    `sha256`/`size` describe it. A file over the upload limit gets 413 and nothing is kept.
    """
    return _out(await receive_upload(request, session, settings))


async def receive_upload(request: Request, session: SessionDep, settings: SettingsDep) -> Upload:
    """Stream the request's multipart body into `service.create_upload` (also the launch
    form's upload button)."""
    length = request.headers.get("content-length")
    return await service.create_upload(
        session,
        settings,
        request.headers.get("content-type"),
        request.stream(),
        int(length) if length and length.isdigit() else None,
    )


@router.get("/uploads")
def list_uploads(session: SessionDep, _admin: AdminDep) -> list[UploadOut]:
    """Every upload, newest first (admin)."""
    return [_out(u) for u in service.list_uploads(session)]


@router.get("/uploads/{upload_id}")
def get_upload(upload_id: str, session: SessionDep, principal: PrincipalDep) -> UploadOut:
    """One upload (admin, or the token of a run whose teacher weights it is)."""
    return _out(service.get_upload(session, principal, upload_id))


@router.get(
    "/uploads/{upload_id}/file",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The stored safetensors file; `X-Content-SHA256` carries its sha256.",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
def download_upload(
    upload_id: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> FileResponse:
    """The stored safetensors file (admin, or the token of a run whose teacher weights it is)."""
    file = service.upload_file(session, settings, principal, upload_id)
    session.commit()  # end the read transaction before the file streams out
    return FileResponse(
        file.path,
        media_type="application/octet-stream",
        filename=file.filename,
        headers={"X-Content-SHA256": file.sha256},
    )
