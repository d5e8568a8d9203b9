"""HttpServer: the OpenAI-compatible API's listeners, served by hypercorn on the daemon's trio loop.

HTTP itself (HTTP/1.1 over h11, keep-alive, chunked bodies, timeouts) is hypercorn's trio
worker; the app is Starlette (openai_api.py). What is ours is accepting: hypercorn's
`serve()` would accept for us and drop the one thing the app must know — who is on the other
end of a Unix socket. So we run the accept loop (accept.py), read SO_PEERCRED of each Unix
peer before a byte is parsed, and hand the stream to hypercorn's per-connection server
(`hypercorn.trio.tcp_server.TCPServer`) with a connection state of {"peer": credentials}.
Hypercorn copies that state into the ASGI scope of every request on the connection
(`scope["state"]`, the ASGI lifespan-state extension), where the app reads it. TCP peers get
{"peer": None}: the app then wants a bearer API key.

Connections beyond `max_clients` are closed at once. Left out: TLS (put a reverse proxy in
front for remote access), HTTP/2 (h2c upgrade is off: the clients that matter speak 1.1).
"""
from __future__ import annotations

import logging
import socket
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from kvmm_daemon.daemon.accept import accept_forever
from kvmm_daemon.daemon.auth import peer_credentials

log = logging.getLogger("kvmm.http")


class HttpServer:
    """Serves one ASGI app on any number of listeners.

    Attributes:
      connections: HTTP connections open now (all listeners); never above max_clients.
      _accepting: cancel scopes of the running accept loops; cancelled by stop_accepting.
    """

    def __init__(self, app: Any, *, max_clients: int, keep_alive_s: float = 75.0):
        self.config = Config()
        self.config.errorlog = logging.getLogger("kvmm.http.hypercorn")
        self.config.accesslog = None
        self.config.keep_alive_timeout = keep_alive_s
        self._app = wrap_app(app, self.config.wsgi_max_body_size, "asgi")
        self._context = WorkerContext(None)
        self.max_clients = max_clients
        self.connections = 0
        self._accepting: list[trio.CancelScope] = []

    async def serve(self, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept on `sock` (Unix: peers by SO_PEERCRED; TCP: by API key) until stopped."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        unix = sock.family == socket.AF_UNIX
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:
                self._accepting.append(scope)
                task_status.started()
                await accept_forever(listener, lambda s: self._handle(s, unix), nursery)

    def stop_accepting(self) -> None:
        for scope in self._accepting:
            scope.cancel()

    async def _handle(self, stream: trio.SocketStream, unix: bool) -> None:
        try:
            peer = peer_credentials(stream.socket) if unix else None
        except OSError as exc:
            log.warning("dropping an HTTP client whose credentials cannot be read: %s", exc)
            await stream.aclose()
            return
        if self.connections >= self.max_clients:
            log.warning("refusing an HTTP connection: %d open already (max_clients)", self.connections)
            await stream.aclose()
            return
        self.connections += 1
        try:
            await TCPServer(self._app, self.config, self._context, {"peer": peer}, stream)
        finally:
            self.connections -= 1
