"""SseClient, the bench's HTTP client: streams a chat completion's events from the daemon,
raises on error statuses, and reconnects when the server closes a keep-alive connection."""
from __future__ import annotations

import socket

import pytest
import trio
from kvmm_daemon.bench.sse_client import HttpStatusError, SseClient
from kvmm_daemon.daemon.http_server import HttpServer

from .conftest import MODEL


def test_events_of_a_streamed_chat_completion(http_daemon):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "The quick brown fox"}],
            "max_tokens": 4, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async def main():
        async with SseClient.connect(http_daemon.http_socket) as h:
            assert (await h.get_json("/v1/models"))["data"][0]["id"] == MODEL
            events = [e async for e in h.events("/v1/chat/completions", body)]
            with pytest.raises(HttpStatusError, match="HTTP 404.*model_not_found"):
                async for _ in h.events("/v1/chat/completions", {**body, "model": "nope"}):
                    pass
            assert (await h.get_json("/health"))["status"] == "ok"     # the connection lives on
        return events

    events = trio.run(main)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["usage"]["completion_tokens"] == 4             # [DONE] is not an event


def test_reconnects_after_the_server_closes_the_connection(sock_dir, monkeypatch):
    connects = []
    monkeypatch.setattr(trio, "open_unix_socket", lambda path, _open=trio.open_unix_socket: connects.append(path) or _open(path))
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    server = HttpServer(app, max_clients=4)
    server.config.keep_alive_max_requests = 2          # then hypercorn sends `connection: close`
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f"{sock_dir}/h.sock")
    sock.listen()

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, sock)
            async with SseClient.connect(f"{sock_dir}/h.sock") as h:
                replies = [await h.get_json("/") for _ in range(5)]
            server.stop_accepting()
        return replies

    assert trio.run(main) == [{"ok": True}] * 5
    assert len(connects) == 3                          # requests 1-2, 3-4, 5
