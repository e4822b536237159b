"""What the pages' server-sent event streams share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import StreamingResponse

POLL_SECONDS = 1.0
LINGER_SECONDS = 10.0
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def linger(request: Request) -> None:
    """After `event: end`, leave the closing to the browser (its `sse-close`): a stream the
    server cuts first reads as a connection error there."""
    for _ in range(int(LINGER_SECONDS / 0.5)):
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.5)


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)
