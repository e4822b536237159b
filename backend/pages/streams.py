"""What the pages' server-sent event streams share: each is an async generator woken by the
app's live watcher (`kdlab.backend.services.live`), never a poll of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import StreamingResponse

from kdlab.backend.services.live import LiveResponse

POLL_SECONDS = 1.0  # a running run's duration ticks this often (re-rendered, not re-read)
LINGER_SECONDS = 10.0


async def linger(request: Request) -> None:
    """After `event: end`, leave the closing to the browser (its `sse-close`): a stream the
    server cuts first reads as a connection error there."""
    for _ in range(int(LINGER_SECONDS / 0.5)):
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.5)


def event_stream(request: Request, events: AsyncIterator[str]) -> StreamingResponse:
    """The response of a page's stream: it holds one of the browser session's stream slots
    while open (`kdlab.backend.services.live.LiveResponse`)."""
    return LiveResponse(request, events)
