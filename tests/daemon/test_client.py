"""The client library against the real daemon: trio AsyncClient with concurrent tasks on one
connection, error mapping, and the connect errors."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import trio

from kvmm_daemon.client import (ERRORS, OPERATIONS, AsyncClient, Client, ConnectionLost, DaemonUnavailable,
                                InvalidRequest, NotFound, ServerError, error_from_reply)
from kvmm_daemon.protocol import ErrorCode

from .helpers import wait_idle


def test_every_error_code_has_a_class():
    for code in ErrorCode:
        exc = error_from_reply({"type": "error", "code": code.value, "message": "m"})
        assert isinstance(exc, ERRORS[code.value]) and exc.code == code.value and str(exc) == "m"
    exc = error_from_reply({"code": "from_the_future", "message": "m"})
    assert type(exc) is ServerError and exc.code == "from_the_future"


def test_importing_the_client_loads_neither_the_daemon_nor_the_engine():
    code = ("import sys, kvmm_daemon.client; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith("
            "('kvmm_daemon.daemon', 'kvmm_daemon.engine', 'torch.'))))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": root}).stdout
    assert out.strip() == "[]"


def test_both_clients_have_every_operation_of_the_table():
    for name, spec in OPERATIONS.items():
        assert getattr(Client, name).__doc__ == spec.doc and getattr(AsyncClient, name).__doc__ == spec.doc
    assert all(inspect.iscoroutinefunction(getattr(AsyncClient, n)) for n in OPERATIONS)
    assert not any(inspect.iscoroutinefunction(getattr(Client, n)) for n in OPERATIONS)
    assert str(inspect.signature(Client.cancel)) == "(self, request_id)"
    assert str(inspect.signature(AsyncClient.open_session)) == "(self, name=None)"


def test_connect_errors_say_what_to_do(tmp_path):
    with pytest.raises(DaemonUnavailable, match="kvmm serve"):
        Client(str(tmp_path / "none.sock"))

    async def main():
        async with AsyncClient.connect(str(tmp_path / "none.sock")):
            pass
    with pytest.raises(DaemonUnavailable, match="systemctl start kvmm"):
        trio.run(main)


def test_async_client_shares_one_connection_between_tasks(daemon):
    results = {}

    async def one(c, i):
        if i % 3 == 0:
            results[i] = (await c.generate("The quick brown fox", raw=True, max_tokens=6, ignore_eos=True)).token_ids
        elif i % 3 == 1:
            async with c.stream("The quick brown fox", raw=True, max_tokens=6, ignore_eos=True) as s:
                results[i] = [t async for d in s for t in d.token_ids]
        else:
            results[i] = (await c.health())["status"]

    async def main():
        async with AsyncClient.connect(daemon.socket) as c:
            async with trio.open_nursery() as n:
                for i in range(9):
                    n.start_soon(one, c, i)
            with pytest.raises(InvalidRequest):
                await c.generate("x", top_p=0.0)
            with pytest.raises(NotFound):
                await c.cancel("r999999")
            name = await c.open_session()
            assert name in [s["session"] for s in await c.sessions()]
            await c.delete_session(name)
            assert (await c.stats())["clients"]["connected"] >= 1
            assert await c.requests() == []

    trio.run(main)
    greedy = [results[i] for i in (0, 1, 3, 4, 6, 7)]
    assert all(g == greedy[0] and len(g) == 6 for g in greedy)
    assert [results[i] for i in (2, 5, 8)] == ["ok"] * 3


def test_async_stream_left_early_is_cancelled(daemon):
    async def main():
        async with AsyncClient.connect(daemon.socket) as c:
            async with c.stream("The quick", raw=True, max_tokens=300, ignore_eos=True) as s:
                async for _ in s:
                    break
            return s.result

    result = trio.run(main)
    assert result.finish_reason == "abort"
    wait_idle(daemon.socket)


def test_sync_client_sees_a_lost_connection(daemon):
    from .helpers import RawConn
    c = Client(daemon.socket)
    c._sock.sendall(b"\xff\xff\xff\xff")            # oversized frame: the daemon closes
    with pytest.raises((ConnectionLost, ServerError)):
        c.health()
    c.close()
    RawConn(daemon.socket).close()
