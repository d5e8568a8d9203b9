"""SseResponse: a Starlette response streaming server-sent events from an async iterator, one
body write per item, that leaves an exit stack when it ends however it ends.

Why not Starlette's StreamingResponse: under an ASGI server older than spec 2.4 (hypercorn
speaks 2.1) it watches for the client leaving through an anyio task group started per
response; this one does the same with a trio nursery (the daemon is trio throughout), and it
owns the cleanup that must run after the last byte (the admission of the generation, whose
exit aborts an unfinished request and frees its KV blocks). The iterator's items should be
whole events: openai_api.py puts everything one engine step produced into one item.

Left out: background tasks, websocket denial, anything not text/event-stream.
"""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class SseResponse(Response):
    """200, text/event-stream, never cached or buffered by a proxy.

    Attributes:
      events: the stream's text, item by item; closed when the response ends.
      cleanup: left (shielded from cancellation) after `events` is closed, however the
        response ended: finished, client gone, daemon stopping.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], cleanup: contextlib.AsyncExitStack):
        # not Response.__init__: it would render an empty body and send content-length: 0
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.events = events
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
                await self._stream(send)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.events.aclose()
                await self.cleanup.aclose()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for text in self.events:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel `scope` when the client goes away (ASGI http.disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
