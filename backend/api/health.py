"""GET /api/health: liveness and versions; needs no token."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import text

from kdlab.backend.api.deps import SessionDep, SettingsDep
from kdlab.backend.db.migrate import current_revision

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    version: str
    database: str
    schema_revision: str | None
    executor: str


@router.get("/health")
def health(session: SessionDep, settings: SettingsDep) -> Health:
    from importlib.metadata import version

    connection = session.connection()
    connection.execute(text("SELECT 1"))
    return Health(
        status="ok",
        version=version("kdlab"),
        database=connection.dialect.name,
        schema_revision=current_revision(connection),
        executor=settings.executor,
    )
