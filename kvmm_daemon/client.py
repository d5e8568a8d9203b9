"""Client library for the kvmm daemon: a sync `Client` and a trio `AsyncClient`.

    from kvmm_daemon.client import Client
    with Client() as c:                         # $KVMM_SOCKET or /run/kvmm/kvmm.sock
        print(c.generate("Name a colour.", max_tokens=16).text)
        with c.stream("Count to five.", max_tokens=32) as s:
            for delta in s:
                print(delta.text, end="", flush=True)
        print(s.result.usage)

Both speak the protocol of docs/protocol.md over one connection and can have several
requests in flight on it (replies are routed by request id). A server error arrives as a
subclass of `ServerError` chosen by its code, so callers catch exactly what they can handle
(`LimitExceeded`: retry later; `InvalidRequest`: fix the call). The simple operations (health,
stats, requests, cancel, sessions) are written once, in `OPERATIONS`, and become methods of
both clients. Importing this module imports neither the daemon package nor the engine (so not
torch): the wire types live in kvmm_daemon/protocol.py and client_types.py. Left out: automatic reconnects and retries (a caller decides what is safe to
repeat).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import trio

from kvmm_daemon import protocol as P
from kvmm_daemon.client_types import (ERRORS, BadFrame, CapacityExceeded, ClientError, Collector,
                                      Conflict, ConnectionLost, DaemonUnavailable, Delta,
                                      EngineFailure, FrameTooLarge, InternalServerError,
                                      InvalidRequest, LimitExceeded, NotFound, PermissionDenied,
                                      Result, ServerError, ShuttingDown, UnknownOperation,
                                      UnsupportedVersion, error_from_reply, result_of)
from kvmm_daemon.protocol import DEFAULT_SOCKET, generate_message

__all__ = ["Client", "Stream", "AsyncClient", "AsyncStream", "Delta", "Result", "default_socket",
           "ClientError", "DaemonUnavailable", "ConnectionLost", "ServerError", "ERRORS", "error_from_reply",
           "BadFrame", "FrameTooLarge", "UnsupportedVersion", "UnknownOperation", "InvalidRequest",
           "NotFound", "PermissionDenied", "Conflict", "LimitExceeded", "CapacityExceeded",
           "ShuttingDown", "EngineFailure", "InternalServerError"]


def default_socket() -> str:
    return os.environ.get("KVMM_SOCKET") or DEFAULT_SOCKET


def _connect_error(path: str, exc: OSError) -> DaemonUnavailable:
    hint = ("start it with `kvmm serve` or `systemctl start kvmm`, or point --socket/$KVMM_SOCKET at it"
            if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)) else
            "join the socket's group (usually kvmm) or run as root" if isinstance(exc, PermissionError)
            else "check the path")
    return DaemonUnavailable(f"cannot connect to the kvmm daemon at {path}: {exc.strerror or exc}; {hint}")


# ---------------------------------------------------------------------------------- operations

@dataclass(frozen=True, slots=True)
class Operation:
    """One request/result op as a client method: `fields(*args)` gives the request's keys,
    `result(reply_result)` what the method returns."""
    op: str
    doc: str
    fields: Callable[..., dict[str, Any]] = lambda: {}
    result: Callable[[Any], Any] = lambda r: r


OPERATIONS: dict[str, Operation] = {
    "health": Operation("health", "Status, version, protocol, uptime and the caller's uid."),
    "stats": Operation("stats", "Engine, KV, client and server statistics (yours only, unless root)."),
    "steps": Operation("steps", "The engine's last steps: per weight segment (layer), compute and "
                       "I/O-wait seconds, and the weight and swap files (for `kvmm trace`)."),
    "requests": Operation("requests", "The requests in flight that you may see."),
    "cancel": Operation("cancel", "Abort a request in flight (NotFound once it finished).",
                        lambda request_id: {"request_id": request_id}, lambda r: None),
    "open_session": Operation("session.open", "Open a session (the daemon picks a name if none); "
                              "returns its name.", lambda name=None: {"session": name} if name else {},
                              lambda r: r["session"]),
    "sessions": Operation("session.list", "The sessions you may see."),
    "delete_session": Operation("session.delete", "Delete a session and free its KV.",
                                lambda session: {"session": session}, lambda r: None),
}


def _describe(method: Callable[..., Any], owner: str, name: str, spec: Operation) -> Callable[..., Any]:
    """Name, docstring and signature (self + the fields' parameters) of a generated method."""
    fields = inspect.signature(spec.fields)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = fields.replace(parameters=[self_param, *fields.parameters.values()])
    method.__name__, method.__qualname__, method.__doc__ = name, f"{owner}.{name}", spec.doc
    return method


def _sync_method(name: str, spec: Operation) -> Callable[..., Any]:
    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        return spec.result(self.call(spec.op, **spec.fields(*args, **kwargs)))
    return _describe(method, "Client", name, spec)


def _async_method(name: str, spec: Operation) -> Callable[..., Any]:
    async def method(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
        return spec.result(await self.call(spec.op, **spec.fields(*args, **kwargs)))
    return _describe(method, "AsyncClient", name, spec)


# ---------------------------------------------------------------------------------- sync

class Client:
    """A blocking connection to the daemon; not thread-safe (use one per thread)."""

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None):
        self.path = socket_path or default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise _connect_error(self.path, exc) from None
        self._decoder = P.FrameDecoder(P.CLIENT_MAX_FRAME)
        self._inbox: dict[int | None, deque] = {}
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._sock.sendall(P.encode_frame(msg))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionLost(f"the daemon closed the connection: {exc.strerror}") from None

    def _receive(self, id: int) -> dict[str, Any]:
        """The next reply for request `id`, buffering replies to other requests."""
        while not self._inbox.get(id):
            if self._inbox.get(None):
                raise error_from_reply(self._inbox[None].popleft())
            try:
                data = self._sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                raise ConnectionLost(f"the daemon at {self.path} closed the connection")
            for body in self._decoder.feed(data):
                msg = P.decode_body(body)
                self._inbox.setdefault(msg.get("id"), deque()).append(msg)
        return self._inbox[id].popleft()

    def call(self, op: str, **fields: Any) -> Any:
        """One op and its result (the methods of OPERATIONS go through here)."""
        id = next(self._ids)
        self._send(P.request(id, op, **fields))
        return result_of(self._receive(id))

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Stream:
        """Start a generate; iterate the returned Stream for Deltas, then read `.result`."""
        id = next(self._ids)
        self._send(generate_message(id, prompt, stream=True, **kwargs))
        return Stream(self, id)

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Result:
        """Generate and wait for the whole answer (no per-token frames)."""
        id = next(self._ids)
        self._send(generate_message(id, prompt, stream=False, **kwargs))
        col = Collector()
        while not col.take(self._receive(id)):
            pass
        self._inbox.pop(id, None)
        assert col.result is not None
        return col.result


class Stream:
    """Deltas of one streaming generate; leaving the `with` block early cancels it."""

    def __init__(self, client: Client, id: int):
        self._client, self._id, self._col = client, id, Collector()
        self._done = False

    @property
    def request_id(self) -> str | None:
        return self._col.request_id

    @property
    def result(self) -> Result | None:
        return self._col.result

    def __iter__(self) -> Iterator[Delta]:
        while True:
            while self._col.pending:
                yield self._col.pending.popleft()
            if self._done:
                return
            self._done = self._col.take(self._client._receive(self._id))

    def cancel(self) -> None:
        """Ask the daemon to stop; iteration then ends with finish_reason "abort"."""
        while self._col.request_id is None and not self._done:
            self._done = self._col.take(self._client._receive(self._id))
        if not self._done:
            try:
                self._client.cancel(self._col.request_id)
            except NotFound:
                pass                      # it finished meanwhile

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type, *rest: Any) -> None:
        if not self._done and exc_type is None:
            self.cancel()
            for _ in self:
                pass
        self._client._inbox.pop(self._id, None)


