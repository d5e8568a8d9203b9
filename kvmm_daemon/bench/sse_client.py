"""SseClient: the bench's HTTP client — one keep-alive HTTP/1.1 connection on a Unix socket
that GETs JSON and POSTs a JSON body whose reply is a stream of server-sent events.

Why not httpx (what the openai package uses): `kvmm bench serve` compares the daemon's two
fronts, so both sides get the leanest reasonable client. The msgpack side's AsyncClient writes
a request in one send and decodes each reply frame once; here likewise: the request line,
headers and body go out in one write, h11 (hypercorn's own HTTP parser, so no new dependency;
httpx is only a test extra) parses the reply, and each `data:` event is JSON-decoded once.
httpx's pooling, header models and line iteration cost ~1-3 ms of client CPU per request more
(measured on the embedded model), all of it inside the HTTP side's TTFT.

Left out: TCP, TLS, redirects, retries, compression, SSE fields other than `data:` (the API
sends no others), events split over `\\r\\n` line ends (the API ends events with `\\n\\n`).
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator

import h11
import trio

RECV_BYTES = 1 << 16


class HttpStatusError(Exception):
    """A reply other than 200; names the route, the status and the body's start."""


class SseClient:
    """Requests one after another on a keep-alive connection (HTTP/1.1, no pipelining).

    Attributes:
      _stream, _conn: the connection and its h11 state machine; IDLE on both sides between
        requests. A new pair replaces them when the server ended the last reply with
        `connection: close` (hypercorn does after keep_alive_max_requests).
    """

    def __init__(self, path: str):
        self._path = path
        self._stream: trio.SocketStream | None = None
        self._conn = h11.Connection(h11.CLIENT)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: str) -> AsyncIterator[SseClient]:
        client = cls(path)
        try:
            await client._reconnect()
            yield client
        finally:
            if client._stream is not None:
                await client._stream.aclose()

    async def _reconnect(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        self._stream = await trio.open_unix_socket(self._path)
        self._conn = h11.Connection(h11.CLIENT)

    async def get_json(self, target: str) -> Any:
        """The JSON body of GET `target`."""
        body = b"".join([data async for data in self._exchange("GET", target, b"")])
        return json.loads(body)

    async def events(self, target: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """POST `body` as JSON; yield each event's `data` JSON-decoded, until `[DONE]`."""
        pending = b""
        async for data in self._exchange("POST", target, json.dumps(body).encode()):
            pending += data
            *complete, pending = pending.split(b"\n\n")
            for event in complete:
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        payload = line[6:]
                        if payload == b"[DONE]":
                            continue
                        yield json.loads(payload)

    async def _exchange(self, method: str, target: str, body: bytes) -> AsyncIterator[bytes]:
        """Send one request in one write; yield the reply's body bytes as they arrive."""
        if self._conn.our_state is h11.MUST_CLOSE:
            await self._reconnect()
        headers = [("host", "kvmm"), ("content-length", str(len(body)))]
        if body:
            headers.append(("content-type", "application/json"))
        conn = self._conn
        await self._stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers))
                                    + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        status, error = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self._stream.receive_some(RECV_BYTES))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                if status == 200:
                    yield bytes(event.data)
                else:
                    error += event.data
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                if status != 200:
                    raise HttpStatusError(f"{method} {target}: HTTP {status}: {error[:300].decode(errors='replace')}")
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpStatusError(f"{method} {target}: the server closed the connection")