# ---------------------------------------------------------------------------------- trio

class AsyncClient:
    """A trio connection; open with `async with AsyncClient.connect(path) as client:`.

    A reader task routes replies to per-request memory channels, so many tasks may share one
    client. Attributes: _routes: request id -> send channel, present while a caller waits.
    """

    def __init__(self, stream, path: str):
        self._stream, self.path = stream, path
        self._routes: dict[int, Any] = {}
        self._ids = itertools.count(1)
        self._failure: ClientError | None = None
        self._send_lock = trio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, socket_path: str | None = None) -> AsyncIterator[AsyncClient]:
        path = socket_path or default_socket()
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            raise _connect_error(path, exc) from None
        client = cls(stream, path)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()

    async def _reader(self) -> None:
        decoder = P.FrameDecoder(P.CLIENT_MAX_FRAME)
        try:
            while True:
                data = await self._stream.receive_some(1 << 16)
                if not data:
                    break
                for body in decoder.feed(data):
                    msg = P.decode_body(body)
                    if msg.get("id") is None:
                        self._failure = error_from_reply(msg)
                        return
                    route = self._routes.get(msg["id"])
                    if route is not None:
                        route.send_nowait(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._failure = self._failure or ConnectionLost(f"the daemon at {self.path} closed the connection")
            for route in self._routes.values():
                route.close()

    async def _open(self, msg: dict[str, Any]):
        if self._failure is not None:
            raise self._failure
        send, recv = trio.open_memory_channel(math.inf)
        self._routes[msg["id"]] = send
        async with self._send_lock:
            try:
                await self._stream.send_all(P.encode_frame(msg))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionLost(f"the daemon at {self.path} closed the connection") from None
        return recv

    async def _next(self, recv) -> dict[str, Any]:
        try:
            return await recv.receive()
        except trio.EndOfChannel:
            raise self._failure or ConnectionLost("connection closed") from None

    async def call(self, op: str, **fields: Any) -> Any:
        """One op and its result (the methods of OPERATIONS go through here)."""
        id = next(self._ids)
        recv = await self._open(P.request(id, op, **fields))
        try:
            return result_of(await self._next(recv))
        finally:
            self._routes.pop(id, None)

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> Result:
        async with self.stream(prompt, _stream=False, **kwargs) as s:
            async for _ in s:
                pass
        assert s.result is not None
        return s.result

    @contextlib.asynccontextmanager
    async def stream(self, prompt: str | None = None, *, _stream: bool = True,
                     **kwargs: Any) -> AsyncIterator[AsyncStream]:
        """`async with client.stream(...) as s: async for delta in s: ...`; then `s.result`.
        Leaving the block before the end cancels the request."""
        id = next(self._ids)
        recv = await self._open(generate_message(id, prompt, stream=_stream, **kwargs))
        s = AsyncStream(self, recv)
        try:
            yield s
            if not s.done:
                await s.cancel()
                async for _ in s:
                    pass
        finally:
            self._routes.pop(id, None)


class AsyncStream:
    def __init__(self, client: AsyncClient, recv):
        self._client, self._recv, self._col = client, recv, Collector()
        self.done = False

    @property
    def request_id(self) -> str | None:
        return self._col.request_id

    @property
    def result(self) -> Result | None:
        return self._col.result

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Delta:
        while not self._col.pending:
            if self.done:
                raise StopAsyncIteration
            self.done = self._col.take(await self._client._next(self._recv))
        return self._col.pending.popleft()

    async def cancel(self) -> None:
        while self._col.request_id is None and not self.done:
            self.done = self._col.take(await self._client._next(self._recv))
        if not self.done:
            try:
                await self._client.cancel(self._col.request_id)
            except NotFound:
                pass


for _name, _spec in OPERATIONS.items():
    setattr(Client, _name, _sync_method(_name, _spec))
    setattr(AsyncClient, _name, _async_method(_name, _spec))
del _name, _spec
